//! Composes one note: draws the note type, resource, specialty and patient; builds the note's parts in
//! that note type's layout; adds a hard case where drawn; then applies the site's shorthand, spelling,
//! casing and typo passes and keeps the note within 5..=60 words.
//!
//! The label is fixed before anything is written: the primary request is always rendered from a
//! resource with that label, and every other resource a note mentions appears only in forms that are
//! not requests (negated, already done, in place, a location, a later or conditional need).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::frames::*;
use super::lexicon;
use super::noise;
use super::patient::Patient;
use super::resources::{self, Decider, Resource};
use super::site::{NoteType, SiteProfile};
use super::specialty::{self, Spec, Team, CONSULT_TEAMS, SENIOR_TEAM};
use super::template::{pick_str, pick_weighted, Bank, Focus, NoteCtx, Renderer, Sev};
use super::{HardCase, Label};

pub(super) const MIN_WORDS: usize = 5;
/// Device resources that are booked as slots rather than brought to the bedside.
const SLOT_KEYS: &[&str] = &["dialysis", "ct", "mri", "ultrasound", "xray", "eeg", "ambulatory_monitoring"];
/// Device resources that a patient takes home; their discharge-planning notes may say "MFFD".
const HOME_DEVICE_KEYS: &[&str] = &["o2_concentrator", "hoist", "feeding_pump", "syringe_driver", "pressure_mattress", "wound_vac"];
pub(super) const MAX_WORDS: usize = 60;

/// A finished note.
pub(super) struct Drawn {
    pub text: String,
    pub hard: Option<HardCase>,
    /// Character-level typos introduced (read by tests).
    #[cfg_attr(not(test), allow(dead_code))]
    pub typos: usize,
}

/// The hard case drawn for a note, with the second resource it involves.
enum Plan {
    Negation(Focus),
    Mention(Focus),
    Location,
    Secondary(Focus),
    Review(Focus),
}

impl Plan {
    fn kind(&self) -> HardCase {
        match self {
            Plan::Negation(_) => HardCase::Negation,
            Plan::Mention(_) | Plan::Location => HardCase::Distractor,
            Plan::Secondary(_) => HardCase::Secondary,
            Plan::Review(_) => HardCase::ReviewToDecide,
        }
    }
}

/// A piece of a note. Parts with `keep` carry the label or the hard case and are never dropped;
/// others go lowest `prio` first when a note runs long.
struct Part {
    text: String,
    keep: bool,
    prio: u8,
    /// Joined to the next part with a space (headers, "Plan:").
    lead: bool,
}

fn part(text: String, prio: u8) -> Part {
    Part { text, keep: false, prio, lead: false }
}

fn kept(text: String) -> Part {
    Part { text, keep: true, prio: u8::MAX, lead: false }
}

fn lead(text: String) -> Part {
    Part { text, keep: false, prio: 0, lead: true }
}

/// Writes one note with `label` in the style of `site`; a hard case with chance `hard_share`.
pub(super) fn note(rng: &mut ChaCha8Rng, site: &'static SiteProfile, label: Label, hard_share: f64) -> Drawn {
    for _ in 0..64 {
        if let Some(d) = attempt(rng, site, label, hard_share) {
            return d;
        }
    }
    fallback(label)
}

/// A plain, always-valid note; only reached if 64 attempts all fall outside the word bounds.
fn fallback(label: Label) -> Drawn {
    let ask = match label {
        Label::Doctor => "needs a senior doctor to review the patient please",
        Label::Bed => "needs admission to a ward bed please",
        Label::Device => "needs a portable chest X-ray please",
        Label::Other => "needs a social work referral please",
    };
    Drawn { text: format!("Patient {ask}"), hard: None, typos: 0 }
}

fn pick_note_type(rng: &mut ChaCha8Rng, site: &SiteProfile, label: Label) -> NoteType {
    let w: Vec<f64> = NoteType::ALL.iter().enumerate().map(|(i, nt)| site.note_mix[i] * nt.affinity()[label.index()]).collect();
    NoteType::ALL[pick_weighted(rng, &w)]
}

/// Sum of the site's specialty weights that `res` fits.
fn reach(site: &SiteProfile, res: &Resource) -> f64 {
    site.specialties.iter().filter(|(s, _)| res.fits(*s)).map(|(_, w)| w).sum()
}

