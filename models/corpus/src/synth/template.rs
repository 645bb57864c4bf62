//! Template expansion: `{a|b|}` picks one alternative (nested, empty allowed), `<slot>` asks the note context.
//!
//! Every phrase bank entry is a template; this is where a bank entry, the note being written and the
//! site's random stream meet. Malformed templates never panic: an unmatched `{` or `<` is copied as text
//! (a test renders every bank entry and rejects any such leftovers).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::patient::{self, Patient};
use super::resources::Resource;
use super::site::SiteProfile;
use super::specialty::{self, Case, Spec, Team};

/// A phrase bank: templates to choose from.
pub(super) type Bank = &'static [&'static str];

/// How unwell the patient in a note is; steers the vitals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sev {
    Stable,
    Unwell,
    Critical,
}

/// The resource a part of the note talks about, with the team `<team>`/`<who>` refer to.
#[derive(Clone, Copy)]
pub(super) struct Focus {
    pub res: &'static Resource,
    pub team: &'static Team,
}

/// Everything fixed for one note.
pub(super) struct NoteCtx {
    pub site: &'static SiteProfile,
    pub spec: Spec,
    /// The clinical case within the specialty; `<dx>`, `<pres>` and `<find>` agree with it.
    pub case: &'static Case,
    pub patient: Patient,
    pub sev: Sev,
    pub us: bool,
}

/// Expands templates for one note.
pub(super) struct Renderer<'r> {
    pub rng: &'r mut ChaCha8Rng,
    pub note: &'r NoteCtx,
    pub focus: Focus,
}

/// Uniform pick from a bank; an empty bank gives "".
pub(super) fn pick_str(rng: &mut ChaCha8Rng, bank: Bank) -> &'static str {
    if bank.is_empty() {
        return "";
    }
    bank[rng.random_range(0..bank.len())]
}

/// Index drawn in proportion to `weights`; all-zero weights fall back to uniform.
pub(super) fn pick_weighted(rng: &mut ChaCha8Rng, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().filter(|w| w.is_finite() && **w > 0.0).sum();
    if weights.is_empty() {
        return 0;
    }
    if total <= 0.0 {
        return rng.random_range(0..weights.len());
    }
    let mut x = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if w.is_finite() && *w > 0.0 {
            if x < *w {
                return i;
            }
            x -= w;
        }
    }
    weights.len() - 1
}

