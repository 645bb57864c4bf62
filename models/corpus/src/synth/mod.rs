//! Synthetic multi-site triage corpus: short clinical notes, each labelled with the one resource it asks
//! the hospital to allocate now (`doctor`, `bed`, `device` or `other`).
//!
//! Notes are composed, not templated: a note type (ED triage, ward round, nurse note, order comment,
//! handover, bed-manager message, pager message, discharge planning) lays out parts drawn from phrase
//! banks — patient descriptors, per-specialty presentations, vitals written many ways, history, findings,
//! per-resource requests, reasons, negations and non-request mentions — then each site's shorthand,
//! British/US spelling, casing and typo habits are applied. About a quarter of notes are hard cases:
//! another resource is negated, mentioned without being asked for, wanted only later, or is the subject
//! of a review request ("renal r/v re ?HD" is a doctor request).
//!
//! Sites are non-IID: each has a [`SiteStyle`] (case mix, note types, shorthand, typo rate, resources
//! it asks for most) and a label mix drawn from Dirichlet(`alpha`). Everything is drawn from ChaCha8
//! streams seeded from the config seed and the site index, so one seed gives byte-identical output.

mod compose;
mod frames;
mod lexicon;
mod noise;
mod patient;
mod resources;
mod site;
mod specialty;
mod template;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::str::FromStr;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Dirichlet, Distribution};
use serde_json::{json, Value};

pub use site::{SiteStyle, UnknownSiteStyle};

use template::Bank;

/// The resource a note asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Label {
    Doctor,
    Bed,
    Device,
    Other,
}

impl Label {
    pub const ALL: [Label; 4] = [Label::Doctor, Label::Bed, Label::Device, Label::Other];

    /// The label as written in JSONL: `doctor`, `bed`, `device`, `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Doctor => "doctor",
            Label::Bed => "bed",
            Label::Device => "device",
            Label::Other => "other",
        }
    }

    /// Position in [`Label::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A label name that is not one of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown label (expected one of doctor, bed, device, other)")]
pub struct UnknownLabel;

impl FromStr for Label {
    type Err = UnknownLabel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Label::ALL.into_iter().find(|l| l.as_str() == s).ok_or(UnknownLabel)
    }
}

/// Why a note is hard: what else it mentions besides its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HardCase {
    /// Another resource is said not to be needed ("no bed needed, just renal r/v").
    Negation,
    /// Another resource is mentioned but not asked for ("on home CPAP", "CT done", "bed 12 pt").
    Distractor,
    /// Another resource is wanted later or conditionally; the request now is the primary one.
    Secondary,
    /// A doctor is asked to decide whether a bed or device is needed ("ICU r/v re ?escalation").
    ReviewToDecide,
}

impl HardCase {
    pub const ALL: [HardCase; 4] = [HardCase::Negation, HardCase::Distractor, HardCase::Secondary, HardCase::ReviewToDecide];

    pub fn as_str(self) -> &'static str {
        match self {
            HardCase::Negation => "negation",
            HardCase::Distractor => "distractor",
            HardCase::Secondary => "secondary",
            HardCase::ReviewToDecide => "review-to-decide",
        }
    }
}

/// One site: its directory name and its style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteSpec {
    /// Lowercase letters, digits, `-` and `_`; used as a directory name.
    pub name: String,
    pub style: SiteStyle,
}

impl SiteSpec {
    pub fn new(name: impl Into<String>, style: SiteStyle) -> SiteSpec {
        SiteSpec { name: name.into(), style }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    pub seed: u64,
    pub sites: Vec<SiteSpec>,
    pub notes_per_site: usize,
    /// Dirichlet concentration for each site's label mix: 0.5 skews strongly, 100 is near-IID.
    pub alpha: f64,
    /// Train, validation and test shares; non-negative, summing to 1.
    pub split: (f64, f64, f64),
    /// Share of notes built as hard cases (negation, distracting mention, a secondary need,
    /// review-to-decide), in place of each site style's own share.
    pub hard_share: Option<f64>,
}

impl SynthConfig {
    /// 1000 notes per site, alpha 1.0, a 70/15/15 split.
    pub fn new(seed: u64, sites: Vec<SiteSpec>) -> SynthConfig {
        SynthConfig { seed, sites, notes_per_site: 1000, alpha: 1.0, split: (0.7, 0.15, 0.15), hard_share: None }
    }