/// How often a resource is asked for in a note type, relative to its base weight: nobody books
/// follow-up from ED triage or asks the bed manager for a hoist.
fn note_fit(key: &str, nt: NoteType) -> f64 {
    match nt {
        NoteType::EdTriage => match key {
            "discharge_paperwork" | "rehab_bed" | "school_liaison" | "pressure_mattress" => 0.1,
            "followup" | "o2_concentrator" | "records" | "welfare" => 0.25,
            "hoist" | "chaplain" | "dietitian" | "ot" | "physio" | "specialist_nurse" => 0.35,
            _ => 1.0,
        },
        NoteType::OrderComment => match key {
            "ct" | "mri" | "ultrasound" | "xray" | "eeg" | "dialysis" | "specialist" => 1.6,
            "chaplain" | "school_liaison" | "welfare" => 0.3,
            _ => 1.0,
        },
        NoteType::DischargePlanning => match key {
            "discharge_paperwork"
            | "followup"
            | "transport"
            | "rehab_bed"
            | "o2_concentrator"
            | "hoist"
            | "social_work"
            | "ot"
            | "pharmacy" => 2.0,
            "icu_bed" | "hdu_bed" | "picu_bed" | "ventilator" | "ecmo" | "crrt" | "pacing_box" => 0.1,
            _ => 1.0,
        },
        NoteType::BedManager => match key {
            "tertiary_transfer" | "ward_bed" | "icu_bed" | "hdu_bed" | "isolation_room" => 1.5,
            _ => 1.0,
        },
        _ => 1.0,
    }
}

fn pick_resource(rng: &mut ChaCha8Rng, site: &SiteProfile, label: Label, nt: NoteType) -> &'static Resource {
    let all = resources::all();
    let w: Vec<f64> = all
        .iter()
        .map(|r| if r.label == label { r.weight * site.boost(r.key) * note_fit(r.key, nt) * reach(site, r) } else { 0.0 })
        .collect();
    &all[pick_weighted(rng, &w)]
}

fn pick_spec(rng: &mut ChaCha8Rng, site: &SiteProfile, res: &Resource, nt: NoteType) -> Spec {
    // Routine "other" requests are rarely about a patient still in intensive care, and ICU patients
    // are not triaged in ED.
    let w: Vec<f64> = site
        .specialties
        .iter()
        .map(|(s, w)| match (res.fits(*s), res.label, s) {
            (false, ..) => 0.0,
            (true, Label::Other, Spec::Icu) => w * 0.2,
            (true, _, Spec::Icu) if nt == NoteType::EdTriage => w * 0.1,
            (true, ..) => *w,
        })
        .collect();
    site.specialties[pick_weighted(rng, &w)].0
}

/// A second resource with a different label that suits this patient, for a hard case.
fn pick_other(
    rng: &mut ChaCha8Rng,
    site: &SiteProfile,
    label: Label,
    spec: Spec,
    ok: impl Fn(&Resource) -> bool,
) -> Option<&'static Resource> {
    let all = resources::all();
    let w: Vec<f64> =
        all.iter().map(|r| if r.label != label && r.fits(spec) && ok(r) { r.weight * site.boost(r.key) } else { 0.0 }).collect();
    if w.iter().all(|x| *x <= 0.0) {
        return None;
    }
    Some(&all[pick_weighted(rng, &w)])
}

/// The team a doctor request goes to, or the patient's own team for anything else.
fn team_for(rng: &mut ChaCha8Rng, site: &SiteProfile, res: &Resource, spec: Spec, nt: NoteType) -> &'static Team {
    let own = &specialty::bank(spec).team;
    match res.key {
        "senior" => &SENIOR_TEAM,
        "specialist" => {
            // On a ward round or in discharge planning the author is usually the own team.
            let own_share = if matches!(nt, NoteType::WardRound | NoteType::DischargePlanning) { 0.25 } else { 0.5 };
            let x = rng.random::<f64>();
            if x < own_share {
                own
            } else if x < own_share + 0.3 {
                let w: Vec<f64> =
                    site.specialties.iter().map(|(s, w)| if s.is_child() == spec.is_child() && *s != spec { *w } else { 0.0 }).collect();
                if w.iter().all(|v| *v <= 0.0) {
                    own
                } else {
                    &specialty::bank(site.specialties[pick_weighted(rng, &w)].0).team
                }
            } else {
                let names = specialty::bank(spec).consults;
                let name = names.get(rng.random_range(0..names.len().max(1))).copied().unwrap_or("anaesthetics");
                // CONSULT_TEAMS is a fixed-size, non-empty array.
                specialty::consult_team(name).unwrap_or(&CONSULT_TEAMS[0])
            }
        }
        _ => own,
    }
}

