//! The coordinator's Prometheus metrics (`GET /metrics` on the admin endpoint, auditor
//! role). Counters and phase times are kept as the server works; what the coordinator's
//! durable state knows (the rounds in its history, each site's spend in its ledger) and what
//! its status shows (sites connected and enrolled, certificate expiries) is read at scrape
//! time, so those figures survive a restart.
//!
//! Names follow Prometheus conventions (`fedward_coordinator_` prefix, `_total`,
//! `_seconds`, `_bytes`); docs/METRICS.md lists them. None carries a record of any site.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// What the coordinator's state says at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub rounds_completed_in_history: u64,
    pub rounds_failed_in_history: u64,
    pub completed_rounds: u64,
    pub total_rounds: u64,
    pub sites_connected: usize,
    pub sites_enrolled: usize,
    pub paused: bool,
    /// Per site, from the ledger: epsilon after its last accepted update (`None`: no DP),
    /// updates accepted, the round of the last one.
    pub spend: Vec<(String, Option<f64>, u64, u64)>,
    /// Per site: its certificate's expiry (unix time).
    pub certificate_expiry: Vec<(String, i64)>,
    /// Per site: the epsilon budget its last hello declared (the site enforces it).
    pub declared_budget: Vec<(String, f64)>,
}

/// A round's phases as the coordinator sees them.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Phase {
    /// A site fetching the global model.
    download,
    /// Local training, as the sites that share their metrics report it.
    train,
    /// An update's bytes arriving.
    upload,
    /// Checking and folding one update.
    aggregate,
    /// Writing and sealing the checkpoint.
    checkpoint,
    /// A whole round, offer to sealed checkpoint.
    round,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: Phase,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabel {
    pub site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    pub version: String,
}

pub struct CoordinatorMetrics {
    registry: Registry,
    pub phase_seconds: Family<PhaseLabel, Histogram>,
    pub updates_accepted: Counter,
    pub updates_rejected: Family<CodeLabel, Counter>,
    pub received_bytes: Counter,
    pub sent_bytes: Counter,
    rounds: Family<OutcomeLabel, Gauge>,
    completed_rounds: Gauge,
    total_rounds: Gauge,
    sites_connected: Gauge,
    sites_enrolled: Gauge,
    paused: Gauge,
    epsilon_spent: Family<SiteLabel, Gauge<f64, AtomicU64>>,
    epsilon_budget: Family<SiteLabel, Gauge<f64, AtomicU64>>,
    updates_in_ledger: Family<SiteLabel, Gauge>,
    last_round: Family<SiteLabel, Gauge>,
    certificate_expiry: Family<SiteLabel, Gauge>,
}

/// The process's metrics.
pub fn metrics() -> &'static CoordinatorMetrics {
    static METRICS: OnceLock<CoordinatorMetrics> = OnceLock::new();
    METRICS.get_or_init(CoordinatorMetrics::new)
}

