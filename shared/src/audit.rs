//! The auditor's view of whole ledgers: integrity and epsilon verdicts, reconciliation of a
//! site against the coordinator, and the audit report (HTML with an inline SVG chart,
//! JSON, CSV).
//!
//! Built on [`crate::ledger`]: [`ledger::verify`] names edited, deleted, inserted and
//! reordered entries and bad seals; [`ledger::audit_releases`] and
//! [`ledger::audit_accepted`] recompute every epsilon from the recorded parameters, never
//! from the stored numbers; [`ledger::reconcile`] matches a site's releases with the
//! coordinator's accepted entries. This module turns their results into [`Finding`]s with
//! stable codes and a severity, and renders them.
//!
//! Pure: bytes in, verdicts and text out. Reading files and writing the report is the
//! command shell's job ([`crate::cli`]). The output types derive `Serialize` because
//! `report.json` is a schema auditors consume.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};

use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use crate::dp::Accountant;
use crate::html::escape as esc;
use crate::ledger::{self, AuditKind, Body, Entry, Mismatch, ProblemKind, UNDERCOUNT_TOLERANCE};
use crate::plan::PrivacyMode;
use crate::wire::SiteId;

/// What a ledger holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LedgerKind {
    /// No entries.
    Empty,
    /// A site's ledger: releases only.
    Site,
    /// The coordinator's ledger: accepted updates and seals.
    Coordinator,
    /// Both kinds of entries: not something fedward writes.
    Mixed,
}

impl fmt::Display for LedgerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "empty",
            Self::Site => "site",
            Self::Coordinator => "coordinator",
            Self::Mixed => "mixed",
        })
    }
}

/// How bad a finding is: any `Fail` makes the verdict fail (non-zero exit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Fail,
    Warn,
}

/// One thing an audit found, with a stable machine-readable `code`.
///
/// Codes: `malformed`, `truncated`, `edited`, `deleted`, `inserted`, `reordered`,
/// `chain-broken`, `bad-signature`, `unknown-key`, `epsilon-under-counted`,
/// `epsilon-before-mismatch`, `unaccountable` (all fail); `epsilon-over-counted`,
/// `no-privacy`, `signatures-unchecked`, `unsealed-tail`, `mixed-ledger`, `several-sites`, `empty` (warnings);
/// and for reconciliation `no-release-at-site`, `not-accepted`, `digest-mismatch`,
/// `parameter-mismatch`, `duplicate-round` (all fail).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub code: &'static str,
    /// 1-based line of the ledger file, where known.
    pub line: Option<usize>,
    /// The entry's `seq`, where the finding concerns one entry.
    pub seq: Option<u64>,
    pub message: String,
}

impl Finding {
    fn fail(code: &'static str, seq: Option<u64>, message: String) -> Self {
        Self { severity: Severity::Fail, code, line: None, seq, message }
    }

    fn warn(code: &'static str, message: String) -> Self {
        Self { severity: Severity::Warn, code, line: None, seq: None, message }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.severity {
            Severity::Fail => "FAIL",
            Severity::Warn => "warn",
        })?;
        match (self.seq, self.line) {
            (Some(seq), Some(line)) => write!(f, " seq {seq} (line {line})")?,
            (Some(seq), None) => write!(f, " seq {seq}")?,
            (None, Some(line)) => write!(f, " line {line}")?,
            (None, None) => {}
        }
        write!(f, " [{}]: {}", self.code, self.message)
    }
}

/// One recorded release (a site's `release` entry or a coordinator's `accepted` entry),
/// with its cumulative epsilon recomputed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundRow {
    /// `site` (from a site's ledger) or `coordinator` (declared in an accepted update).
    pub source: &'static str,
    pub site: String,
    pub round: u64,
    pub seq: u64,
    pub mode: String,
    pub noise_multiplier: f64,
    pub clip_norm: f64,
    pub sampling_rate: f64,
    pub steps: u64,
    pub examples: u64,
    /// The cumulative epsilon the entry states, at `stored_delta` (JSON `null`: unbounded).
    pub epsilon_stored: f64,
    pub stored_delta: f64,
    /// The cumulative epsilon recomputed from the parameters of this and every earlier
    /// release of the site, at `delta` (`None` when the parameters cannot be accounted).
    pub epsilon_recomputed: Option<f64>,
    pub delta: f64,
    pub update_digest: String,
    pub time: String,
}

/// One site's standing in a ledger.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SiteSummary {
    pub site: String,
    pub mode: Option<String>,
    pub releases: usize,
    /// Recomputed cumulative epsilon after the last release, at `delta`.
    pub final_epsilon: Option<f64>,
    pub delta: Option<f64>,
}

/// The verdict on one ledger.
#[derive(Clone, Debug, Serialize)]
pub struct LedgerAudit {
    pub kind: LedgerKind,
    pub entries: usize,
    pub releases: usize,
    pub accepted: usize,
    pub seals: usize,
    pub seals_verified: usize,
    pub seals_unchecked: usize,
    /// Entries after the last seal.
    pub unsealed_tail: usize,
    /// Id of the key seals were checked against.
    pub key_id: Option<String>,
    pub findings: Vec<Finding>,
    pub sites: Vec<SiteSummary>,
    pub rows: Vec<RoundRow>,
    /// The parsed entries, for reconciliation.
    #[serde(skip)]
    pub parsed: Vec<Entry>,
}