fn decider_team(res: &Resource, spec: Spec) -> &'static Team {
    match res.decider {
        Decider::Own => &specialty::bank(spec).team,
        Decider::Senior => &SENIOR_TEAM,
        Decider::Spec(s) => &specialty::bank(s).team,
        Decider::Consult(name) => specialty::consult_team(name).unwrap_or(&SENIOR_TEAM),
    }
}

fn jitter(rng: &mut ChaCha8Rng, sev: Sev, label: Label) -> Sev {
    let x = rng.random::<f64>();
    if label == Label::Other {
        return if x < 0.85 { Sev::Stable } else { Sev::Unwell };
    }
    match sev {
        Sev::Stable if x < 0.8 => Sev::Stable,
        Sev::Stable => Sev::Unwell,
        Sev::Unwell if x < 0.2 => Sev::Stable,
        Sev::Unwell if x < 0.85 => Sev::Unwell,
        Sev::Unwell => Sev::Critical,
        Sev::Critical if x < 0.25 => Sev::Unwell,
        Sev::Critical => Sev::Critical,
    }
}

fn draw_plan(rng: &mut ChaCha8Rng, site: &SiteProfile, label: Label, spec: Spec, nt: NoteType, hard_share: f64) -> Option<Plan> {
    if rng.random::<f64>() >= hard_share {
        return None;
    }
    let own = &specialty::bank(spec).team;
    let focus_of = |rng: &mut ChaCha8Rng, r: &'static Resource| Focus { res: r, team: team_for(rng, site, r, spec, nt) };
    let weights: [f64; 4] = if label == Label::Doctor { [0.3, 0.3, 0.18, 0.22] } else { [0.38, 0.37, 0.25, 0.0] };
    match pick_weighted(rng, &weights) {
        0 => {
            // "bed" is often the only resource noun of a short note that asks for something else:
            // a third of other labels' negations deny a bed.
            let bed_only = label != Label::Bed && rng.random::<f64>() < 0.35;
            pick_other(rng, site, label, spec, |r| !bed_only || r.label == Label::Bed).map(|r| Plan::Negation(focus_of(rng, r)))
        }
        1 => {
            let location_share = if label == Label::Doctor { 0.45 } else { 0.3 };
            if label != Label::Bed && rng.random::<f64>() < location_share {
                return Some(Plan::Location);
            }
            pick_other(rng, site, label, spec, |r| !r.mentions.is_empty()).map(|r| Plan::Mention(focus_of(rng, r)))
        }
        // Emergency kit and security are never a planned later need.
        2 => {
            pick_other(rng, site, label, spec, |r| !matches!(r.key, "bedside_kit" | "security")).map(|r| Plan::Secondary(focus_of(rng, r)))
        }
        _ => pick_other(rng, site, label, spec, |r| matches!(r.label, Label::Bed | Label::Device) && !r.query.is_empty())
            .map(|r| Plan::Review(Focus { res: r, team: decider_team(r, spec) }))
            .or(Some(Plan::Negation(Focus { res: resources::by_key("ct").unwrap_or(&resources::all()[0]), team: own }))),
    }
}