impl CoordinatorMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("fedward_coordinator");
        let m = Self {
            registry: Registry::default(),
            phase_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.01, 2.0, 18))),
            updates_accepted: Counter::default(),
            updates_rejected: Family::default(),
            received_bytes: Counter::default(),
            sent_bytes: Counter::default(),
            rounds: Family::default(),
            completed_rounds: Gauge::default(),
            total_rounds: Gauge::default(),
            sites_connected: Gauge::default(),
            sites_enrolled: Gauge::default(),
            paused: Gauge::default(),
            epsilon_spent: Family::default(),
            epsilon_budget: Family::default(),
            updates_in_ledger: Family::default(),
            last_round: Family::default(),
            certificate_expiry: Family::default(),
        };
        let build: Family<BuildLabel, Gauge> = Family::default();
        build.get_or_create(&BuildLabel { version: env!("CARGO_PKG_VERSION").to_owned() }).set(1);
        registry.register("build_info", "The coordinator's version (always 1)", build);
        registry.register_with_unit(
            "phase",
            "Time per phase: download, train (as sites report it), upload, aggregate, checkpoint, round",
            Unit::Seconds,
            m.phase_seconds.clone(),
        );
        registry.register("updates_accepted", "Updates accepted since the coordinator started", m.updates_accepted.clone());
        registry.register("updates_rejected", "Updates rejected since the coordinator started, by reject code", m.updates_rejected.clone());
        registry.register_with_unit("received", "Update bytes received", Unit::Bytes, m.received_bytes.clone());
        registry.register_with_unit("sent", "Global-model bytes sent", Unit::Bytes, m.sent_bytes.clone());
        registry.register("rounds", "Rounds in the coordinator's history, by outcome (completed, failed)", m.rounds.clone());
        registry.register("completed_rounds", "Rounds completed (the checkpoint's)", m.completed_rounds.clone());
        registry.register("total_rounds", "Rounds the federation is to run", m.total_rounds.clone());
        registry.register("sites_connected", "Sites connected now", m.sites_connected.clone());
        registry.register("sites_enrolled", "Sites enrolled", m.sites_enrolled.clone());
        registry.register("paused", "1 while an admin has paused the federation", m.paused.clone());
        registry.register(
            "epsilon_spent",
            "Each site's epsilon after its last accepted update, from the ledger (absent without DP)",
            m.epsilon_spent.clone(),
        );
        registry.register(
            "epsilon_budget",
            "The epsilon budget each site declared when it connected (the site enforces it; absent until declared)",
            m.epsilon_budget.clone(),
        );
        registry.register("ledger_updates", "Updates the ledger records as accepted, per site", m.updates_in_ledger.clone());
        registry.register("site_last_round", "The round of each site's last accepted update, from the ledger", m.last_round.clone());
        registry.register_with_unit(
            "certificate_expiry_timestamp",
            "When the certificate of each site's last connection expires (unix time)",
            Unit::Seconds,
            m.certificate_expiry.clone(),
        );
        Self { registry, ..m }
    }

    /// Times one phase.
    pub fn observe(&self, phase: Phase, secs: f64) {
        self.phase_seconds.get_or_create(&PhaseLabel { phase }).observe(secs);
    }

    /// The exposition text, with the scrape-time figures.
    pub fn render(&self, s: &Scrape) -> String {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.rounds.get_or_create(&OutcomeLabel { outcome: "completed".into() }).set(gauge(s.rounds_completed_in_history));
        self.rounds.get_or_create(&OutcomeLabel { outcome: "failed".into() }).set(gauge(s.rounds_failed_in_history));
        self.completed_rounds.set(gauge(s.completed_rounds));
        self.total_rounds.set(gauge(s.total_rounds));
        self.sites_connected.set(gauge(s.sites_connected as u64));
        self.sites_enrolled.set(gauge(s.sites_enrolled as u64));
        self.paused.set(i64::from(s.paused));
        for (site, epsilon, updates, last_round) in &s.spend {
            let site = SiteLabel { site: site.clone() };
            // Without DP the spend is unbounded: no figure rather than +Inf, which some
            // scrapers refuse.
            if let Some(e) = epsilon {
                self.epsilon_spent.get_or_create(&site).set(*e);
            }
            self.updates_in_ledger.get_or_create(&site).set(gauge(*updates));
            self.last_round.get_or_create(&site).set(gauge(*last_round));
        }
        for (site, budget) in &s.declared_budget {
            self.epsilon_budget.get_or_create(&SiteLabel { site: site.clone() }).set(*budget);
        }
        for (site, expiry) in &s.certificate_expiry {
            self.certificate_expiry.get_or_create(&SiteLabel { site: site.clone() }).set(*expiry);
        }
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
        m.updates_accepted.inc();
        m.updates_rejected.get_or_create(&CodeLabel { code: "digest-mismatch".into() }).inc();
        m.observe(Phase::aggregate, 0.2);
        let scrape = Scrape {
            rounds_completed_in_history: 3,
            rounds_failed_in_history: 1,
            completed_rounds: 3,
            total_rounds: 5,
            sites_connected: 2,
            sites_enrolled: 3,
            paused: false,
            spend: vec![("alpha".into(), Some(1.5), 3, 3), ("beta".into(), None, 1, 1)],
            certificate_expiry: vec![("alpha".into(), 1_800_000_000)],
            declared_budget: vec![("alpha".into(), 8.0)],
        };
        let text = m.render(&scrape);
        for line in [
            "fedward_coordinator_build_info{version=",
            "fedward_coordinator_updates_accepted_total ",
            "fedward_coordinator_updates_rejected_total{code=\"digest-mismatch\"} 1",
            "fedward_coordinator_phase_seconds_count{phase=\"aggregate\"}",
            "fedward_coordinator_rounds{outcome=\"failed\"} 1",
            "fedward_coordinator_sites_connected 2",
            "fedward_coordinator_epsilon_spent{site=\"alpha\"} 1.5",
            "fedward_coordinator_epsilon_budget{site=\"alpha\"} 8.0",
            "fedward_coordinator_certificate_expiry_timestamp_seconds{site=\"alpha\"} 1800000000",
            "fedward_coordinator_received_bytes_total ",
            "fedward_coordinator_site_last_round{site=\"beta\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("epsilon_spent{site=\"beta\"}"), "no DP, no epsilon");
    }
}