impl LedgerAudit {
    /// No failing finding.
    pub fn passed(&self) -> bool {
        self.findings.iter().all(|f| f.severity != Severity::Fail)
    }

    /// Failing findings.
    pub fn failures(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Fail).count()
    }
}

/// Audits one ledger file's bytes: chain and seals (against `trusted`, when given), then
/// every epsilon recomputed per site. Epsilons in `rows` and `sites` are at `delta` when
/// given, else at each entry's own delta. `delta` must be in (0, 1) (the caller checks).
pub fn audit_ledger(bytes: &[u8], trusted: Option<&VerifyingKey>, delta: Option<f64>) -> LedgerAudit {
    let report = ledger::verify(bytes, trusted);
    let mut findings: Vec<Finding> = report
        .problems
        .iter()
        .map(|p| Finding {
            severity: Severity::Fail,
            code: problem_code(&p.kind),
            line: Some(p.line),
            seq: p.seq,
            message: p.kind.to_string(),
        })
        .collect();
    let entries = report.entries;
    let count = |k: &str| entries.iter().filter(|e| e.body.kind() == k).count();
    let (releases, accepted, seals) = (count("release"), count("accepted"), count("seal"));
    let kind = match (releases > 0, accepted > 0 || seals > 0) {
        (false, false) => LedgerKind::Empty,
        (true, false) => LedgerKind::Site,
        (false, true) => LedgerKind::Coordinator,
        (true, true) => LedgerKind::Mixed,
    };

    // Epsilon audits, per site, from the parameters alone.
    let release_sites: BTreeSet<SiteId> = entries
        .iter()
        .filter_map(|e| match &e.body {
            Body::Release(r) => Some(r.site.clone()),
            _ => None,
        })
        .collect();
    let accepted_sites: BTreeSet<SiteId> = entries
        .iter()
        .filter_map(|e| match &e.body {
            Body::Accepted(a) => Some(a.site.clone()),
            _ => None,
        })
        .collect();
    for site in &release_sites {
        let mine: Vec<Entry> = entries.iter().filter(|e| matches!(&e.body, Body::Release(r) if &r.site == site)).cloned().collect();
        findings.extend(ledger::audit_releases(&mine).findings.iter().map(|f| audit_finding(f, "release")));
    }
    for site in &accepted_sites {
        findings.extend(ledger::audit_accepted(&entries, site).findings.iter().map(|f| audit_finding(f, "declared")));
    }

    let mut rows = Vec::new();
    let mut sites = Vec::new();
    for (source, set) in [("site", &release_sites), ("coordinator", &accepted_sites)] {
        for site in set {
            let (site_rows, summary, over) = replay(&entries, source, site, delta);
            rows.extend(site_rows);
            sites.push(summary);
            findings.extend(over);
        }
    }

    // Warnings: what the verdict cannot vouch for.
    if kind == LedgerKind::Empty {
        findings.push(Finding::warn("empty", "the ledger has no entries".into()));
    }
    if kind == LedgerKind::Mixed {
        findings.push(Finding::warn("mixed-ledger", "the ledger holds both site releases and coordinator entries".into()));
    }
    if release_sites.len() > 1 {
        let names: Vec<String> = release_sites.iter().map(ToString::to_string).collect();
        findings.push(Finding::warn("several-sites", format!("releases from several sites: {}", names.join(", "))));
    }
    if report.seals_unchecked > 0 {
        findings.push(Finding::warn(
            "signatures-unchecked",
            format!("{} seals not checked: give the coordinator's public key (ledger.pub)", report.seals_unchecked),
        ));
    }
    if matches!(kind, LedgerKind::Coordinator | LedgerKind::Mixed) && report.unsealed_tail > 0 {
        findings.push(Finding::warn(
            "unsealed-tail",
            format!(
                "{} entries after the last seal (a round in progress, or one that failed): no signature covers them yet",
                report.unsealed_tail
            ),
        ));
    }
    findings.sort_by_key(|f| (f.seq.unwrap_or(u64::MAX), f.severity));

    LedgerAudit {
        kind,
        entries: entries.len(),
        releases,
        accepted,
        seals,
        seals_verified: report.seals_verified,
        seals_unchecked: report.seals_unchecked,
        unsealed_tail: report.unsealed_tail,
        key_id: trusted.map(ledger::key_id),
        findings,
        sites,
        rows,
        parsed: entries,
    }
}

fn problem_code(kind: &ProblemKind) -> &'static str {
    match kind {
        ProblemKind::Malformed(_) => "malformed",
        ProblemKind::TruncatedFinalLine => "truncated",
        ProblemKind::Edited { .. } => "edited",
        ProblemKind::Deleted { .. } => "deleted",
        ProblemKind::Inserted => "inserted",
        ProblemKind::Reordered { .. } => "reordered",
        ProblemKind::ChainBroken { .. } => "chain-broken",
        ProblemKind::BadSignature => "bad-signature",
        ProblemKind::UnknownKey { .. } => "unknown-key",
    }
}