    /// The three reference sites: `trauma-centre`, `rural-hospital`, `childrens-hospital`.
    pub fn default_sites() -> Vec<SiteSpec> {
        [SiteStyle::TraumaCentre, SiteStyle::RuralHospital, SiteStyle::ChildrensHospital]
            .into_iter()
            .map(|s| SiteSpec::new(s.as_str(), s))
            .collect()
    }

    /// One site of every style, named after its style.
    pub fn all_style_sites() -> Vec<SiteSpec> {
        SiteStyle::ALL.into_iter().map(|s| SiteSpec::new(s.as_str(), s)).collect()
    }
}

/// Why a config cannot be generated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SynthError {
    #[error("no sites configured")]
    NoSites,
    #[error("site name {name:?} is not a plain directory name (lowercase letters, digits, '-', '_')")]
    BadSiteName { name: String },
    #[error("site name {name:?} is used twice")]
    DuplicateSiteName { name: String },
    #[error("alpha must be a positive finite number, got {alpha}")]
    BadAlpha { alpha: f64 },
    #[error("the hard-case share must be a number from 0 to 1, got {share}")]
    BadHardShare { share: f64 },
    #[error("split shares must be non-negative and sum to 1, got ({0}, {1}, {2})")]
    BadSplit(f64, f64, f64),
}

/// A labelled note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    pub label: Label,
    /// Set when the note was built as a hard case; not written to JSONL.
    pub hard: Option<HardCase>,
}

/// One site's notes, split.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteCorpus {
    pub name: String,
    pub style: SiteStyle,
    /// The label mix drawn for this site, in [`Label::ALL`] order.
    pub label_mix: [f64; 4],
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    pub test: Vec<Example>,
}

impl SiteCorpus {
    pub fn examples(&self) -> impl Iterator<Item = &Example> {
        self.train.iter().chain(&self.validation).chain(&self.test)
    }

    pub fn len(&self) -> usize {
        self.train.len() + self.validation.len() + self.test.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Notes per label over all splits, in [`Label::ALL`] order.
    pub fn label_counts(&self) -> [usize; 4] {
        counts(self.examples())
    }

    /// Share of notes built as hard cases.
    pub fn hard_share(&self) -> f64 {
        let n = self.len();
        if n == 0 {
            return 0.0;
        }
        self.examples().filter(|e| e.hard.is_some()).count() as f64 / n as f64
    }
}

/// All sites' notes.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthCorpus {
    pub seed: u64,
    pub alpha: f64,
    pub sites: Vec<SiteCorpus>,
}

impl SynthCorpus {
    pub fn examples(&self) -> impl Iterator<Item = &Example> {
        self.sites.iter().flat_map(|s| s.examples())
    }

    /// Exact-duplicate rate over every note of every site.
    pub fn duplicate_rate(&self) -> f64 {
        duplicate_rate(self.examples().map(|e| e.text.as_str()))
    }

    /// Per-site label counts and mixes, hard-case shares, building blocks and duplicate rates.
    pub fn summary(&self) -> Value {
        let sites: Vec<Value> = self
            .sites
            .iter()
            .map(|s| {
                let mut hard: BTreeMap<&str, usize> = HardCase::ALL.iter().map(|h| (h.as_str(), 0)).collect();
                for e in s.examples() {
                    if let Some(h) = e.hard {
                        *hard.entry(h.as_str()).or_default() += 1;
                    }
                }
                json!({
                    "name": s.name,
                    "style": s.style.as_str(),
                    "notes": s.len(),
                    "label_mix": label_map(s.label_mix.map(|p| (p * 1e4).round() / 1e4)),
                    "label_counts": {
                        "train": label_map(counts(&s.train)),
                        "validation": label_map(counts(&s.validation)),
                        "test": label_map(counts(&s.test)),
                        "total": label_map(s.label_counts()),
                    },
                    "hard_share": round4(s.hard_share()),
                    "hard_cases": hard,
                    "duplicate_rate": round4(duplicate_rate(s.examples().map(|e| e.text.as_str()))),
                })
            })
            .collect();
        json!({
            "seed": self.seed,
            "alpha": self.alpha,
            "notes": self.examples().count(),
            "building_blocks": building_block_count(),
            "inline_alternatives": inline_alternative_count(),
            "duplicate_rate": round4(self.duplicate_rate()),
            "sites": sites,
        })
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn label_map<T: serde::Serialize>(v: [T; 4]) -> Value {
    let mut m = serde_json::Map::new();
    for (l, x) in Label::ALL.iter().zip(v) {
        m.insert(l.as_str().to_owned(), json!(x));
    }
    Value::Object(m)
}

fn counts<'a>(xs: impl IntoIterator<Item = &'a Example>) -> [usize; 4] {
    let mut c = [0; 4];
    for e in xs {
        c[e.label.index()] += 1;
    }
    c
}

/// Generates every site's notes and splits them.
pub fn generate(cfg: &SynthConfig) -> Result<SynthCorpus, SynthError> {
    validate(cfg)?;
    let sites = cfg.sites.iter().enumerate().map(|(i, spec)| generate_site(cfg, i, spec)).collect();
    Ok(SynthCorpus { seed: cfg.seed, alpha: cfg.alpha, sites })
}

fn validate(cfg: &SynthConfig) -> Result<(), SynthError> {
    if cfg.sites.is_empty() {
        return Err(SynthError::NoSites);
    }
    let mut seen = BTreeSet::new();
    for s in &cfg.sites {
        let ok = !s.name.is_empty() && s.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            return Err(SynthError::BadSiteName { name: s.name.clone() });
        }
        if !seen.insert(s.name.as_str()) {
            return Err(SynthError::DuplicateSiteName { name: s.name.clone() });
        }
    }
    // Dirichlet needs a normal (not subnormal) positive alpha.
    if !(cfg.alpha.is_normal() && cfg.alpha > 0.0) {
        return Err(SynthError::BadAlpha { alpha: cfg.alpha });
    }
    if let Some(share) = cfg.hard_share.filter(|h| !(0.0..=1.0).contains(h)) {
        return Err(SynthError::BadHardShare { share });
    }
    let (a, b, c) = cfg.split;
    let finite = [a, b, c].iter().all(|x| x.is_finite() && *x >= 0.0);
    if !finite || (a + b + c - 1.0).abs() > 1e-6 {
        return Err(SynthError::BadSplit(a, b, c));
    }
    Ok(())
}