impl Renderer<'_> {
    /// Expands a template into a fresh string with collapsed whitespace.
    pub fn render(&mut self, tpl: &str) -> String {
        let mut out = String::new();
        self.expand(tpl, &mut out);
        tidy(&out)
    }

    /// Picks from a bank and expands it.
    pub fn bank(&mut self, bank: Bank) -> String {
        let t = pick_str(self.rng, bank);
        self.render(t)
    }

    /// Expands with another focus, restoring the current one after.
    pub fn render_with(&mut self, focus: Focus, tpl: &str) -> String {
        let saved = self.focus;
        self.focus = focus;
        let s = self.render(tpl);
        self.focus = saved;
        s
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.rng.random::<f64>() < p
    }

    fn expand(&mut self, t: &str, out: &mut String) {
        let mut rest = t;
        while !rest.is_empty() {
            let Some(pos) = rest.find(['{', '<']) else {
                out.push_str(rest);
                return;
            };
            out.push_str(&rest[..pos]);
            let tail = &rest[pos..];
            if let Some(after) = tail.strip_prefix('{') {
                match split_group(tail) {
                    Some((alts, used)) => {
                        let k = self.rng.random_range(0..alts.len());
                        self.expand(alts[k], out);
                        rest = &tail[used..];
                    }
                    None => {
                        out.push('{');
                        rest = after;
                    }
                }
            } else {
                match tail.find('>') {
                    Some(end) if end > 1 && tail[1..end].bytes().all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit()) => {
                        self.slot(&tail[1..end], out);
                        rest = &tail[end + 1..];
                    }
                    _ => {
                        out.push('<');
                        rest = &tail[1..];
                    }
                }
            }
        }
    }

    fn slot(&mut self, name: &str, out: &mut String) {
        let spec = specialty::bank(self.note.spec);
        let s: String = match name {
            "r" => self.bank(self.focus.res.names),
            "reason" => {
                let child = self.note.spec.is_child() && !self.focus.res.child_reasons.is_empty();
                self.bank(if child { self.focus.res.child_reasons } else { self.focus.res.reasons })
            }
            "q" => self.bank(self.focus.res.query),
            "ar" => {
                let name = self.bank(self.focus.res.names);
                if self.focus.res.countable && self.chance(0.5) {
                    format!("{} {name}", article(&name))
                } else {
                    name
                }
            }
            "team" => self.bank(self.focus.team.names),
            // The team as a modifier: "cardiology r/v", not "the cardiology team r/v".
            "teamm" => {
                let t = self.bank(self.focus.team.names);
                t.strip_prefix("the ").map(str::to_owned).unwrap_or(t)
            }
            "who" => self.bank(self.focus.team.persons),
            "own_team" => self.bank(spec.team.names),
            "own_who" => self.bank(spec.team.persons),
            "own_teamm" => {
                let t = self.bank(spec.team.names);
                t.strip_prefix("the ").map(str::to_owned).unwrap_or(t)
            }
            "dx" => self.bank(self.note.case.dx),
            "pres" => self.bank(self.note.case.pres),
            "hx" => self.bank(spec.hx),
            "find" => self.bank(self.note.case.find),
            "op" => self.bank(spec.ops),
            "ct" => self.bank(spec.imaging.ct),
            "mri" => self.bank(spec.imaging.mri),
            "us" => self.bank(spec.imaging.us),
            "xr" => self.bank(spec.imaging.xr),
            "ward" => self.bank(self.note.site.wards),
            "hosp" => self.bank(self.note.site.hospitals),
            "site_ctx" => self.bank(self.note.site.context),
            "pt" => patient::descriptor(self.rng, &self.note.patient, self.note.us),
            "ref" => patient::reference(self.rng, &self.note.patient),
            "he" => self.note.patient.pronoun(0).to_owned(),
            "his" => self.note.patient.pronoun(1).to_owned(),
            "him" => self.note.patient.pronoun(2).to_owned(),
            "self" => self.note.patient.pronoun(3).to_owned(),
            "vitals" => patient::vitals(self.rng, &self.note.patient, self.note.sev, self.note.us),
            "sats" => patient::sats(self.rng, &self.note.patient, self.note.sev, self.note.us),
            "hr" => patient::heart_rate(self.rng, &self.note.patient, self.note.sev),
            "bp" => patient::blood_pressure(self.rng, &self.note.patient, self.note.sev),
            "rr" => patient::resp_rate(self.rng, &self.note.patient, self.note.sev),
            "temp" => patient::temperature(self.rng, self.note.sev, self.note.us),
            "gcs" => patient::gcs(self.rng, self.note.sev),
            "news" => patient::early_warning(self.rng, &self.note.patient, self.note.sev, self.note.us),
            "n" => self.rng.random_range(1..=14).to_string(),
            "loc" => patient::location(self.rng),
            "time" => patient::clock_time(self.rng),
            "dur" => patient::duration(self.rng),
            "ext" => patient::extension(self.rng),
            "init" => patient::initials(self.rng),
            "day" => patient::day(self.rng),
            "wt" => patient::weight(self.rng, &self.note.patient),
            "lang" => self.bank(patient::LANGUAGES),
            "drug" => self.bank(spec.drugs),
            "parent" => self.bank(if self.note.spec.is_child() { patient::PARENTS } else { patient::RELATIVES }),
            "dr" => patient::doctor_initials(self.rng),
            _ => format!("<{name}>"),
        };
        out.push_str(&s);
    }
}