fn audit_finding(f: &ledger::AuditFinding, what: &str) -> Finding {
    let code = match f.kind {
        AuditKind::UnderCounted { .. } => "epsilon-under-counted",
        AuditKind::BeforeMismatch { .. } => "epsilon-before-mismatch",
        AuditKind::Unaccountable(_) => "unaccountable",
    };
    let message = match &f.kind {
        AuditKind::UnderCounted { stored, recomputed } => {
            format!("epsilon mismatch in the {what} for round {}: stored {stored}, recomputed {recomputed} from its parameters", f.round)
        }
        AuditKind::BeforeMismatch { stored_before, previous_after } => format!(
            "epsilon mismatch in round {}: epsilon before is {stored_before} but the previous release ended at {previous_after}",
            f.round
        ),
        AuditKind::Unaccountable(e) => format!("round {}: the {what} parameters cannot be accounted: {e}", f.round),
    };
    Finding::fail(code, Some(f.seq), message)
}

/// Recomputes one site's cumulative epsilon after each of its releases (`source` "site")
/// or accepted updates (`source` "coordinator"), in seq order.
fn replay(entries: &[Entry], source: &'static str, site: &SiteId, delta: Option<f64>) -> (Vec<RoundRow>, SiteSummary, Vec<Finding>) {
    let mut mine: Vec<(&Entry, ledger::Privacy, u64, u64, String, String)> = entries
        .iter()
        .filter_map(|e| match &e.body {
            Body::Release(r) if source == "site" && &r.site == site => {
                Some((e, r.privacy, r.round.0, r.examples, r.update_digest.to_hex(), r.time.clone()))
            }
            Body::Accepted(a) if source == "coordinator" && &a.site == site => {
                Some((e, a.privacy, a.round.0, a.examples, a.update_digest.to_hex(), a.time.clone()))
            }
            _ => None,
        })
        .collect();
    mine.sort_by_key(|m| m.0.seq);
    let mut acc = Accountant::new();
    let mut broken = false;
    let mut rows = Vec::with_capacity(mine.len());
    let mut over = Vec::new();
    let mut no_dp = 0;
    for (e, p, round, examples, digest, time) in mine {
        let at = delta.unwrap_or(p.delta);
        // Once a release cannot be accounted, nothing after it can be (the audit names it).
        broken = broken || acc.record(&p.release()).is_err();
        let recomputed = match (broken, p.mode) {
            (true, _) => None,
            // Without DP there is no delta to state epsilon at: it is unbounded.
            (false, PrivacyMode::Off) => Some(f64::INFINITY),
            (false, _) => acc.epsilon(at).ok(),
        };
        if p.mode == PrivacyMode::Off {
            no_dp += 1;
        }
        if !broken && p.mode != PrivacyMode::Off && p.epsilon_after.is_finite() {
            if let Ok(own) = acc.epsilon(p.delta) {
                if p.epsilon_after > own * (1.0 + 1e3 * UNDERCOUNT_TOLERANCE) + 1e-12 {
                    over.push(Finding {
                        severity: Severity::Warn,
                        code: "epsilon-over-counted",
                        line: None,
                        seq: Some(e.seq),
                        message: format!(
                            "round {round}: stored epsilon {} is above the recomputed {own} (conservative, but not what these parameters spend)",
                            p.epsilon_after
                        ),
                    });
                }
            }
        }
        rows.push(RoundRow {
            source,
            site: site.to_string(),
            round,
            seq: e.seq,
            mode: p.mode.to_string(),
            noise_multiplier: p.noise_multiplier,
            clip_norm: p.clip_norm,
            sampling_rate: p.sampling_rate,
            steps: p.steps,
            examples,
            epsilon_stored: p.epsilon_after,
            stored_delta: p.delta,
            epsilon_recomputed: recomputed,
            delta: at,
            update_digest: digest,
            time,
        });
    }
    if no_dp > 0 {
        over.push(Finding::warn(
            "no-privacy",
            format!(
                "site {site}: {no_dp} updates {} without differential privacy (epsilon unbounded)",
                if source == "site" { "released" } else { "accepted" }
            ),
        ));
    }
    let last = rows.last();
    let summary = SiteSummary {
        site: site.to_string(),
        mode: acc.mode().map(|m| m.to_string()),
        releases: rows.len(),
        final_epsilon: last.and_then(|r| r.epsilon_recomputed),
        delta: last.map(|r| r.delta),
    };
    (rows, summary, over)
}

/// A site reconciled against the coordinator.
#[derive(Clone, Debug, Serialize)]
pub struct ReconcileAudit {
    pub site: String,
    /// Rounds where both ledgers agree on the digest and every parameter.
    pub matched: usize,
    pub mismatches: Vec<Finding>,
    pub site_ledger: LedgerAudit,
    pub coordinator_ledger: LedgerAudit,
}

impl ReconcileAudit {
    /// Both ledgers pass and nothing disagrees in the unsafe direction (a release the
    /// coordinator never accepted is a warning: the site's count is the higher one).
    pub fn passed(&self) -> bool {
        !has_failure(&self.mismatches) && self.site_ledger.passed() && self.coordinator_ledger.passed()
    }
}

/// Audits both ledgers and matches `site`'s releases with the updates the coordinator
/// accepted from it.
pub fn reconcile_ledgers(site: &SiteId, site_bytes: &[u8], coordinator_bytes: &[u8], trusted: Option<&VerifyingKey>) -> ReconcileAudit {
    let site_ledger = audit_ledger(site_bytes, None, None);
    let coordinator_ledger = audit_ledger(coordinator_bytes, trusted, None);
    let report = ledger::reconcile(site, &site_ledger.parsed, &coordinator_ledger.parsed);
    ReconcileAudit {
        site: site.to_string(),
        matched: report.matched,
        mismatches: report.mismatches.iter().map(mismatch_finding).collect(),
        site_ledger,
        coordinator_ledger,
    }
}