/// SplitMix64 finaliser: spreads a seed so neighbouring site indices get unrelated streams.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn site_seed(seed: u64, site_idx: usize) -> u64 {
    splitmix64(seed ^ splitmix64(site_idx as u64 + 1))
}

fn generate_site(cfg: &SynthConfig, site_idx: usize, spec: &SiteSpec) -> SiteCorpus {
    let mut rng = ChaCha8Rng::seed_from_u64(site_seed(cfg.seed, site_idx));
    let mix = label_mix(&mut rng, cfg.alpha);
    let profile = spec.style.profile();
    let mut notes = Vec::with_capacity(cfg.notes_per_site);
    for _ in 0..cfg.notes_per_site {
        let label = Label::ALL[template::pick_weighted(&mut rng, &mix)];
        let d = compose::note(&mut rng, profile, label, cfg.hard_share.unwrap_or(profile.hard));
        notes.push(Example { text: d.text, label, hard: d.hard });
    }
    let (n_train, n_val, _) = split_counts(notes.len(), cfg.split);
    let test = notes.split_off(n_train + n_val);
    let validation = notes.split_off(n_train);
    SiteCorpus { name: spec.name.clone(), style: spec.style, label_mix: mix, train: notes, validation, test }
}

fn label_mix(rng: &mut ChaCha8Rng, alpha: f64) -> [f64; 4] {
    let uniform = [0.25; 4];
    let Ok(d) = Dirichlet::new([alpha; 4]) else { return uniform };
    let p: [f64; 4] = d.sample(rng);
    let sum: f64 = p.iter().sum();
    if p.iter().all(|x| x.is_finite() && *x >= 0.0) && sum > 0.0 {
        p.map(|x| x / sum)
    } else {
        uniform
    }
}

fn split_counts(n: usize, (a, b, c): (f64, f64, f64)) -> (usize, usize, usize) {
    let total = a + b + c;
    let train = ((n as f64 * a / total).round() as usize).min(n);
    let val = ((n as f64 * b / total).round() as usize).min(n - train);
    (train, val, n - train - val)
}

/// Writes `dir/<site>/{train,validation,test}.jsonl` (`{"text": ..., "label": ...}` per line) and
/// `dir/summary.json`.
pub fn write_corpus(corpus: &SynthCorpus, dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for site in &corpus.sites {
        let d = dir.join(&site.name);
        std::fs::create_dir_all(&d)?;
        for (file, xs) in [("train.jsonl", &site.train), ("validation.jsonl", &site.validation), ("test.jsonl", &site.test)] {
            let mut w = io::BufWriter::new(std::fs::File::create(d.join(file))?);
            write_jsonl(&mut w, xs)?;
            w.flush()?;
        }
    }
    let summary = serde_json::to_string_pretty(&corpus.summary()).map_err(io::Error::other)?;
    std::fs::write(dir.join("summary.json"), summary + "\n")
}

