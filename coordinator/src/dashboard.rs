//! The admin dashboard: one HTML page rendered from the server's [`StatusView`], the round
//! history (`state.json`) and the coordinator's ledger, with inline SVG charts and a few
//! lines of plain JavaScript (the countdown to the round's deadline). Nothing is fetched
//! from anywhere else: the page is this module's output.
//!
//! Where each figure comes from: connection, last seen, software, certificate expiry and
//! last update's size and time from [`StatusView::sites`] (what this process has seen since
//! it started); epsilon spent from the ledger's `accepted` entries (the cumulative epsilon
//! each site declared with its last accepted update, which the round machine checked
//! against its own accounting) set against the budget the site declared in its hello
//! (only the site enforces it; the page says so); rounds from the history. A site that
//! declined a round because the round would exceed its budget is marked. Nothing per record is shown, only per-site and per-round
//! figures. Pure: text in, text out (the admin shell reads the files).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use fedward_shared::history::RoundRecord;
use fedward_shared::ledger::{Body, Entry};
use fedward_shared::plan::PrivacyMode;
use fedward_shared::wire::DeclineReason;

use crate::server::StatusView;

/// What the ledger says a site has spent (`GET /api/privacy`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SiteSpend {
    pub site: String,
    /// Updates accepted from it.
    pub updates: u64,
    /// Its cumulative epsilon at `delta` after its last accepted update; `None` when that
    /// update was sent without differential privacy (unbounded).
    pub epsilon: Option<f64>,
    pub delta: f64,
    pub mode: String,
    pub last_round: u64,
    /// RFC 3339: when its last update was accepted.
    pub last_accepted: String,
}

/// Per-site spend from the ledger's text (JSON lines); lines that do not parse are skipped
/// (the coordinator verified the whole file when it opened it).
pub fn ledger_spend(ledger: &str) -> BTreeMap<String, SiteSpend> {
    let mut out: BTreeMap<String, SiteSpend> = BTreeMap::new();
    for line in ledger.lines() {
        let Ok(entry) = serde_json::from_str::<Entry>(line) else { continue };
        let Body::Accepted(a) = entry.body else { continue };
        let site = a.site.to_string();
        let updates = out.get(&site).map_or(0, |s| s.updates) + 1;
        let bounded = a.privacy.mode != PrivacyMode::Off && a.privacy.epsilon_after.is_finite();
        out.insert(
            site.clone(),
            SiteSpend {
                site,
                updates,
                epsilon: bounded.then_some(a.privacy.epsilon_after),
                delta: a.privacy.delta,
                mode: a.privacy.mode.as_str().to_owned(),
                last_round: a.round.0,
                last_accepted: a.time,
            },
        );
    }
    out
}

/// The page, as of `now`.
pub fn render(status: &StatusView, history: &[RoundRecord], spend: &BTreeMap<String, SiteSpend>, now: OffsetDateTime) -> String {
    let budget_declined = budget_declines(history);
    let mut page = String::with_capacity(16 * 1024);
    page.push_str(HEAD);
    let _ = write!(page, "<header><h1>fedward coordinator</h1>{}</header>", summary(status, now));
    let _ = write!(page, "<section><h2>Sites</h2>{}</section>", sites_table(status, spend, &budget_declined, now));
    let _ = write!(
        page,
        "<section class='charts'><div><h2>Rounds</h2>{}</div><div><h2>Privacy budgets</h2>{}</div></section>",
        rounds_chart(history),
        privacy_chart(status, spend, &budget_declined)
    );
    let _ = write!(page, "<section><h2>Round history</h2>{}</section>", rounds_table(history));
    page.push_str(TAIL);
    page
}

