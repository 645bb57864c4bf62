//! The simulator's plain table and its self-contained HTML report (inline SVG bar charts,
//! no script, nothing fetched).

use std::fmt::Write as _;

use super::{Comparison, Outcome};
use fedward_shared::html::escape as esc;

/// The plain table `allocate simulate` prints: one row per method.
pub fn table(c: &Comparison) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} arrivals over {:.0} h (seed {}); urgent = urgency 1-2, target {:.0} min; waits in minutes",
        c.arrivals, c.horizon_hours, c.seed, c.target_mins
    );
    let _ = writeln!(
        out,
        "{:<8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>7} {:>6} {:>6} {:>6} {:>10}",
        "method",
        "urgent",
        "in-target",
        "u1-2 mean",
        "u1-2 p95",
        "u3 mean",
        "u4-5 mean",
        "all p95",
        "misal.",
        "reviews",
        "doctor",
        "bed",
        "device",
        "decisions/s"
    );
    for o in &c.outcomes {
        let util = |k: &str| o.utilisation.get(k).map_or("-".to_owned(), |u| format!("{:.0}%", 100.0 * u));
        let _ = writeln!(
            out,
            "{:<8} {:>8} {:>8.1}% {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>6} {:>7} {:>6} {:>6} {:>6} {:>10.0}",
            o.method,
            format!("{}/{}", o.urgent_within_target, o.urgent),
            100.0 * o.urgent_within_target_share,
            o.urgent_mean_wait_mins,
            pooled_p95(o, 1..=2),
            pooled_mean(o, 3..=3),
            pooled_mean(o, 4..=5),
            pooled_p95(o, 1..=5),
            o.misallocations,
            o.reviews,
            util("doctor"),
            util("bed"),
            util("device"),
            o.decisions_per_sec
        );
    }
    if let Some(o) = c.outcomes.iter().find(|o| o.unserved > 0) {
        let _ = writeln!(out, "({} still waiting at the end of the run under {}: left out of the waits)", o.unserved, o.method);
    }
    out
}