/// "a" or "an" for a noun phrase, by how its first word is said: "an MRI", "a CT head", "an urgent CT".
pub(super) fn article(np: &str) -> &'static str {
    let first = np.split_whitespace().next().unwrap_or("");
    let letters: Vec<char> = first.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let acronym = letters.len() >= 2 && letters.iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
    let Some(c0) = letters.first() else { return "a" };
    if acronym {
        return if "AEFHILMNORSX".contains(*c0) { "an" } else { "a" };
    }
    let lower = first.to_ascii_lowercase();
    let vowel = matches!(c0.to_ascii_lowercase(), 'a' | 'e' | 'i' | 'o' | 'u');
    let you_sound = ["us", "uk", "uni", "uro", "use", "eu"].iter().any(|p| lower.starts_with(p));
    if vowel && !you_sound {
        "an"
    } else {
        "a"
    }
}

/// Splits `{a|b}` at depth 0; returns the alternatives and the bytes consumed, or None if unbalanced.
fn split_group(s: &str) -> Option<(Vec<&str>, usize)> {
    let bytes = s.as_bytes();
    let mut depth = 0usize;
    let mut start = 1;
    let mut alts = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    alts.push(&s[start..i]);
                    return Some((alts, i + 1));
                }
            }
            b'|' if depth == 1 => {
                alts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    None
}

/// Collapses runs of whitespace, removes space before `,.;:!` and trims. A lone `?` becomes a query
/// prefix when a word follows ("? sepsis" -> "?sepsis"), and ends a question otherwise.
pub(super) fn tidy(s: &str) -> String {
    let words: Vec<&str> = s.split_whitespace().collect();
    let mut out = String::with_capacity(s.len());
    let mut pending_query = false;
    for (i, w) in words.iter().enumerate() {
        if *w == "?" {
            let next = words.get(i + 1);
            if next.is_some_and(|n| n.starts_with(|c: char| c.is_alphanumeric() || c == '?' || c == '#')) {
                pending_query = true;
            } else {
                out.push('?');
            }
            continue;
        }
        if !out.is_empty() {
            let lone_punct = w.len() == 1 && matches!(*w, "," | "." | ";" | ":" | "!");
            if !lone_punct && !w.starts_with([',', '.', ';', ':', '!']) {
                out.push(' ');
            }
        }
        if pending_query && !w.starts_with('?') {
            out.push('?');
        }
        pending_query = false;
        out.push_str(w);
    }
    // A query mark from a frame meeting one inside a diagnosis ("??appendicitis").
    while out.contains("??") {
        out = out.replace("??", "?");
    }
    out
}

/// Every alternative text inside a template, for counting building blocks.
pub(super) fn alternatives(t: &str, out: &mut Vec<String>) {
    let mut rest = t;
    while let Some(pos) = rest.find('{') {
        let tail = &rest[pos..];
        match split_group(tail) {
            Some((alts, used)) => {
                for a in alts {
                    out.push(a.to_owned());
                    alternatives(a, out);
                }
                rest = &tail[used..];
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_group_handles_nesting_and_empty() {
        let (alts, used) = split_group("{a|{b|c}|}x").unwrap();
        assert_eq!(alts, vec!["a", "{b|c}", ""]);
        assert_eq!(used, 10);
        assert!(split_group("{a|b").is_none());
    }

    #[test]
    fn article_follows_sound() {
        assert_eq!(article("MRI slot"), "an");
        assert_eq!(article("CT head"), "a");
        assert_eq!(article("urgent CT"), "an");
        assert_eq!(article("HDU bed"), "an");
        assert_eq!(article("USS"), "a");
        assert_eq!(article("Ukrainian interpreter"), "a");
        assert_eq!(article("interpreter"), "an");
    }

    #[test]
    fn tidy_collapses_space_before_punctuation() {
        assert_eq!(tidy("  needs  CT ,  asap . "), "needs CT, asap.");
        assert_eq!(tidy("a ?sepsis"), "a ?sepsis");
        assert_eq!(tidy("r/v ? ?pancreatitis"), "r/v ?pancreatitis");
        assert_eq!(tidy("r/v ? sepsis"), "r/v ?sepsis");
        assert_eq!(tidy("any CT free ?"), "any CT free?");
    }
}