fn attempt(rng: &mut ChaCha8Rng, site: &'static SiteProfile, label: Label, hard_share: f64) -> Option<Drawn> {
    let nt = pick_note_type(rng, site, label);
    let res = pick_resource(rng, site, label, nt);
    let spec = pick_spec(rng, site, res, nt);
    // Every specialty has at least one case (checked by `named_teams_resolve`); a critical-care
    // request is never about a wrist fracture.
    let cases = specialty::bank(spec).cases;
    let w: Vec<f64> = cases.iter().map(|c| if res.sev == Sev::Critical && c.minor { 0.0 } else { 1.0 }).collect();
    let case = &cases[pick_weighted(rng, &w)];
    let patient = Patient::draw(rng, spec.age_band(), case.months, case.male_only);
    let sev = jitter(rng, res.sev, label);
    let us = rng.random::<f64>() < site.us;
    let team = team_for(rng, site, res, spec, nt);
    let plan = draw_plan(rng, site, label, spec, nt, hard_share);
    let ctx = NoteCtx { site, spec, case, patient, sev, us };
    let mut r = Renderer { rng, note: &ctx, focus: Focus { res, team } };

    let mut parts = layout(&mut r, nt, plan.as_ref());
    for p in &mut parts {
        p.text = rewrite(&mut r, &p.text);
    }
    let (seps, cap_after) = separators(r.rng, nt);
    loop {
        let text = join(&parts, seps, cap_after);
        if words(&text) <= MAX_WORDS {
            break;
        }
        // Drop the lowest-priority optional part; ties go to the later one.
        let victim = parts.iter().enumerate().filter(|(_, p)| !p.keep).min_by_key(|(i, p)| (p.prio, usize::MAX - i)).map(|(i, _)| i)?;
        parts.remove(victim);
    }
    let text = join(&parts, seps, cap_after);
    let (text, typos) = finish(r.rng, site, nt, &text);
    let n = words(&text);
    if !(MIN_WORDS..=MAX_WORDS).contains(&n) {
        return None;
    }
    Some(Drawn { text, hard: plan.map(|p| p.kind()), typos })
}

pub(super) fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

/// US terms and spelling where the note is US-styled (a few US spellings leak into British notes), then shorthand.
fn rewrite(r: &mut Renderer<'_>, s: &str) -> String {
    let site = r.note.site;
    let s = if r.note.us {
        let t = lexicon::us_terms(r.rng, s);
        lexicon::us_spelling(r.rng, &t, 0.12)
    } else if r.rng.random::<f64>() < 0.06 {
        lexicon::us_spelling(r.rng, s, 0.5)
    } else {
        s.to_owned()
    };
    let s = lexicon::abbreviate(r.rng, &s, site.abbrev);
    lexicon::fix_articles(&s)
}

fn separators(rng: &mut ChaCha8Rng, nt: NoteType) -> (&'static str, bool) {
    let opts: &[&str] = match nt {
        NoteType::EdTriage => &[". ", ". ", ", ", "; ", " - ", ". "],
        NoteType::WardRound => &[". ", ". ", "; ", ", ", " - "],
        NoteType::NurseNote => &[". ", ", ", ". ", " - "],
        NoteType::OrderComment => &[" - ", ". ", "; ", ", "],
        NoteType::Handover => &[" - ", ", ", ". ", "; "],
        NoteType::BedManager => &[". ", ", ", " - ", ". "],
        NoteType::Pager => &[", ", ". ", " - ", ", "],
        NoteType::DischargePlanning => &[". ", "; ", ". ", ", "],
    };
    (opts[rng.random_range(0..opts.len())], rng.random::<f64>() < 0.75)
}

fn join(parts: &[Part], sep: &str, cap_after: bool) -> String {
    let mut out = String::new();
    let mut prev_lead = false;
    for p in parts.iter().filter(|p| !p.text.trim().is_empty()) {
        let t = p.text.trim();
        if out.is_empty() {
            out.push_str(t);
        } else if prev_lead || out.ends_with([':', ';', ',', '.', '-', '?', '!', '(']) {
            out.push(' ');
            out.push_str(t);
        } else {
            out.push_str(sep);
            if sep == ". " && cap_after {
                out.push_str(&noise::capitalise(t));
            } else {
                out.push_str(t);
            }
        }
        prev_lead = p.lead;
    }
    out
}

/// Casing, end punctuation and typos for the joined note.
fn finish(rng: &mut ChaCha8Rng, site: &SiteProfile, nt: NoteType, text: &str) -> (String, usize) {
    let mut s = if rng.random::<f64>() < site.lower * nt.lowercase_factor() {
        text.to_lowercase()
    } else {
        let x = rng.random::<f64>();
        if x < 0.7 {
            noise::capitalise(text)
        } else if x < 0.82 {
            noise::decapitalise(text)
        } else {
            text.to_owned()
        }
    };
    if s.ends_with(|c: char| c.is_alphanumeric() || c == ')') && rng.random::<f64>() < 0.4 {
        s.push('.');
    }
    let (s, n) = noise::typos(rng, &s, site.typo);
    let s = super::template::tidy(&s);
    // A bare order line ("CT head -") can end the note; a dangling dash reads as truncation.
    let s = s.strip_suffix(" -").map(str::to_owned).unwrap_or(s);
    (s, n)
}