/// One `{"text": ..., "label": ...}` line per example, keys in that order.
pub fn write_jsonl(w: &mut impl Write, examples: &[Example]) -> io::Result<()> {
    for e in examples {
        let text = serde_json::to_string(&e.text).map_err(io::Error::other)?;
        writeln!(w, "{{\"text\":{text},\"label\":\"{}\"}}", e.label.as_str())?;
    }
    Ok(())
}

/// Share of texts that exactly repeat an earlier text.
pub fn duplicate_rate<'a>(texts: impl IntoIterator<Item = &'a str>) -> f64 {
    let mut seen = HashSet::new();
    let mut n = 0usize;
    let mut dup = 0usize;
    for t in texts {
        n += 1;
        if !seen.insert(t) {
            dup += 1;
        }
    }
    if n == 0 {
        0.0
    } else {
        dup as f64 / n as f64
    }
}

/// Every phrase bank the generator draws from.
fn all_banks() -> Vec<Bank> {
    use frames::*;
    let mut v: Vec<Bank> = vec![
        ASK_COMMON,
        ASK_QUESTION,
        ASK_SHORT,
        NEG_CONNECT,
        NEG_GENERIC,
        MENTION_GENERIC,
        MENTION_HAD,
        MENTION_LOCATION,
        SECONDARY,
        SECONDARY_BOOKED,
        SECONDARY_IF,
        PRIORITY,
        PRIORITY_CALM,
        REVIEW_DECIDE,
        REASON_LINK,
        ED_HEADERS,
        ED_MAIN,
        HX_PREFIX,
        WR_HEADERS,
        WR_PROGRESS,
        WR_MAIN,
        PLAN_PREFIX,
        NURSE_HEADERS,
        NURSE_OBS,
        ORDER_HEADERS,
        ORDER_PT,
        HANDOVER_HEADERS,
        HANDOVER_STATUS,
        HANDOVER_JOBS,
        HANDOVER_MAIN,
        BED_HEADERS,
        BED_WHERE,
        BED_MAIN,
        PAGER_OPENERS,
        PAGER_REF,
        PAGER_CTX,
        DP_HEADERS,
        DP_STATUS,
        DP_STATUS_CHILD,
        DP_HOLD,
        DP_MAIN,
        SIGN_OFFS,
        URGENT_PREFIX,
        ASK_SUFFIX,
        NEG_BED,
        MENTION_BED_LOCATION,
        MENTION_IN_PLACE,
        MENTION_BOOKED,
        STORY,
        TAIL,
        PLAN_LIST,
        ASK_AT_PLACE,
        patient::LANGUAGES,
        patient::PARENTS,
        patient::RELATIVES,
    ];
    v.extend(ASK_BARE);
    v.extend(ASK_LABEL);
    v.push(ASK_DEVICE_SLOT);
    v.push(ASK_SUFFIX_CALM);
    for spec in specialty::Spec::ALL {
        let b = specialty::bank(spec);
        v.extend([b.team.names, b.team.persons, b.hx, b.ops, b.drugs, b.imaging.ct, b.imaging.mri, b.imaging.us, b.imaging.xr]);
        for c in b.cases {
            v.extend([c.dx, c.pres, c.find]);
        }
    }
    for t in specialty::CONSULT_TEAMS.iter().chain(std::iter::once(&specialty::SENIOR_TEAM)) {
        v.extend([t.names, t.persons]);
    }
    for r in resources::all() {
        v.extend([r.names, r.asks, r.reasons, r.child_reasons, r.query, r.mentions, r.negations]);
    }
    for s in SiteStyle::ALL {
        let p = s.profile();
        v.extend([p.context, p.wards, p.hospitals]);
    }
    v
}

/// Number of distinct phrase building blocks: bank entries (each a template with its own inline
/// alternatives) plus shorthand, spelling and US-term lexicon entries.
pub fn building_block_count() -> usize {
    let distinct: HashSet<&str> = all_banks().into_iter().flatten().copied().collect();
    distinct.len() + lexicon::entry_count()
}

/// Number of distinct inline alternatives (`{a|b}` options) inside all bank entries; a finer count.
pub fn inline_alternative_count() -> usize {
    let mut alts = Vec::new();
    let entries: HashSet<&str> = all_banks().into_iter().flatten().copied().collect();
    for e in entries {
        template::alternatives(e, &mut alts);
    }
    alts.into_iter().filter(|a| !a.trim().is_empty()).collect::<HashSet<_>>().len()
}

#[cfg(test)]
mod tests;