/// The mean wait over the served requests of some urgencies.
fn pooled_mean(o: &Outcome, urgencies: std::ops::RangeInclusive<u8>) -> f64 {
    let of = o.by_urgency.iter().filter(|w| urgencies.contains(&w.urgency));
    let (n, sum) = of.fold((0usize, 0.0), |(n, s), w| (n + w.served, s + w.mean_wait_mins * w.served as f64));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// The largest per-urgency 95th percentile among some urgencies (an upper bound of theirs pooled).
fn pooled_p95(o: &Outcome, urgencies: std::ops::RangeInclusive<u8>) -> f64 {
    o.by_urgency.iter().filter(|w| urgencies.contains(&w.urgency)).map(|w| w.p95_wait_mins).fold(0.0, f64::max)
}

/// A self-contained page: the table, and bar charts of the urgent-within-target share,
/// the waits by urgency and the utilisation by kind.
pub fn html(c: &Comparison, title: &str) -> String {
    let methods: Vec<String> = c.outcomes.iter().map(|o| o.method.clone()).collect();
    let share =
        svg_bars(&["urgent within target".to_owned()], &per_method(c, |o| vec![100.0 * o.urgent_within_target_share]), "%", Some(100.0));
    let urgencies: Vec<String> = (1..=5).map(|u| format!("urgency {u}")).collect();
    let mean_wait = svg_bars(&urgencies, &per_method(c, |o| o.by_urgency.iter().map(|w| w.mean_wait_mins).collect()), "min", None);
    let p95_wait = svg_bars(&urgencies, &per_method(c, |o| o.by_urgency.iter().map(|w| w.p95_wait_mins).collect()), "min", None);
    let kinds: Vec<String> = c.outcomes.first().map(|o| o.utilisation.keys().cloned().collect()).unwrap_or_default();
    let util = svg_bars(&kinds, &per_method(c, |o| o.utilisation.values().map(|u| 100.0 * u).collect()), "%", Some(100.0));
    let mut rows = String::new();
    for o in &c.outcomes {
        for w in &o.by_urgency {
            let _ = writeln!(
                rows,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td></tr>",
                esc(&o.method),
                w.urgency,
                w.requests,
                w.served,
                w.mean_wait_mins,
                w.p95_wait_mins
            );
        }
    }
    let mut counts = String::new();
    for o in &c.outcomes {
        let _ = writeln!(
            counts,
            "<tr><td>{}</td><td>{}/{}</td><td>{}</td><td>{} ({} to notes needing none)</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td></tr>",
            esc(&o.method),
            o.served,
            o.needing,
            o.unserved,
            o.misallocations,
            o.misallocations_to_other,
            o.misallocated_unit_hours,
            o.reviews,
            o.epochs,
            o.fallback_epochs,
            o.decisions_per_sec
        );
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;color:#222}}table{{border-collapse:collapse;margin:1rem 0}}td,th{{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}}pre{{background:#f6f6f6;padding:1rem;overflow-x:auto}}</style>
</head><body>
<h1>{title}</h1>
<p>{arrivals} arrivals over {hours:.0} hours (seed {seed}), replayed through {methods} on the same arrivals and the same predictions. Urgent means urgency 1-2; the target is {target:.0} minutes. Waits run from arrival to the right unit, wrong assignments and reviews included.</p>
<pre>{table}</pre>
<h2>Urgent requests served within {target:.0} minutes</h2>
{share}
<h2>Mean wait by urgency (minutes)</h2>
{mean_wait}
<h2>95th-percentile wait by urgency (minutes)</h2>
{p95_wait}
<h2>Utilisation by kind over the horizon</h2>
{util}
<h2>Waits</h2>
<table><tr><th>method</th><th>urgency</th><th>requests</th><th>served</th><th>mean wait (min)</th><th>p95 wait (min)</th></tr>
{rows}</table>
<h2>Mistakes and engine</h2>
<table><tr><th>method</th><th>served</th><th>unserved at the end</th><th>misallocations</th><th>unit-hours on wrong assignments</th><th>reviews</th><th>epochs</th><th>epochs too large for the exact solver</th><th>decisions/s</th></tr>
{counts}</table>
</body></html>
"#,
        title = esc(title),
        arrivals = c.arrivals,
        hours = c.horizon_hours,
        seed = c.seed,
        methods = esc(&methods.join(", ")),
        target = c.target_mins,
        table = esc(&table(c)),
    )
}

fn per_method(c: &Comparison, f: impl Fn(&Outcome) -> Vec<f64>) -> Vec<(String, Vec<f64>)> {
    c.outcomes.iter().map(|o| (o.method.clone(), f(o))).collect()
}

/// Grouped bars: one group per category, one bar per series, the value above each bar.
fn svg_bars(categories: &[String], series: &[(String, Vec<f64>)], unit: &str, max: Option<f64>) -> String {
    fedward_shared::html::Bars { categories, series, axis: unit, max, percent: false, legend_suffix: "" }.svg()
}

#[cfg(test)]
mod tests {
    use super::super::{compare, Arrival, Need, Scenario, Settings};
    use super::*;
    use crate::allocation::{Capacity, Kind, Pool};

    #[test]
    fn the_report_is_self_contained_and_names_every_method() {
        let capacity =
            Capacity { resources: vec![Pool { kind: Kind::Doctor, group: "g".into(), features: Default::default(), total: 1, free: 1 }] };
        let need = Some(Need { group: "g".into(), features: vec![] });
        let a = Arrival {
            at: 0,
            note: 0,
            truth: Kind::Doctor,
            predicted: Kind::Doctor,
            confidence: 1.0,
            urgency: 1,
            needs: [need, None, None],
            service_secs: 60,
        };
        let s = Scenario { horizon_secs: 600, arrivals: vec![a], busy: vec![] };
        let c = compare(&s, &capacity, &Settings::default(), 1, &mut || 0.0);
        let page = html(&c, "a <test>");
        for m in ["fcfs", "greedy", "optimal"] {
            assert!(page.contains(m) && table(&c).contains(m));
        }
        assert!(page.contains("<svg") && page.contains("a &lt;test&gt;"));
        assert!(!page.contains("<script") && !page.contains("https://"));
        assert_eq!(page.matches("http://").count(), page.matches("http://www.w3.org/2000/svg").count());
    }
}