const HEAD: &str = r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>fedward coordinator</title><style>
body{font-family:system-ui,sans-serif;margin:1.5rem 2rem;color:#222;background:#fafafa}
h1{margin:0 0 .4rem;font-size:1.5rem} h2{font-size:1.1rem;margin:1.2rem 0 .5rem}
header{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8rem 1rem}
.kv>span{margin-right:1.6rem;white-space:nowrap} .kv b{color:#555;font-weight:600}
table{border-collapse:collapse;background:#fff;font-size:.9rem} td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f0f0f0} .on{color:#070;font-weight:600} .off{color:#888} .warn{color:#b00;font-weight:600} .muted{color:#888}
.charts{display:flex;flex-wrap:wrap;gap:2rem} .charts svg{background:#fff;border:1px solid #ddd;border-radius:6px}
code{background:#eee;padding:0 .3rem} .paused{color:#a00;font-weight:700} .fail{color:#b00}
</style></head><body>
"#;

const TAIL: &str = r#"<p class="muted">Refreshes every 10 s. Epsilon: each site's cumulative spend as declared with its last update the coordinator accepted (its ledger). Budget: what the site declared when it connected (its <code>[budget]</code>); the site alone enforces it (<code>fedward-agent status</code> there); a bar is full when the budget is spent, red from 90%; sites that declined a round for their budget are marked.</p>
<script>
(function(){var el=document.getElementById('time-left');if(!el||!el.dataset.deadline)return;
var end=Date.parse(el.dataset.deadline);function tick(){var s=Math.max(0,Math.round((end-Date.now())/1000));
el.textContent=(s>=3600?Math.floor(s/3600)+'h ':'')+(s>=60?Math.floor(s%3600/60)+'m ':'')+(s%60)+'s';}
tick();setInterval(tick,1000);})();
</script></body></html>
"#;

/// Sites that declined a round because it would exceed their budget: the last such round.
fn budget_declines(history: &[RoundRecord]) -> BTreeMap<String, u64> {
    let reason = DeclineReason::BudgetExhausted.to_string();
    let mut out = BTreeMap::new();
    for r in history {
        for (site, why) in &r.declined {
            // Recorded as `BudgetExhausted: <its description>`.
            if why.contains(&reason) {
                out.insert(site.clone(), r.round);
            }
        }
    }
    out
}

fn summary(status: &StatusView, now: OffsetDateTime) -> String {
    let time_left = match status.deadline.as_deref() {
        Some(d) => {
            let left = parse(d).map_or(String::from("?"), |end| duration_text((end - now).whole_seconds().max(0)));
            format!(" <span><b>Time left:</b> <span id='time-left' data-deadline='{}'>{left}</span></span>", esc(d))
        }
        None => String::new(),
    };
    let open = match status.open_round {
        Some(r) => format!("<span><b>Open round:</b> {r} ({} of {} offered sites sent updates)</span>", status.accepted, status.offered),
        None => String::new(),
    };
    format!(
        "<div class='kv'><span><b>Phase:</b> <span id='phase'>{phase}</span>{paused}</span>{time_left}{open}\
         <span><b>Rounds completed:</b> <span id='rounds-completed'>{done}</span> of {total}</span>\
         <span><b>Sites connected:</b> {on} of {enrolled}</span></div>\
         <div class='kv'><span><b>Global model:</b> <code>{digest}</code></span></div>",
        phase = esc(&status.phase),
        paused = if status.paused { " <span class='paused'>(paused by an admin)</span>" } else { "" },
        done = status.completed_rounds,
        total = status.total_rounds,
        on = status.connected.len(),
        enrolled = status.enrolled.len(),
        digest = esc(status.model_digest.get(..16).unwrap_or(&status.model_digest)),
    )
}

fn sites_table(
    status: &StatusView,
    spend: &BTreeMap<String, SiteSpend>,
    budget_declined: &BTreeMap<String, u64>,
    now: OffsetDateTime,
) -> String {
    let mut rows = String::new();
    for name in &status.enrolled {
        let view = status.sites.iter().find(|v| v.site == *name).cloned().unwrap_or_default();
        let connected = status.connected.contains(name);
        let s = spend.get(name);
        let last_seen =
            if connected { "now".to_owned() } else { view.last_seen.as_deref().map_or("not since start".into(), |t| ago(t, now)) };
        let cert = match view.cert_expires.as_deref().and_then(parse) {
            Some(end) => {
                let left = (end - now).whole_seconds();
                let class = if left < 7 * 86_400 { "warn" } else { "" };
                let when = if left < 0 { "expired".to_owned() } else { format!("in {}", duration_text(left)) };
                format!("<span class='{class}' title='{}'>{} ({when})</span>", esc(view.cert_expires.as_deref().unwrap_or("")), date(end))
            }
            None => "<span class='muted'>not seen</span>".into(),
        };
        let epsilon = match s {
            Some(SiteSpend { epsilon: Some(e), delta, .. }) => format!("{e:.3} <span class='muted'>(δ {delta:e})</span>"),
            Some(_) => "<span class='warn'>unbounded (no DP)</span>".into(),
            None => "<span class='muted'>none accepted</span>".into(),
        };
        let budget = match (budget_declined.get(name), view.budget, s.and_then(|s| s.epsilon)) {
            (Some(r), _, _) => format!("<span class='warn'>exhausted (declined round {r})</span>"),
            (None, Some(b), spent) => {
                let used = spent.unwrap_or(0.0) / b.epsilon;
                let class = if used >= NEARLY_SPENT { "warn" } else { "" };
                format!(
                    "<span class='{class}' data-budget='{}'>ε {} at δ {:e}: {:.0}% spent</span>",
                    b.epsilon,
                    b.epsilon,
                    b.delta,
                    100.0 * used
                )
            }
            (None, None, _) => "<span class='muted'>not declared</span>".into(),
        };
        let last_update = match (&view.last_update_bytes, &view.last_update_at, s) {
            (Some(b), Some(at), _) => format!("{} at {}", bytes(*b), time_of(at)),
            (_, _, Some(s)) => format!("round {} at {} <span class='muted'>(ledger)</span>", s.last_round, time_of(&s.last_accepted)),
            _ => "<span class='muted'>none</span>".into(),
        };
        let _ = write!(
            rows,
            "<tr data-site='{site}'><td class='site'>{site}</td><td class='connected {cls}'>{conn}</td><td>{last_seen}</td><td>{sw}</td>\
             <td>{cert}</td><td class='epsilon'>{epsilon}</td><td>{budget}</td><td class='updates'>{updates}</td><td>{last_update}</td></tr>",
            site = esc(name),
            cls = if connected { "on" } else { "off" },
            conn = if connected { "connected" } else { "offline" },
            sw = view.software.as_deref().map_or("<span class='muted'>-</span>".into(), esc),
            updates = s.map_or(0, |s| s.updates),
        );
    }
    format!(
        "<table id='sites'><tr><th>site</th><th>connection</th><th>last seen</th><th>software</th><th>certificate expires</th>\
         <th>epsilon spent</th><th>budget</th><th>updates accepted</th><th>last update</th></tr>{rows}</table>"
    )
}

/// Participants per round as bars (green: completed, red: failed), with the mean reported
/// validation accuracy as dots where sites shared it. The last 40 rounds.
fn rounds_chart(history: &[RoundRecord]) -> String {
    const W: f64 = 560.0;
    const H: f64 = 220.0;
    const LEFT: f64 = 36.0;
    const BOTTOM: f64 = 28.0;
    const TOP: f64 = 16.0;
    let shown = &history[history.len().saturating_sub(40)..];
    let most = shown.iter().map(|r| r.sites.len()).max().unwrap_or(0).max(1);
    let plot_h = H - BOTTOM - TOP;
    let slot = (W - LEFT - 8.0) / shown.len().max(1) as f64;
    let bar = (slot * 0.7).min(48.0);
    let mut svg = format!(
        "<svg id='rounds-chart' width='{W}' height='{H}' viewBox='0 0 {W} {H}' role='img' aria-label='participants per round'>\
         <line x1='{LEFT}' y1='{y0}' x2='{x1}' y2='{y0}' stroke='#999'/><line x1='{LEFT}' y1='{TOP}' x2='{LEFT}' y2='{y0}' stroke='#999'/>\
         <text x='4' y='{ty}' font-size='11' fill='#555'>{most}</text><text x='4' y='{y0}' font-size='11' fill='#555'>0</text>",
        y0 = H - BOTTOM,
        x1 = W - 4.0,
        ty = TOP + 8.0,
    );
    if shown.is_empty() {
        let _ = write!(svg, "<text x='{}' y='{}' font-size='13' fill='#888'>no rounds yet</text>", LEFT + 12.0, H / 2.0);
    }
    let mut dots = Vec::new();
    for (i, r) in shown.iter().enumerate() {
        let n = r.sites.len();
        let x = LEFT + slot * i as f64 + (slot - bar) / 2.0;
        let h = plot_h * n as f64 / most as f64;
        let ok = r.outcome == "completed";
        let _ = write!(
            svg,
            "<g class='round' data-round='{round}' data-participants='{n}' data-outcome='{outcome}'><title>round {round}: {n} sites, {outcome}</title>\
             <rect x='{x:.1}' y='{y:.1}' width='{bar:.1}' height='{h:.1}' fill='{fill}'/>\
             <text x='{cx:.1}' y='{ly:.1}' font-size='11' text-anchor='middle'>{n}</text>\
             <text x='{cx:.1}' y='{by:.1}' font-size='11' text-anchor='middle' fill='#555'>{round}</text></g>",
            round = r.round,
            outcome = esc(&r.outcome),
            y = H - BOTTOM - h,
            fill = if ok { "#4a9d5b" } else { "#c94040" },
            cx = x + bar / 2.0,
            ly = H - BOTTOM - h - 3.0,
            by = H - BOTTOM + 14.0,
        );
        if let Some(a) = mean_accuracy(r) {
            dots.push((x + bar / 2.0, H - BOTTOM - plot_h * a.clamp(0.0, 1.0), a));
        }
    }
    if !dots.is_empty() {
        let points: Vec<String> = dots.iter().map(|(x, y, _)| format!("{x:.1},{y:.1}")).collect();
        let _ = write!(svg, "<polyline points='{}' fill='none' stroke='#3366cc' stroke-width='1.5'/>", points.join(" "));
        for (x, y, a) in &dots {
            let _ = write!(
                svg,
                "<circle class='accuracy' cx='{x:.1}' cy='{y:.1}' r='3.5' fill='#3366cc'><title>accuracy {a:.3}</title></circle>"
            );
        }
    }
    let _ = write!(
        svg,
        "<text x='{LEFT}' y='{H}' dy='-2' font-size='10' fill='#555'>bars: sites per round (green completed, red failed){}</text></svg>",
        if dots.is_empty() { "" } else { "; dots: mean validation accuracy (0-1)" }
    );
    svg
}

/// The share of its budget past which a site's spend is shown as a warning (the alert
/// rule's threshold in deploy/prometheus).
const NEARLY_SPENT: f64 = 0.9;

/// Epsilon spent per site against the budget it declared (a full bar is the budget spent);
/// sites that declared none share one scale; sites without differential privacy are marked.
fn privacy_chart(status: &StatusView, spend: &BTreeMap<String, SiteSpend>, budget_declined: &BTreeMap<String, u64>) -> String {
    const W: f64 = 540.0;
    const ROW: f64 = 26.0;
    const LABEL: f64 = 110.0;
    let mut names: Vec<&String> = status.enrolled.iter().collect();
    for s in spend.keys() {
        if !names.contains(&s) {
            names.push(s);
        }
    }
    let most = spend.values().filter_map(|s| s.epsilon).fold(0.0f64, f64::max);
    let scale = if most > 0.0 { most * 1.15 } else { 1.0 };
    let h = ROW * names.len().max(1) as f64 + 30.0;
    let bar_w = W - LABEL - 200.0;
    let mut undeclared = false;
    let mut svg =
        format!("<svg id='privacy-chart' width='{W}' height='{h}' viewBox='0 0 {W} {h}' role='img' aria-label='epsilon spent per site'>");
    for (i, name) in names.iter().enumerate() {
        let y = 8.0 + ROW * i as f64;
        let s = spend.get(*name);
        let budget = status.sites.iter().find(|v| v.site == **name).and_then(|v| v.budget);
        let spent_colour = |share: f64| if share >= NEARLY_SPENT { "#c94040" } else { "#d08a2c" };
        let (w, fill, text, eps) = match (s, budget) {
            (Some(SiteSpend { epsilon: Some(e), .. }), Some(b)) => {
                let share = e / b.epsilon;
                (bar_w * share.min(1.0), spent_colour(share), format!("ε {e:.3} of {}", b.epsilon), format!("{e}"))
            }
            (Some(SiteSpend { epsilon: Some(e), .. }), None) => (bar_w * e / scale, "#d08a2c", format!("ε {e:.3}"), format!("{e}")),
            (Some(_), _) => (bar_w, "#bbbbbb", "unbounded".to_owned(), "inf".to_owned()),
            (None, Some(b)) => (0.0, "#bbbbbb", format!("none of {}", b.epsilon), "0".to_owned()),
            (None, None) => (0.0, "#bbbbbb", "none".to_owned(), "0".to_owned()),
        };
        let mark = if budget_declined.contains_key(*name) { " (exhausted)" } else { "" };
        undeclared |= budget.is_none();
        let _ = write!(
            svg,
            "<g class='site' data-site='{site}' data-epsilon='{eps}' data-budget='{declared}'><text x='4' y='{ty:.1}' font-size='12'>{site}</text>\
             <rect x='{LABEL}' y='{y:.1}' width='{bar_w:.1}' height='16' fill='#f0f0f0'/>\
             <rect x='{LABEL}' y='{y:.1}' width='{w:.1}' height='16' fill='{fill}'/>\
             <text x='{tx:.1}' y='{ty:.1}' font-size='12'>{text}{mark}</text></g>",
            site = esc(name),
            declared = budget.map_or(String::new(), |b| b.epsilon.to_string()),
            ty = y + 12.5,
            tx = LABEL + bar_w + 6.0,
        );
    }
    let _ = write!(
        svg,
        "<text x='{LABEL}' y='{ly:.1}' font-size='10' fill='#555'>0</text><text x='{rx:.1}' y='{ly:.1}' font-size='10' fill='#555' text-anchor='end'>{right}</text></svg>",
        ly = h - 8.0,
        rx = LABEL + bar_w,
        right = if undeclared { format!("ε {scale:.2}, or the budget where declared") } else { "the budget each site declared".into() },
    );
    svg
}

fn rounds_table(history: &[RoundRecord]) -> String {
    let mut rows = String::new();
    for r in history.iter().rev().take(50) {
        let participants: Vec<String> = r.sites.iter().map(|s| esc(&s.site)).collect();
        let mut failures: Vec<String> = Vec::new();
        if r.outcome != "completed" {
            failures.push(format!("<span class='fail'>{}</span>", esc(&r.outcome)));
        }
        failures.extend(r.rejected.iter().map(|(s, why)| format!("{} rejected: {}", esc(s), esc(why))));
        failures.extend(r.declined.iter().map(|(s, why)| format!("{} declined: {}", esc(s), esc(why))));
        failures.extend(r.missed.iter().map(|s| format!("{} missed the deadline or left", esc(s))));
        let _ = write!(
            rows,
            "<tr data-round='{round}'><td>{round}{attempt}</td><td class='{cls}'>{outcome}</td><td class='participants' data-count='{n}'>{n}: {names}</td>\
             <td>{secs:.1} s</td><td>{acc}</td><td>{loss}</td><td class='selection'>{selection}</td><td>{failures}</td><td>{finished}</td></tr>",
            round = r.round,
            attempt = if r.attempt > 1 { format!(" (attempt {})", r.attempt) } else { String::new() },
            cls = if r.outcome == "completed" { "on" } else { "fail" },
            outcome = if r.outcome == "completed" { "completed" } else { "failed" },
            n = r.sites.len(),
            names = participants.join(", "),
            secs = r.duration_secs,
            acc = mean_accuracy(r).map_or("<span class='muted'>withheld</span>".into(), |a| format!("{a:.3}")),
            loss = r.mean_train_loss.map_or("<span class='muted'>withheld</span>".into(), |l| format!("{l:.4}")),
            selection = selection_cell(r),
            failures = if failures.is_empty() { "<span class='muted'>none</span>".into() } else { failures.join("<br>") },
            finished = esc(&time_of(&r.finished_at)),
        );
    }
    format!(
        "<table id='rounds'><tr><th>round</th><th>outcome</th><th>participants</th><th>duration</th><th>accuracy</th>\
         <th>mean train loss</th><th>model selection</th><th>failures</th><th>finished</th></tr>{rows}</table>"
    )
}

/// Model selection in a round: the sites' score of the model it offered, and in the final
/// scoring round the model selected.
fn selection_cell(r: &RoundRecord) -> String {
    let mut parts = Vec::new();
    if let Some(t) = &r.scored {
        let acc = t.accuracy().map_or("-".into(), |a| format!("{a:.3}"));
        parts.push(format!("round {}'s model scored {acc} by {} sites", t.model_round, t.sites));
    }
    if let Some(k) = r.selected {
        parts.push(format!("<b data-selected='{k}'>selected: round {k}'s model</b>"));
    }
    if parts.is_empty() {
        "<span class='muted'>-</span>".into()
    } else {
        parts.join("<br>")
    }
}

/// The examples-weighted mean of the validation accuracy the round's sites shared.
fn mean_accuracy(r: &RoundRecord) -> Option<f64> {
    let (sum, weight) = r
        .sites
        .iter()
        .filter_map(|s| s.val_accuracy.map(|a| (a, s.num_examples.max(1) as f64)))
        .fold((0.0, 0.0), |(sum, w), (a, n)| (sum + a * n, w + n));
    (weight > 0.0).then(|| sum / weight)
}

fn parse(t: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(t, &Rfc3339).ok()
}

fn date(t: OffsetDateTime) -> String {
    format!("{}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

/// `HH:MM:SS` (UTC) of today, or the date and time otherwise.
fn time_of(t: &str) -> String {
    match parse(t) {
        Some(t) => format!("{} {:02}:{:02}:{:02} UTC", date(t), t.hour(), t.minute(), t.second()),
        None => t.to_owned(),
    }
}

fn ago(t: &str, now: OffsetDateTime) -> String {
    match parse(t) {
        Some(at) => format!("<span title='{}'>{} ago</span>", esc(t), duration_text((now - at).whole_seconds().max(0))),
        None => esc(t),
    }
}

fn duration_text(secs: i64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

pub use fedward_shared::html::escape as esc;

#[cfg(test)]
mod tests {
    use fedward_shared::history::SiteRecord;
    use fedward_shared::wire::DeclaredBudget;

    use crate::server::SiteView;

    use super::*;

    fn record(round: u64, sites: &[&str], accuracy: Option<f64>) -> RoundRecord {
        RoundRecord {
            round,
            attempt: 1,
            outcome: "completed".into(),
            finished_at: "2026-12-07T14:00:00Z".into(),
            duration_secs: 2.5,
            sites: sites
                .iter()
                .map(|s| SiteRecord {
                    site: (*s).into(),
                    num_examples: 100,
                    weight: None,
                    update_norm: None,
                    scale: None,
                    train_loss: None,
                    val_accuracy: accuracy,
                    val_macro_f1: None,
                    privacy_mode: "site-level".into(),
                    noise_multiplier: 1.0,
                    clip_norm: 1.0,
                    epsilon_after: None,
                    update_digest: String::new(),
                })
                .collect(),
            declined: vec![],
            rejected: vec![],
            missed: vec![],
            mean_train_loss: None,
            model_digest: None,
            scored: None,
            selected: None,
        }
    }

    #[test]
    fn the_page_shows_sites_rounds_failures_and_budgets() {
        let now = OffsetDateTime::parse("2026-12-07T15:00:00Z", &Rfc3339).unwrap();
        let status = StatusView {
            phase: "collecting updates".into(),
            open_round: Some(3),
            completed_rounds: 2,
            total_rounds: 5,
            connected: vec!["alpha".into()],
            enrolled: vec!["alpha".into(), "beta".into()],
            deadline: Some("2026-12-07T15:04:10Z".into()),
            sites: vec![SiteView {
                site: "alpha".into(),
                cert_expires: Some("2026-12-10T15:00:00Z".into()),
                software: Some("fedward-agent 0.1.0".into()),
                budget: Some(DeclaredBudget { epsilon: 1.6, delta: 1e-5 }),
                ..SiteView::default()
            }],
            ..StatusView::default()
        };
        let mut failed = record(2, &["alpha"], None);
        failed.outcome = "failed: only 1 of the 2 sites needed sent a valid update".into();
        failed.declined = vec![("beta".into(), format!("BudgetExhausted: {}", DeclineReason::BudgetExhausted))];
        let mut scoring = record(3, &["alpha"], None);
        scoring.scored = Some(fedward_shared::history::ScoreRecord { model_round: 2, correct: 90.0, examples: 120, sites: 2 });
        scoring.selected = Some(1);
        let history = vec![record(1, &["alpha", "beta"], Some(0.8)), failed, scoring];
        let mut spend = BTreeMap::new();
        spend.insert(
            "alpha".to_owned(),
            SiteSpend {
                site: "alpha".into(),
                updates: 2,
                epsilon: Some(1.5),
                delta: 1e-5,
                mode: "site-level".into(),
                last_round: 2,
                last_accepted: "2026-12-07T14:59:00Z".into(),
            },
        );
        let page = render(&status, &history, &spend, now);
        assert!(page.contains("<span id='time-left' data-deadline='2026-12-07T15:04:10Z'>4m 10s</span>"), "{page}");
        assert!(page.contains("<tr data-site='alpha'><td class='site'>alpha</td><td class='connected on'>connected</td>"), "{page}");
        assert!(page.contains("2026-12-10 (in 3d 0h)") && page.contains("class='warn'"), "an expiry within 7 days is marked");
        assert!(page.contains("beta declined: BudgetExhausted: the round would exceed the site&#39;s privacy budget"), "{page}");
        assert!(page.contains("exhausted (declined round 2)"));
        assert!(page.contains("data-round='1' data-participants='2' data-outcome='completed'"));
        assert!(page.contains("data-round='2' data-participants='1' data-outcome='failed"));
        assert!(page.contains("<g class='site' data-site='alpha' data-epsilon='1.5' data-budget='1.6'>"), "{page}");
        assert!(page.contains("<span class='warn' data-budget='1.6'>ε 1.6 at δ 1e-5: 94% spent</span>"), "nearly spent is marked: {page}");
        assert!(page.contains("ε 1.500 of 1.6"));
        assert_eq!(page.matches("class='accuracy'").count(), 1, "accuracy only where it was shared");
        assert!(page.contains("round 2's model scored 0.750 by 2 sites<br><b data-selected='1'>selected: round 1's model</b>"), "{page}");
        assert!(!page.contains("http://") && !page.contains("https://"), "nothing fetched from elsewhere");
    }
}
