//! The agent's Prometheus metrics, served with `/status` on the daemon's loopback endpoint
//! (`GET /metrics`). Counters and phase times are kept as the daemon works; the privacy
//! spend, the certificate's expiry and the data's size are read at scrape time from the
//! same report as `fedward-agent status` ([`crate::status::compose`]).
//!
//! Names follow Prometheus conventions (`fedward_agent_` prefix, `_total`, `_seconds`,
//! `_bytes`); docs/METRICS.md lists them. None carries a record or a value of the data.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::status::Report;

/// A round's phases as the agent times them.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Phase {
    download,
    train,
    upload,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: Phase,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    pub version: String,
}

pub struct AgentMetrics {
    registry: Registry,
    pub updates_sent: Counter,
    pub updates_rejected: Counter,
    pub rounds_declined: Family<ReasonLabel, Counter>,
    pub phase_seconds: Family<PhaseLabel, Histogram>,
    pub sent_bytes: Counter,
    pub received_bytes: Counter,
    pub connected: Gauge,
    pub connection_failures: Counter,
    epsilon_spent: Gauge<f64, AtomicU64>,
    epsilon_budget: Gauge<f64, AtomicU64>,
    releases: Gauge,
    certificate_expiry: Gauge,
    training_notes: Gauge,
    corrections: Gauge,
    running: Gauge,
}

/// The process's metrics (one daemon per process; in-process test agents share them).
pub fn metrics() -> &'static AgentMetrics {
    static METRICS: OnceLock<AgentMetrics> = OnceLock::new();
    METRICS.get_or_init(AgentMetrics::new)
}

impl AgentMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("fedward_agent");
        let m = Self {
            updates_sent: Counter::default(),
            updates_rejected: Counter::default(),
            rounds_declined: Family::default(),
            phase_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.05, 2.0, 14))),
            sent_bytes: Counter::default(),
            received_bytes: Counter::default(),
            connected: Gauge::default(),
            connection_failures: Counter::default(),
            epsilon_spent: Gauge::default(),
            epsilon_budget: Gauge::default(),
            releases: Gauge::default(),
            certificate_expiry: Gauge::default(),
            training_notes: Gauge::default(),
            corrections: Gauge::default(),
            running: Gauge::default(),
            registry: Registry::default(),
        };
        let build: Family<BuildLabel, Gauge> = Family::default();
        build.get_or_create(&BuildLabel { version: env!("CARGO_PKG_VERSION").to_owned() }).set(1);
        registry.register("build_info", "The agent's version (always 1)", build);
        registry.register("updates_sent", "Updates the coordinator accepted from this site", m.updates_sent.clone());
        registry.register("updates_rejected", "Updates the coordinator rejected", m.updates_rejected.clone());
        registry.register("rounds_declined", "Rounds this site declined, by reason", m.rounds_declined.clone());
        registry.register_with_unit(
            "round_phase",
            "Time spent in each phase of a round (download, train, upload)",
            Unit::Seconds,
            m.phase_seconds.clone(),
        );
        registry.register_with_unit("sent", "Update bytes sent", Unit::Bytes, m.sent_bytes.clone());
        registry.register_with_unit("received", "Global-model bytes received", Unit::Bytes, m.received_bytes.clone());
        registry.register("connected", "1 while admitted by the coordinator", m.connected.clone());
        registry.register("connection_failures", "Connections lost or refused before admission", m.connection_failures.clone());
        registry.register("epsilon_spent", "Epsilon spent, from the site's ledger at the site's delta", m.epsilon_spent.clone());
        registry.register("epsilon_budget", "The site's own epsilon budget", m.epsilon_budget.clone());
        registry.register("releases", "Updates released (recorded in the ledger)", m.releases.clone());
        registry.register_with_unit(
            "certificate_expiry_timestamp",
            "When the site certificate expires (unix time)",
            Unit::Seconds,
            m.certificate_expiry.clone(),
        );
        registry.register("training_notes", "Training notes in the site's data file", m.training_notes.clone());
        registry.register("corrections", "Clinicians' corrections in the feedback file", m.corrections.clone());
        registry.register("running", "1 when the daemon is running", m.running.clone());
        Self { registry, ..m }
    }

    /// The exposition text, with the scrape-time figures taken from `report`.
    pub fn render(&self, report: &Report) -> String {
        if let Ok(p) = &report.privacy {
            self.epsilon_spent.set(p.epsilon_spent);
            self.epsilon_budget.set(p.epsilon_budget);
            self.releases.set(i64::try_from(p.releases).unwrap_or(i64::MAX));
        }
        if let Ok(c) = &report.certificate {
            self.certificate_expiry.set(c.not_after_unix);
        }
        if let Ok(n) = &report.training_notes {
            self.training_notes.set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        self.corrections.set(i64::try_from(report.corrections).unwrap_or(i64::MAX));
        self.running.set(i64::from(report.running));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let m = metrics();
        m.updates_sent.inc();
        m.phase_seconds.get_or_create(&PhaseLabel { phase: Phase::train }).observe(1.5);
        m.rounds_declined.get_or_create(&ReasonLabel { reason: "budget-exhausted".into() }).inc();
        let report = Report {
            running: true,
            daemon: None,
            privacy: Err("none".into()),
            certificate: Err("none".into()),
            training_notes: Ok(12),
            corrections: 3,
            validation_notes: None,
            global_model_received: None,
            attention: Vec::new(),
        };
        let text = m.render(&report);
        for name in [
            "fedward_agent_build_info{version=",
            "fedward_agent_updates_sent_total ",
            "fedward_agent_round_phase_seconds_bucket{le=",
            "fedward_agent_round_phase_seconds_count{phase=\"train\"}",
            "fedward_agent_rounds_declined_total{reason=\"budget-exhausted\"}",
            "fedward_agent_sent_bytes_total ",
            "fedward_agent_training_notes 12",
            "fedward_agent_corrections 3",
            "fedward_agent_running 1",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