fn has_failure(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Fail)
}

fn mismatch_finding(m: &Mismatch) -> Finding {
    let code = match m {
        Mismatch::NoReleaseAtSite { .. } => "no-release-at-site",
        Mismatch::NotAccepted { .. } => "not-accepted",
        Mismatch::DigestMismatch { .. } => "digest-mismatch",
        Mismatch::ParameterMismatch { .. } => "parameter-mismatch",
        Mismatch::DuplicateRound { .. } => "duplicate-round",
        Mismatch::NotSummed { .. } => "not-summed",
        Mismatch::SummedWithoutInput { .. } => "summed-without-input",
        Mismatch::TooFewSummed { .. } => "too-few-summed",
    };
    match m {
        // A release the coordinator did not take: rejected, late, or cut off by a crash
        // or a lost connection. The site counted it, so its budget is over-counted, never
        // under-counted: worth a look, not a failed audit.
        Mismatch::NotAccepted { .. } => {
            Finding::warn(code, format!("{m} (rejected, late or cut off? it still counts against the site's budget)"))
        }
        // A masked input that was sent and not summed (the site dropped after sending):
        // the same over-count.
        Mismatch::NotSummed { .. } => Finding::warn(code, format!("{m} (it dropped? it still counts against the site's budget)")),
        _ => Finding::fail(code, None, m.to_string()),
    }
}

/// A ledger in a report, named by the file it came from.
#[derive(Clone, Debug, Serialize)]
pub struct NamedAudit {
    pub name: String,
    pub audit: LedgerAudit,
}

/// One site's reconciliation in a report.
#[derive(Clone, Debug, Serialize)]
pub struct ReconcileSummary {
    pub site: String,
    pub ledger: String,
    pub matched: usize,
    pub mismatches: Vec<Finding>,
}

/// Everything `audit report` writes.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub generated_at: String,
    pub passed: bool,
    /// The delta every recomputed epsilon is at (`None`: each entry's own).
    pub delta: Option<f64>,
    pub ledgers: Vec<NamedAudit>,
    pub coordinator: Option<NamedAudit>,
    pub reconciliations: Vec<ReconcileSummary>,
}

impl Report {
    /// Every row of every ledger, site ledgers first.
    pub fn rows(&self) -> impl Iterator<Item = (&str, &RoundRow)> {
        self.ledgers.iter().chain(&self.coordinator).flat_map(|n| n.audit.rows.iter().map(move |r| (n.name.as_str(), r)))
    }
}

/// Audits site ledgers and, optionally, the coordinator's, reconciling each site ledger's
/// site against it. `generated_at` is the caller's clock, shown in the report; `auditing`
/// hears each ledger's name as its audit starts (a command's progress).
pub fn build_report(
    site_ledgers: &[(String, Vec<u8>)],
    coordinator: Option<(String, Vec<u8>)>,
    trusted: Option<&VerifyingKey>,
    delta: Option<f64>,
    generated_at: String,
    auditing: &mut dyn FnMut(&str),
) -> Report {
    let mut audit_named = |name: &str, bytes: &[u8]| {
        auditing(name);
        NamedAudit { name: name.to_owned(), audit: audit_ledger(bytes, trusted, delta) }
    };
    let ledgers: Vec<NamedAudit> = site_ledgers.iter().map(|(name, bytes)| audit_named(name, bytes)).collect();
    let coordinator = coordinator.map(|(name, bytes)| audit_named(&name, &bytes));
    let mut reconciliations = Vec::new();
    if let Some(c) = &coordinator {
        for l in &ledgers {
            for s in l.audit.sites.iter().filter(|s| l.audit.rows.iter().any(|r| r.source == "site" && r.site == s.site)) {
                let Ok(site) = SiteId::new(s.site.clone()) else { continue };
                let r = ledger::reconcile(&site, &l.audit.parsed, &c.audit.parsed);
                reconciliations.push(ReconcileSummary {
                    site: s.site.clone(),
                    ledger: l.name.clone(),
                    matched: r.matched,
                    mismatches: r.mismatches.iter().map(mismatch_finding).collect(),
                });
            }
        }
    }
    let passed =
        ledgers.iter().chain(&coordinator).all(|n| n.audit.passed()) && reconciliations.iter().all(|r| !has_failure(&r.mismatches));
    Report { generated_at, passed, delta, ledgers, coordinator, reconciliations }
}

/// `report.json`.
pub fn render_json(report: &Report) -> String {
    // Plain data with string keys: serialising cannot fail.
    let mut s = serde_json::to_string_pretty(report).expect("report serialises");
    s.push('\n');
    s
}

/// Columns of `report.csv`.
pub const CSV_HEADER: &str = "ledger,source,site,round,seq,mode,noise_multiplier,clip_norm,sampling_rate,steps,examples,epsilon_stored,stored_delta,epsilon_recomputed,delta,update_digest,time";