fn opt(r: &mut Renderer<'_>, p: f64, bank: Bank, prio: u8) -> Option<Part> {
    if r.chance(p) {
        Some(part(r.bank(bank), prio))
    } else {
        None
    }
}

fn opt_tpl(r: &mut Renderer<'_>, p: f64, tpl: &str, prio: u8) -> Option<Part> {
    if r.chance(p) {
        Some(part(r.render(tpl), prio))
    } else {
        None
    }
}

fn site_context(r: &mut Renderer<'_>) -> Option<Part> {
    let rate = r.note.site.context_rate;
    opt_tpl(r, rate, "<site_ctx>", 0)
}

/// The primary request in a form that suits the note type.
fn primary_ask(r: &mut Renderer<'_>, nt: NoteType) -> String {
    let res = r.focus.res;
    let label = res.label;
    let x = r.rng.random::<f64>();
    let bank: Bank = match nt {
        NoteType::Pager if x < 0.3 && label != Label::Doctor => ASK_QUESTION,
        NoteType::OrderComment if x < 0.4 => ASK_BARE[label.index()],
        _ => {
            let y = r.rng.random::<f64>();
            let (own, lab) = match label {
                Label::Other => (0.6, 0.18),
                Label::Doctor => (0.42, 0.38),
                _ => (0.45, 0.28),
            };
            if label != Label::Doctor && label != Label::Bed && r.chance(0.06) {
                ASK_AT_PLACE
            } else if y < own {
                res.asks
            } else if y < own + lab {
                if label == Label::Device && SLOT_KEYS.contains(&res.key) {
                    ASK_DEVICE_SLOT
                } else {
                    ASK_LABEL[label.index()]
                }
            } else {
                ASK_COMMON
            }
        }
    };
    let mut s = r.bank(bank);
    // "slot for CT slot": a frame and a name both saying "slot".
    for _ in 0..8 {
        if s.matches("slot").count() < 2 {
            break;
        }
        s = r.bank(bank);
    }
    if r.chance(0.18) && !res.reasons.is_empty() {
        let link = pick_str(r.rng, REASON_LINK);
        let why = r.render("<reason>");
        s = if link == " (" { format!("{s} ({why})") } else { format!("{s}{link} {why}") };
    } else if r.chance(0.1) && !ends_politely(&s) {
        let calm = label == Label::Other || r.note.sev == Sev::Stable;
        s.push_str(pick_str(r.rng, if calm { ASK_SUFFIX_CALM } else { ASK_SUFFIX }));
    }
    if label != Label::Other && r.note.sev != Sev::Stable && r.chance(0.04) {
        s = format!("{} {s}", pick_str(r.rng, URGENT_PREFIX));
    }
    s
}

/// Whether a request already ends in "pls", "thanks", a question or a bracket, so no suffix is added.
fn ends_politely(s: &str) -> bool {
    let last = s.split_whitespace().last().unwrap_or("").to_ascii_lowercase();
    matches!(last.as_str(), "pls" | "plz" | "please" | "thanks" | "thx" | "ta") || last.ends_with(['?', ')'])
}

