//! Pieces of the HTML reports every binary writes (the audit report, the demo's report,
//! the simulator's, the dashboard): escaping, and a grouped bar chart as inline SVG (no
//! script, nothing fetched).

use std::fmt::Write as _;

/// Escapes text for HTML element content and quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A grouped bar chart: one group per category, one bar per series, each value above its bar.
pub struct Bars<'a> {
    pub categories: &'a [String],
    /// (legend name, one value per category); a missing or non-finite value draws as 0.
    pub series: &'a [(String, Vec<f64>)],
    /// The y axis's label ("" for none).
    pub axis: &'a str,
    /// The top of the y axis; by default 10% above the largest value.
    pub max: Option<f64>,
    /// Ticks as percentages.
    pub percent: bool,
    /// Appended to each legend name (" model", say).
    pub legend_suffix: &'a str,
}

const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"];

impl Bars<'_> {
    pub fn svg(&self) -> String {
        let (w, h, left, right, top, bottom) = (720.0, 260.0, 50.0, 190.0, 20.0, 40.0);
        let top_value = self.max.unwrap_or_else(|| {
            let m = self.series.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
            if m > 0.0 {
                m * 1.1
            } else {
                1.0
            }
        });
        let group_w = (w - left - right) / self.categories.len().max(1) as f64;
        let bar_w = group_w * 0.8 / self.series.len().max(1) as f64;
        let y = |v: f64| top + (h - top - bottom) * (1.0 - (v / top_value).clamp(0.0, 1.0));
        let mut svg = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="12">"#);
        for i in 0..=4 {
            let v = top_value * f64::from(i) / 4.0;
            let label = if self.percent { format!("{v:.0}%") } else { format!("{v:.0}") };
            let _ = write!(
                svg,
                r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
                w - right,
                left - 6.0,
                y(v) + 4.0,
                y = y(v)
            );
        }
        if !self.axis.is_empty() {
            let _ = write!(
                svg,
                r#"<text x="12" y="{:.1}" transform="rotate(-90 12 {:.1})" text-anchor="middle">{}</text>"#,
                h / 2.0,
                h / 2.0,
                escape(self.axis)
            );
        }
        for (g, name) in self.categories.iter().enumerate() {
            let x0 = left + group_w * g as f64 + group_w * 0.1;
            for (k, (_, values)) in self.series.iter().enumerate() {
                let v = values.get(g).copied().filter(|v| v.is_finite()).unwrap_or(0.0);
                let x = x0 + bar_w * k as f64;
                let _ = write!(
                    svg,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.1}</text>"#,
                    y(v),
                    bar_w * 0.9,
                    (h - bottom - y(v)).max(0.0),
                    COLOURS[k % COLOURS.len()],
                    x + bar_w * 0.45,
                    y(v) - 3.0
                );
            }
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                x0 + group_w * 0.4,
                h - bottom + 16.0,
                escape(name)
            );
        }
        for (k, (name, _)) in self.series.iter().enumerate() {
            let ly = top + 10.0 + 16.0 * k as f64;
            let _ = write!(
                svg,
                r#"<rect x="{}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{}" y="{ly:.1}">{}{}</text>"#,
                w - right + 10.0,
                ly - 9.0,
                COLOURS[k % COLOURS.len()],
                w - right + 26.0,
                escape(name),
                escape(self.legend_suffix)
            );
        }
        svg.push_str("</svg>");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_draws_one_bar_per_value() {
        assert_eq!(escape(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        let categories = vec!["fcfs".to_owned(), "<greedy>".to_owned()];
        let series = vec![("federated".to_owned(), vec![50.0, 75.0]), ("local".to_owned(), vec![25.0, f64::NAN])];
        let svg =
            Bars { categories: &categories, series: &series, axis: "%", max: Some(100.0), percent: true, legend_suffix: " model" }.svg();
        assert_eq!(svg.matches("<rect").count(), 4 + 2, "four bars and two legend keys");
        assert!(svg.contains("&lt;greedy&gt;") && svg.contains("federated model") && svg.contains(">100%<"));
    }
}