/// `report.csv`: one row per recorded release, every ledger.
pub fn render_csv(report: &Report) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for (ledger, r) in report.rows() {
        let fields = [
            csv_field(ledger),
            r.source.to_owned(),
            csv_field(&r.site),
            r.round.to_string(),
            r.seq.to_string(),
            r.mode.clone(),
            r.noise_multiplier.to_string(),
            r.clip_norm.to_string(),
            r.sampling_rate.to_string(),
            r.steps.to_string(),
            r.examples.to_string(),
            r.epsilon_stored.to_string(),
            r.stored_delta.to_string(),
            r.epsilon_recomputed.map(|e| e.to_string()).unwrap_or_default(),
            r.delta.to_string(),
            r.update_digest.clone(),
            csv_field(&r.time),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// The verdict on one ledger as text, for `audit verify`.
pub fn render_verify_text(name: &str, a: &LedgerAudit) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "ledger {name}: {} ledger, {} entries ({} releases, {} accepted, {} seals)",
        a.kind, a.entries, a.releases, a.accepted, a.seals
    );
    if a.seals > 0 {
        let key = a.key_id.as_deref().map(|k| format!(" with key {k}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "  seals: {} verified{key}, {} unchecked; {} entries after the last seal",
            a.seals_verified, a.seals_unchecked, a.unsealed_tail
        );
    }
    for site in &a.sites {
        let source =
            if a.rows.iter().any(|r| r.site == site.site && r.source == "site") { "released" } else { "declared to the coordinator" };
        let _ = writeln!(
            s,
            "  site {}: {} updates {source}, mode {}, recomputed epsilon {} at delta {}",
            site.site,
            site.releases,
            site.mode.as_deref().unwrap_or("-"),
            site.final_epsilon.map_or("-".into(), fmt_eps),
            site.delta.map_or("-".into(), |d| d.to_string())
        );
    }
    render_findings(&mut s, &a.findings);
    let warnings = a.findings.len() - a.failures();
    if a.passed() {
        let _ = writeln!(s, "verdict: PASS ({warnings} warnings)");
    } else {
        let _ = writeln!(s, "verdict: FAIL ({} problems, {warnings} warnings)", a.failures());
    }
    s
}

/// The reconciliation as text, for `audit reconcile`.
pub fn render_reconcile_text(site_name: &str, coordinator_name: &str, r: &ReconcileAudit) -> String {
    let mut s = String::new();
    for (name, a) in [(site_name, &r.site_ledger), (coordinator_name, &r.coordinator_ledger)] {
        let _ = writeln!(s, "ledger {name}: {} ledger, {} entries, {} problems", a.kind, a.entries, a.failures());
        render_findings(&mut s, &a.findings);
    }
    let fails = r.mismatches.iter().filter(|f| f.severity == Severity::Fail).count();
    let _ = writeln!(s, "site {}: {} rounds match, {fails} mismatches, {} warnings", r.site, r.matched, r.mismatches.len() - fails);
    render_findings(&mut s, &r.mismatches);
    let _ = writeln!(s, "verdict: {}", if r.passed() { "PASS" } else { "FAIL" });
    s
}

fn render_findings(s: &mut String, findings: &[Finding]) {
    for f in findings {
        let _ = writeln!(s, "  {f}");
    }
}

fn fmt_eps(e: f64) -> String {
    if e.is_finite() {
        format!("{e:.4}")
    } else {
        "unbounded".into()
    }
}

/// `report.html`: one self-contained page (inline CSS and SVG, no script, no external
/// asset).
pub fn render_html(report: &Report) -> String {
    let mut h = String::new();
    let verdict = if report.passed { "PASS" } else { "FAIL" };
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>fedward privacy audit: {verdict}</title>\n<style>{CSS}</style></head><body>\n"
    );
    let _ = writeln!(h, "<h1>fedward privacy audit</h1>");
    let _ = writeln!(h, "<p class=\"verdict {}\">Verdict: {verdict}</p>", if report.passed { "pass" } else { "fail" });
    let delta = report.delta.map_or("each entry's own delta".to_owned(), |d| format!("delta = {d}"));
    let _ = writeln!(
        h,
        "<p>Generated {}. Every epsilon below is recomputed from the recorded parameters ({}), never copied from the ledger.</p>",
        esc(&report.generated_at),
        esc(&delta)
    );

    let _ = writeln!(h, "<h2>Cumulative epsilon per site</h2>");
    h.push_str(&chart_svg(report));

    let _ = writeln!(h, "<h2>Ledgers</h2>\n<table><tr><th>ledger</th><th>kind</th><th>entries</th><th>seals verified</th><th>unsealed</th><th>problems</th><th>verdict</th></tr>");
    for n in report.ledgers.iter().chain(&report.coordinator) {
        let a = &n.audit;
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
            esc(&n.name),
            a.kind,
            a.entries,
            a.seals_verified,
            a.seals,
            a.unsealed_tail,
            a.failures(),
            if a.passed() { "pass" } else { "fail" },
            if a.passed() { "PASS" } else { "FAIL" }
        );
    }
    let _ = writeln!(h, "</table>");

    let _ = writeln!(h, "<h2>Sites</h2>\n<table><tr><th>ledger</th><th>site</th><th>mode</th><th>updates</th><th>recomputed epsilon</th><th>delta</th></tr>");
    for n in report.ledgers.iter().chain(&report.coordinator) {
        for s in &n.audit.sites {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&n.name),
                esc(&s.site),
                esc(s.mode.as_deref().unwrap_or("-")),
                s.releases,
                s.final_epsilon.map_or("-".into(), fmt_eps),
                s.delta.map_or("-".into(), |d| d.to_string())
            );
        }
    }
    let _ = writeln!(h, "</table>");

    let _ = writeln!(h, "<h2>Findings</h2>");
    let mut any = false;
    for n in report.ledgers.iter().chain(&report.coordinator) {
        if n.audit.findings.is_empty() {
            continue;
        }
        any = true;
        let _ = writeln!(h, "<h3>{}</h3>\n<ul>", esc(&n.name));
        for f in &n.audit.findings {
            let _ = writeln!(h, "<li class=\"{}\">{}</li>", severity_class(f.severity), esc(&f.to_string()));
        }
        let _ = writeln!(h, "</ul>");
    }
    if !any {
        let _ = writeln!(h, "<p>No findings: every chain link, seal and epsilon checked out.</p>");
    }

    if report.coordinator.is_some() {
        let _ = writeln!(h, "<h2>Reconciliation with the coordinator</h2>\n<table><tr><th>site</th><th>ledger</th><th>rounds matched</th><th>mismatches</th></tr>");
        for r in &report.reconciliations {
            let list: Vec<String> = r.mismatches.iter().map(|f| esc(&f.message)).collect();
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                esc(&r.site),
                esc(&r.ledger),
                r.matched,
                if list.is_empty() { "pass" } else { "fail" },
                if list.is_empty() { "none".to_owned() } else { list.join("<br>") }
            );
        }
        let _ = writeln!(h, "</table>");
    }

    let _ = writeln!(h, "<h2>Rounds and parameters</h2>\n<table><tr><th>ledger</th><th>source</th><th>site</th><th>round</th><th>seq</th><th>mode</th><th>sigma</th><th>clip</th><th>q</th><th>steps</th><th>examples</th><th>epsilon stored</th><th>epsilon recomputed</th><th>delta</th><th>update</th><th>time</th></tr>");
    for (ledger, r) in report.rows() {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td title=\"{}\">{}</td><td>{}</td></tr>",
            esc(ledger),
            r.source,
            esc(&r.site),
            r.round,
            r.seq,
            esc(&r.mode),
            r.noise_multiplier,
            r.clip_norm,
            r.sampling_rate,
            r.steps,
            r.examples,
            fmt_eps(r.epsilon_stored),
            r.epsilon_recomputed.map_or("-".into(), fmt_eps),
            r.delta,
            esc(&r.update_digest),
            esc(&r.update_digest[..r.update_digest.len().min(12)]),
            esc(&r.time)
        );
    }
    let _ = writeln!(h, "</table>");
    let _ = writeln!(h, "<p class=\"note\">A site's ledger is a hash chain: it shows edits, deletions, insertions and reordering, but a site that rewrites its whole file can recompute every hash. Reconciliation against the coordinator's ledger, whose rounds are sealed with the coordinator's ed25519 key, is what anchors it.</p>");
    h.push_str("</body></html>\n");
    h
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:0.25em 0.5em;text-align:left}th{background:#f3f3f3}.verdict{font-size:1.4em;font-weight:bold}.pass{color:#176a2c}.fail{color:#b00020}.warn{color:#8a5a00}.note{color:#555;font-size:0.9em}svg text{font-size:11px}";

fn severity_class(s: Severity) -> &'static str {
    match s {
        Severity::Fail => "fail",
        Severity::Warn => "warn",
    }
}