/// The request and whatever the hard case attaches to it, in order.
fn ask_block(r: &mut Renderer<'_>, nt: NoteType, plan: Option<&Plan>) -> Vec<Part> {
    match plan {
        Some(Plan::Negation(f2)) => {
            let f2 = *f2;
            let neg = if f2.res.label == Label::Bed && r.chance(0.45) {
                let t = pick_str(r.rng, NEG_BED);
                r.render_with(f2, t)
            } else if r.chance(0.6) && !f2.res.negations.is_empty() {
                let t = pick_str(r.rng, f2.res.negations);
                r.render_with(f2, t)
            } else {
                let t = pick_str(r.rng, NEG_GENERIC);
                r.render_with(f2, t)
            };
            match r.rng.random_range(0..20) {
                0..=5 => vec![kept(neg), kept(primary_ask(r, nt))],
                6..=10 => vec![kept(primary_ask(r, nt)), kept(neg)],
                11..=17 => {
                    let short = r.bank(ASK_SHORT);
                    let conn = pick_str(r.rng, NEG_CONNECT);
                    vec![kept(format!("{neg}{conn} {short}"))]
                }
                _ => {
                    let name = r.render_with(f2, "<r>");
                    let short = r.bank(ASK_SHORT);
                    let not = r.render("{not|NOT|not for}");
                    let join = r.render("{,| -|;}");
                    vec![kept(format!("{not} {name}{join} {short}"))]
                }
            }
        }
        Some(Plan::Secondary(f2)) => {
            let f2 = *f2;
            let mut ask = primary_ask(r, nt);
            let already_urgent = URGENT_PREFIX.iter().any(|p| ask.to_lowercase().starts_with(&p.to_lowercase()));
            if r.chance(0.35) && !already_urgent {
                let calm = r.focus.res.label == Label::Other || r.note.sev == Sev::Stable;
                ask = format!("{} {ask}", pick_str(r.rng, if calm { PRIORITY_CALM } else { PRIORITY }));
            }
            // Critical kit is only ever needed "if", never booked for later.
            let urgent_kit = f2.res.sev == Sev::Critical || matches!(f2.res.key, "bedside_kit" | "security");
            let bank = if urgent_kit {
                SECONDARY_IF
            } else if f2.res.label != Label::Bed && r.chance(0.25) {
                SECONDARY_BOOKED
            } else {
                SECONDARY
            };
            let t = pick_str(r.rng, bank);
            let later = r.render_with(f2, t);
            vec![kept(ask), kept(later)]
        }
        Some(Plan::Review(f2)) => {
            let f2 = *f2;
            let t = pick_str(r.rng, REVIEW_DECIDE);
            let ask = r.render_with(f2, t);
            if r.chance(0.55) && !f2.res.reasons.is_empty() {
                let t = pick_str(r.rng, f2.res.reasons);
                let why = r.render_with(f2, t);
                vec![part(why, 4), kept(ask)]
            } else {
                vec![kept(ask)]
            }
        }
        _ => vec![kept(primary_ask(r, nt))],
    }
}

/// The distractor part of a Mention or Location hard case.
fn distractor(r: &mut Renderer<'_>, plan: Option<&Plan>) -> Option<Part> {
    match plan {
        Some(Plan::Mention(f2)) => {
            let f2 = *f2;
            let in_place = f2.res.label == Label::Device && r.chance(0.35);
            let bank = match (r.chance(0.7), f2.res.label) {
                _ if in_place && SLOT_KEYS.contains(&f2.res.key) => MENTION_BOOKED,
                _ if in_place => MENTION_IN_PLACE,
                (true, _) => f2.res.mentions,
                (false, Label::Bed) => MENTION_GENERIC,
                (false, _) if r.chance(0.5) => MENTION_HAD,
                (false, _) => MENTION_GENERIC,
            };
            let t = pick_str(r.rng, bank);
            Some(kept(r.render_with(f2, t)))
        }
        Some(Plan::Location) => {
            let bank = if r.chance(0.5) { MENTION_BED_LOCATION } else { MENTION_LOCATION };
            Some(kept(r.bank(bank)))
        }
        _ => None,
    }
}

/// Context parts with the distractor (if any) placed among them.
fn with_distractor(r: &mut Renderer<'_>, mut ctx: Vec<Part>, plan: Option<&Plan>) -> Vec<Part> {
    if let Some(d) = distractor(r, plan) {
        let at = r.rng.random_range(0..=ctx.len());
        ctx.insert(at, d);
    }
    ctx
}

fn prefixed(r: &mut Renderer<'_>, p: f64, bank: Bank, mut block: Vec<Part>) -> Vec<Part> {
    if r.chance(p) {
        block.insert(0, lead(r.bank(bank)));
    }
    block
}

/// One or two story sentences that name no resource, for the longer notes (chance `p`).
fn story(r: &mut Renderer<'_>, p: f64) -> Vec<Part> {
    let mut out = Vec::new();
    if r.chance(p) {
        let first = r.bank(STORY);
        if r.chance(0.5) {
            let second = r.bank(STORY);
            if second != first {
                out.push(part(second, 1));
            }
        }
        out.insert(0, part(first, 1));
    }
    out
}

/// What the note says after its ask, so the ask sits in the middle (chance `p`).
fn tail(r: &mut Renderer<'_>, p: f64) -> Option<Part> {
    opt(r, p, TAIL, 1)
}

/// The ask as the middle line of a numbered plan: "Plan: 1) ... 2) <ask> 3) ...".
fn plan_list(r: &mut Renderer<'_>, block: Vec<Part>) -> Vec<Part> {
    let head = pick_str(r.rng, PLAN_LIST);
    let before = r.bank(TAIL);
    let after = r.bank(TAIL);
    let ask: Vec<&str> = block.iter().map(|p| p.text.trim()).filter(|t| !t.is_empty()).collect();
    vec![kept(format!("{head} 1) {before} 2) {} 3) {after}", ask.join("; ")))]
}

fn layout(r: &mut Renderer<'_>, nt: NoteType, plan: Option<&Plan>) -> Vec<Part> {
    let mut out: Vec<Part> = Vec::new();
    match nt {
        NoteType::EdTriage => {
            if r.chance(0.5) {
                out.push(lead(r.bank(ED_HEADERS)));
            }
            let mut ctx = vec![kept(r.bank(ED_MAIN))];
            ctx.extend(opt_tpl(r, 0.65, "<vitals>", 3));
            let hx = format!("{} <hx>", pick_str(r.rng, HX_PREFIX));
            ctx.extend(opt_tpl(r, 0.3, &hx, 1));
            ctx.extend(opt_tpl(r, 0.25, "<find>", 2));
            ctx.extend(opt_tpl(r, 0.4, "<reason>", 4));
            ctx.extend(story(r, 0.25));
            ctx.extend(site_context(r));
            out.extend(with_distractor(r, ctx, plan));
            out.extend(ask_block(r, nt, plan));
            out.extend(tail(r, 0.2));
            out.extend(opt(r, 0.12, SIGN_OFFS, 0));
        }
        NoteType::WardRound => {
            if r.chance(0.6) {
                out.push(lead(r.bank(WR_HEADERS)));
            }
            let mut ctx = vec![kept(r.bank(WR_MAIN))];
            ctx.extend(opt(r, 0.6, WR_PROGRESS, 2));
            ctx.extend(opt_tpl(r, 0.35, "<find>", 2));
            ctx.extend(opt_tpl(r, 0.2, "<vitals>", 1));
            ctx.extend(opt_tpl(r, 0.3, "<reason>", 3));
            ctx.extend(story(r, 0.3));
            ctx.extend(site_context(r));
            out.extend(with_distractor(r, ctx, plan));
            let block = ask_block(r, nt, plan);
            if r.chance(0.2) {
                out.extend(plan_list(r, block));
            } else {
                out.extend(prefixed(r, 0.55, PLAN_PREFIX, block));
                out.extend(tail(r, 0.3));
            }
            out.extend(opt(r, 0.08, SIGN_OFFS, 0));
        }
        NoteType::NurseNote => {
            if r.chance(0.45) {
                out.push(lead(r.bank(NURSE_HEADERS)));
            }
            let main = if r.chance(0.75) { r.bank(NURSE_OBS) } else { r.bank(ED_MAIN) };
            let mut ctx = vec![kept(main)];
            ctx.extend(opt_tpl(r, 0.55, "<vitals>", 3));
            ctx.extend(opt_tpl(r, 0.35, "<reason>", 4));
            ctx.extend(opt_tpl(r, 0.2, "<dx>", 1));
            ctx.extend(story(r, 0.3));
            ctx.extend(site_context(r));
            out.extend(with_distractor(r, ctx, plan));
            out.extend(ask_block(r, nt, plan));
            out.extend(tail(r, 0.3));
            out.extend(opt(r, 0.35, SIGN_OFFS, 0));
        }
        NoteType::OrderComment => {
            if r.chance(0.5) {
                out.push(lead(r.bank(ORDER_HEADERS)));
            }
            let block = ask_block(r, nt, plan);
            let mut ctx = Vec::new();
            ctx.extend(opt_tpl(r, 0.7, "<reason>", 4));
            ctx.extend(opt(r, 0.55, ORDER_PT, 3));
            ctx.extend(opt_tpl(r, 0.3, "<find>", 2));
            ctx.extend(opt_tpl(r, 0.2, "<hx>", 1));
            ctx.extend(site_context(r));
            let ctx = with_distractor(r, ctx, plan);
            if r.chance(0.8) {
                out.extend(block);
                out.extend(ctx);
            } else {
                out.extend(ctx);
                out.extend(block);
            }
        }
        NoteType::Handover => {
            if r.chance(0.5) {
                out.push(lead(r.bank(HANDOVER_HEADERS)));
            }
            if r.chance(0.7) && !matches!(plan, Some(Plan::Location)) {
                out.push(lead(r.render("<loc>{:| -}")));
            }
            let mut ctx = vec![kept(r.bank(HANDOVER_MAIN))];
            ctx.extend(opt(r, 0.5, HANDOVER_STATUS, 2));
            ctx.extend(opt_tpl(r, 0.3, "<vitals>", 2));
            ctx.extend(opt_tpl(r, 0.3, "<reason>", 3));
            ctx.extend(story(r, 0.2));
            ctx.extend(site_context(r));
            out.extend(with_distractor(r, ctx, plan));
            let block = ask_block(r, nt, plan);
            if r.chance(0.15) {
                out.extend(plan_list(r, block));
            } else {
                out.extend(prefixed(r, 0.65, HANDOVER_JOBS, block));
                out.extend(tail(r, 0.25));
            }
        }
        NoteType::BedManager => {
            if r.chance(0.85) {
                out.push(lead(r.bank(BED_HEADERS)));
            }
            let block = ask_block(r, nt, plan);
            let mut ctx = vec![kept(r.bank(BED_MAIN))];
            ctx.extend(opt(r, 0.55, BED_WHERE, 3));
            ctx.extend(opt_tpl(r, 0.55, "<reason>", 4));
            ctx.extend(opt_tpl(r, 0.2, "<news>", 2));
            ctx.extend(site_context(r));
            let ctx = with_distractor(r, ctx, plan);
            if r.chance(0.55) {
                out.extend(block);
                out.extend(ctx);
            } else {
                out.extend(ctx);
                out.extend(block);
            }
            out.extend(opt(r, 0.35, SIGN_OFFS, 0));
        }
        NoteType::Pager => {
            if r.chance(0.75) {
                out.push(lead(r.bank(PAGER_OPENERS)));
            }
            let mut ctx = Vec::new();
            if !matches!(plan, Some(Plan::Location)) {
                ctx.extend(opt(r, 0.6, PAGER_REF, 3));
            }
            let what = r.bank(PAGER_CTX);
            ctx.push(part(what, 4));
            ctx.extend(opt_tpl(r, 0.3, "<vitals>", 2));
            ctx.extend(opt_tpl(r, 0.3, "<reason>", 3));
            out.extend(with_distractor(r, ctx, plan));
            out.extend(ask_block(r, nt, plan));
            out.extend(opt(r, 0.55, SIGN_OFFS, 1));
        }
        NoteType::DischargePlanning => {
            if r.chance(0.6) {
                out.push(lead(r.bank(DP_HEADERS)));
            }
            let mut ctx = vec![kept(r.bank(DP_MAIN))];
            // Only a patient going home is "MFFD"; a bed, a doctor or most devices mean discharge is on hold.
            let going_home = match r.focus.res.label {
                Label::Other => true,
                Label::Device => HOME_DEVICE_KEYS.contains(&r.focus.res.key),
                Label::Bed => r.focus.res.key == "rehab_bed",
                Label::Doctor => false,
            };
            let status = match (going_home, r.note.spec.is_child()) {
                (false, _) => DP_HOLD,
                (true, true) => DP_STATUS_CHILD,
                (true, false) => DP_STATUS,
            };
            ctx.extend(opt(r, 0.8, status, 3));
            ctx.extend(opt(r, 0.3, status, 1));
            ctx.extend(opt_tpl(r, 0.4, "<reason>", 3));
            ctx.extend(site_context(r));
            out.extend(with_distractor(r, ctx, plan));
            out.extend(ask_block(r, nt, plan));
            out.extend(opt(r, 0.1, SIGN_OFFS, 0));
        }
    }
    out
}