const COLOURS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

/// The chart's series: each site's recomputed epsilon by round, from its own ledger, or
/// from the coordinator's accepted entries when no site ledger was given for it.
fn chart_series(report: &Report) -> BTreeMap<String, Vec<(u64, f64)>> {
    let mut series: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for n in &report.ledgers {
        for r in n.audit.rows.iter().filter(|r| r.source == "site") {
            if let Some(e) = r.epsilon_recomputed.filter(|e| e.is_finite()) {
                series.entry(r.site.clone()).or_default().push((r.round, e));
            }
        }
    }
    if let Some(c) = &report.coordinator {
        let mut declared: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
        for r in &c.audit.rows {
            if series.contains_key(&r.site) {
                continue;
            }
            if let Some(e) = r.epsilon_recomputed.filter(|e| e.is_finite()) {
                declared.entry(format!("{} (declared to the coordinator)", r.site)).or_default().push((r.round, e));
            }
        }
        series.extend(declared);
    }
    series
}

fn chart_svg(report: &Report) -> String {
    let series = chart_series(report);
    if series.is_empty() {
        return "<p>No finite epsilon to plot.</p>\n".into();
    }
    let (w, hgt, left, right, top, bottom) = (720.0, 320.0, 60.0, 20.0, 20.0, 40.0);
    let points = series.values().flatten();
    let max_round = points.clone().map(|p| p.0).max().unwrap_or(1).max(1);
    let min_round = points.clone().map(|p| p.0).min().unwrap_or(0).min(max_round);
    let max_eps = points.map(|p| p.1).fold(0.0f64, f64::max);
    let max_eps = if max_eps > 0.0 { max_eps * 1.1 } else { 1.0 };
    let span = (max_round - min_round).max(1) as f64;
    let x = |r: u64| left + (r - min_round) as f64 / span * (w - left - right);
    let y = |e: f64| top + (1.0 - e / max_eps) * (hgt - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" viewBox=\"0 0 {w} {}\" role=\"img\" aria-label=\"cumulative epsilon per site over rounds\">",
        hgt + 20.0 * series.len() as f64,
        hgt + 20.0 * series.len() as f64
    );
    // Axes and ticks.
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#444\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"#444\"/>",
        hgt - bottom,
        w - right,
        hgt - bottom,
        hgt - bottom
    );
    for i in 0..=4 {
        let e = max_eps * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{:.1}\" x2=\"{left}\" y2=\"{:.1}\" stroke=\"#444\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.2}</text>",
            left - 4.0,
            y(e),
            y(e),
            left - 6.0,
            y(e) + 4.0,
            e
        );
    }
    let stride = ((max_round - min_round) / 12).max(1);
    let mut r = min_round;
    while r <= max_round {
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{r}</text>", x(r), hgt - bottom + 16.0);
        r += stride;
    }
    let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">round</text>", (left + w - right) / 2.0, hgt - 4.0);
    let _ = writeln!(
        s,
        "<text x=\"12\" y=\"{:.1}\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">epsilon</text>",
        hgt / 2.0,
        hgt / 2.0
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = pts.iter().map(|&(r, e)| format!("{:.1},{:.1}", x(r), y(e))).collect();
        let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>", path.join(" "));
        for &(r, e) in pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"><title>{} round {r}: epsilon {}</title></circle>",
                x(r),
                y(e),
                esc(name),
                fmt_eps(e)
            );
        }
        let ly = hgt + 14.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{colour}\"/><text x=\"{}\" y=\"{:.1}\">{}</text>",
            ly - 10.0,
            left + 18.0,
            ly,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use ed25519_dalek::SigningKey;
    use time::macros::datetime;

    use super::*;
    use crate::dp::Release;
    use crate::ledger::{format_time, AcceptedRecord, Ledger, Privacy, ReleaseRecord};
    use crate::tensor::Digest;
    use crate::wire::RoundId;

    pub(crate) fn key() -> SigningKey {
        SigningKey::from_bytes(&[11u8; 32])
    }

    fn digest(site: &str, round: u64) -> Digest {
        Digest(*blake3::hash(format!("{site}/{round}").as_bytes()).as_bytes())
    }

    /// Honest site-level releases of `site` for rounds 1..=n.
    pub(crate) fn site_ledger(site: &str, n: u64) -> Ledger {
        let mut ledger = Ledger::new();
        let mut acc = Accountant::new();
        for round in 1..=n {
            let before = acc.epsilon(1e-5).unwrap();
            acc.record(&Release::site_level(4.0)).unwrap();
            let after = acc.epsilon(1e-5).unwrap();
            let privacy = Privacy {
                score: None,
                mode: PrivacyMode::SiteLevel,
                noise_multiplier: 4.0,
                clip_norm: 1.0,
                sampling_rate: 0.0,
                steps: 1,
                update_clip_norm: 1.0,
                epsilon_after: after,
                delta: 1e-5,
                distributed: None,
            };
            ledger
                .append(Body::Release(ReleaseRecord {
                    site: SiteId::new(site).unwrap(),
                    round: RoundId(round),
                    privacy,
                    examples: 100 * round,
                    epsilon_before: before,
                    update_digest: digest(site, round),
                    time: format_time(datetime!(2025-03-01 12:00 UTC) + time::Duration::hours(round as i64)).unwrap(),
                }))
                .unwrap();
        }
        ledger
    }

    /// The coordinator's ledger for these site ledgers, sealed after every round.
    pub(crate) fn coordinator_ledger(sites: &[&Ledger], key: &SigningKey) -> Ledger {
        let mut by_round: BTreeMap<RoundId, Vec<&ReleaseRecord>> = BTreeMap::new();
        for l in sites {
            for e in l.entries() {
                if let Body::Release(r) = &e.body {
                    by_round.entry(r.round).or_default().push(r);
                }
            }
        }
        let mut ledger = Ledger::new();
        for (round, releases) in by_round {
            for r in releases {
                ledger
                    .append(Body::Accepted(AcceptedRecord {
                        site: r.site.clone(),
                        round,
                        privacy: r.privacy,
                        examples: r.examples,
                        update_digest: r.update_digest,
                        time: r.time.clone(),
                    }))
                    .unwrap();
            }
            let seal = ledger.prepare_seal(round, key, datetime!(2025-03-02 00:00 UTC)).unwrap();
            ledger.push(seal).unwrap();
        }
        ledger
    }

    #[test]
    fn clean_ledgers_pass_with_recomputed_epsilons() {
        let a = site_ledger("alpha", 3);
        let audit = audit_ledger(&a.to_bytes(), None, None);
        assert!(audit.passed(), "{:?}", audit.findings);
        assert!(audit.findings.is_empty(), "{:?}", audit.findings);
        assert_eq!(audit.kind, LedgerKind::Site);
        assert_eq!(audit.rows.len(), 3);
        let stored: Vec<f64> = audit.rows.iter().map(|r| r.epsilon_stored).collect();
        let recomputed: Vec<f64> = audit.rows.iter().map(|r| r.epsilon_recomputed.unwrap()).collect();
        assert_eq!(stored, recomputed);
        // At another delta the figures move, and stay increasing.
        let wide = audit_ledger(&a.to_bytes(), None, Some(1e-3));
        let at = wide.rows.iter().map(|r| r.epsilon_recomputed.unwrap()).collect::<Vec<_>>();
        assert!(at.windows(2).all(|w| w[1] > w[0]) && at[2] < recomputed[2], "{at:?}");

        let b = site_ledger("beta", 3);
        let c = coordinator_ledger(&[&a, &b], &key());
        let vk = key().verifying_key();
        let audit = audit_ledger(&c.to_bytes(), Some(&vk), None);
        assert!(audit.findings.is_empty(), "{:?}", audit.findings);
        assert_eq!((audit.kind, audit.seals, audit.seals_verified, audit.accepted), (LedgerKind::Coordinator, 3, 3, 6));
        assert_eq!(audit.sites.iter().map(|s| s.site.as_str()).collect::<Vec<_>>(), ["alpha", "beta"]);
        // Without the key the seals are unchecked: a warning, not a pass on faith.
        let audit = audit_ledger(&c.to_bytes(), None, None);
        assert!(audit.passed());
        assert_eq!(audit.findings.iter().map(|f| f.code).collect::<Vec<_>>(), ["signatures-unchecked"]);
    }

    #[test]
    fn a_lowered_epsilon_is_named_even_when_rechained() {
        let honest = site_ledger("alpha", 3);
        let mut forged = Ledger::new();
        for e in honest.entries() {
            let mut body = e.body.clone();
            if let Body::Release(r) = &mut body {
                if r.round == RoundId(2) {
                    r.privacy.epsilon_after /= 2.0;
                }
            }
            forged.append(body).unwrap();
        }
        let audit = audit_ledger(&forged.to_bytes(), None, None);
        assert!(!audit.passed());
        let codes: Vec<(Option<u64>, &str)> = audit.findings.iter().map(|f| (f.seq, f.code)).collect();
        assert_eq!(codes, [(Some(1), "epsilon-under-counted"), (Some(2), "epsilon-before-mismatch")]);
        assert!(audit.findings[0].to_string().contains("epsilon mismatch"), "{}", audit.findings[0]);
    }

    #[test]
    fn reconcile_names_missing_extra_and_different_updates() {
        let a = site_ledger("alpha", 3);
        let c = coordinator_ledger(&[&a], &key());
        let vk = key().verifying_key();
        let site = SiteId::new("alpha").unwrap();
        let r = reconcile_ledgers(&site, &a.to_bytes(), &c.to_bytes(), Some(&vk));
        assert!(r.passed(), "{:?}", r.mismatches);
        assert_eq!(r.matched, 3);
        let a4 = site_ledger("alpha", 4);
        let r = reconcile_ledgers(&site, &a4.to_bytes(), &c.to_bytes(), Some(&vk));
        // Released but never accepted: the site over-counts, the safe direction.
        assert_eq!(r.mismatches.iter().map(|f| (f.code, f.severity)).collect::<Vec<_>>(), [("not-accepted", Severity::Warn)]);
        assert!(r.passed());
        // Accepted but never released: the site's ledger under-counts.
        let a2 = site_ledger("alpha", 2);
        let r = reconcile_ledgers(&site, &a2.to_bytes(), &c.to_bytes(), Some(&vk));
        assert_eq!(r.mismatches.iter().map(|f| (f.code, f.severity)).collect::<Vec<_>>(), [("no-release-at-site", Severity::Fail)]);
        assert!(!r.passed());
    }

    #[test]
    fn report_renders_every_format() {
        let a = site_ledger("alpha", 2);
        let b = site_ledger("beta", 2);
        let c = coordinator_ledger(&[&a, &b], &key());
        let vk = key().verifying_key();
        let mut audited = Vec::new();
        let report = build_report(
            &[("alpha.jsonl".into(), a.to_bytes()), ("beta.jsonl".into(), b.to_bytes())],
            Some(("coordinator.jsonl".into(), c.to_bytes())),
            Some(&vk),
            None,
            "2025-03-03T00:00:00Z".into(),
            &mut |name| audited.push(name.to_owned()),
        );
        assert_eq!(audited, ["alpha.jsonl", "beta.jsonl", "coordinator.jsonl"], "each ledger's audit is announced");
        assert!(report.passed);
        assert_eq!(report.reconciliations.len(), 2);
        let csv = render_csv(&report);
        assert_eq!(csv.lines().count(), 1 + 2 + 2 + 4, "{csv}");
        assert!(csv.lines().any(|l| l.starts_with("alpha.jsonl,site,alpha,2,1,site-level,4,")), "{csv}");
        let html = render_html(&report);
        assert!(html.contains("<svg") && html.contains("<polyline") && html.contains("Verdict: PASS"));
        // Self-contained: no script, and the only URL is the SVG namespace.
        assert!(!html.contains("<script"));
        assert_eq!(html.matches("http").count(), 1);
        let json: serde_json::Value = serde_json::from_str(&render_json(&report)).unwrap();
        assert_eq!(json["passed"], true);
        assert_eq!(json["ledgers"][0]["audit"]["rows"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn html_escapes_names() {
        let a = site_ledger("alpha", 1);
        let report = build_report(&[("<b>x</b>.jsonl".into(), a.to_bytes())], None, None, None, "now".into(), &mut |_| {});
        let html = render_html(&report);
        assert!(html.contains("&lt;b&gt;x&lt;/b&gt;.jsonl") && !html.contains("<b>x</b>"));
    }
}
