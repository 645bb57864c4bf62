//! The patient in a note: age, sex and weight, written many ways, and vitals drawn to match how unwell they are.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::template::{Bank, Sev};

/// Age group; decides how the patient is described and which vital ranges apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AgeBand {
    Neonate,
    Child,
    Adolescent,
    Adult,
    Elderly,
    Obstetric,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Sex {
    Male,
    Female,
}

#[derive(Clone, Debug)]
pub(super) struct Patient {
    pub band: AgeBand,
    pub sex: Sex,
    /// Whole years; 0 for infants and neonates.
    pub years: u32,
    /// Months for infants under one year.
    pub months: u32,
    /// Days of life for neonates.
    pub days: u32,
    pub weight_kg: f64,
    /// Gestation in weeks for pregnant patients and preterm neonates.
    pub gest_weeks: u32,
    /// Initial letter used for "Mr K".
    pub initial: char,
}

impl Patient {
    /// A patient of `band`; `range` narrows a child's age (months) or a pregnancy's gestation (weeks).
    pub fn draw(rng: &mut ChaCha8Rng, band: AgeBand, range: Option<(u32, u32)>, male_only: bool) -> Patient {
        let sex = match band {
            AgeBand::Obstetric => Sex::Female,
            _ if male_only => Sex::Male,
            _ if rng.random::<bool>() => Sex::Male,
            _ => Sex::Female,
        };
        let (years, months, days) = match band {
            AgeBand::Neonate => (0, 0, rng.random_range(0..=27)),
            AgeBand::Child => {
                let (lo, hi) = range.unwrap_or((1, 191));
                let m = rng.random_range(lo.max(1)..=hi.max(lo.max(1)));
                if m < 12 {
                    (0, m, 0)
                } else {
                    (m / 12, 0, 0)
                }
            }
            AgeBand::Adolescent => (rng.random_range(11..=17), 0, 0),
            AgeBand::Adult => (rng.random_range(18..=92), 0, 0),
            AgeBand::Elderly => (rng.random_range(74..=101), 0, 0),
            AgeBand::Obstetric => (rng.random_range(17..=44), 0, 0),
        };
        let weight_kg = match band {
            AgeBand::Neonate => rng.random_range(0.9..4.4),
            AgeBand::Child if years == 0 => 3.5 + 0.6 * months as f64 + rng.random_range(-0.6..0.6),
            AgeBand::Child => 2.2 * years as f64 + 8.0 + rng.random_range(-2.0..3.0),
            AgeBand::Adolescent => rng.random_range(32.0..78.0),
            _ => rng.random_range(45.0..130.0),
        };
        let gest_weeks = match band {
            AgeBand::Obstetric => {
                let (lo, hi) = range.unwrap_or((24, 41));
                rng.random_range(lo..=hi.max(lo))
            }
            _ => rng.random_range(26..=41),
        };
        let initial = char::from(b'A' + rng.random_range(0..26u8));
        Patient { band, sex, years, months, days, weight_kg, gest_weeks, initial }
    }

    /// 0: subject, 1: possessive, 2: object, 3: reflexive.
    pub fn pronoun(&self, case: usize) -> &'static str {
        let (he, she) = [("he", "she"), ("his", "her"), ("him", "her"), ("himself", "herself")][case.min(3)];
        match self.sex {
            Sex::Male => he,
            Sex::Female => she,
        }
    }

    fn is_child(&self) -> bool {
        matches!(self.band, AgeBand::Neonate | AgeBand::Child | AgeBand::Adolescent)
    }
}

fn one<'a>(rng: &mut ChaCha8Rng, xs: &[&'a str]) -> &'a str {
    if xs.is_empty() {
        return "";
    }
    xs[rng.random_range(0..xs.len())]
}

fn sex_letter(rng: &mut ChaCha8Rng, p: &Patient) -> &'static str {
    let lower = rng.random::<f64>() < 0.15;
    match (p.sex, lower) {
        (Sex::Male, false) => "M",
        (Sex::Male, true) => "m",
        (Sex::Female, false) => "F",
        (Sex::Female, true) => "f",
    }
}

fn gestation(rng: &mut ChaCha8Rng, weeks: u32) -> String {
    match rng.random_range(0..5) {
        0 => format!("{weeks}/40"),
        1 => format!("{weeks}+{}", rng.random_range(0..7)),
        2 => format!("{weeks} weeks"),
        3 => format!("{weeks}/40 gestation"),
        _ => format!("{weeks}+{}/40", rng.random_range(0..7)),
    }
}

/// "78M", "78 y/o male", "Mrs K (81)", "3yo boy, 14.2kg", "G2P1 34/40", "day 3 baby girl"…
pub(super) fn descriptor(rng: &mut ChaCha8Rng, p: &Patient, us: bool) -> String {
    let a = p.years;
    let s = sex_letter(rng, p);
    let (man, gent, mr) = match p.sex {
        Sex::Male => ("man", "gentleman", one(rng, &["Mr"])),
        Sex::Female => ("woman", "lady", one(rng, &["Mrs", "Ms", "Miss"])),
    };
    let (male, boy) = match p.sex {
        Sex::Male => ("male", "boy"),
        Sex::Female => ("female", "girl"),
    };
    let ini = p.initial;
    let mut d = match p.band {
        AgeBand::Adult | AgeBand::Elderly => match rng.random_range(0..17) {
            0 | 1 => format!("{a}{s}"),
            2 => format!("{a} {s}"),
            3 => format!("{a}yo {s}"),
            4 => format!("{a}y {s}"),
            5 => format!("{a}yo {male}"),
            6 => format!("{a} y/o {s}"),
            7 => format!("{a} y/o {man}"),
            8 => format!("{a}-year-old {man}"),
            9 => format!("{a} yr old {gent}"),
            10 => format!("{s} {a}"),
            11 => format!("{mr} {ini}, {a}"),
            12 => format!("{mr} {ini} ({a})"),
            13 => format!("{a}yo {}", if p.sex == Sex::Male { "gent" } else { "lady" }),
            14 => format!("pt {a}{s}"),
            15 if us => format!("{a} yo {s}"),
            15 => format!("{a}{}", s.to_lowercase()),
            _ if p.band == AgeBand::Elderly => {
                one(rng, &["elderly {g}", "frail {a}{s}", "{a}{s} NH resident", "{a}{s} from care home", "{a}yo {g} from NH"])
                    .replace("{g}", if p.sex == Sex::Male { "gent" } else { "lady" })
                    .replace("{a}", &a.to_string())
                    .replace("{s}", s)
            }
            _ => format!("{a}{s}"),
        },
        AgeBand::Obstetric => {
            let g = rng.random_range(1..=5u32);
            let para = rng.random_range(0..g);
            let ge = gestation(rng, p.gest_weeks);
            let parity = if para == 0 { "primip" } else { "multip" };
            match rng.random_range(0..8) {
                0 => format!("{a}F G{g}P{para} {ge}"),
                1 => format!("{a} y/o {parity} at {ge}"),
                2 => format!("G{g}P{para} {ge}"),
                3 => format!("{a}F, {ge} pregnant"),
                4 => format!("{a}yo woman {ge}"),
                5 => format!("{parity} {a}, {ge}"),
                6 => {
                    format!("{a}F P{} day {} post {}", para + 1, rng.random_range(1..4), one(rng, &["LSCS", "SVD", "delivery", "forceps"]))
                }
                _ => format!("{mr} {ini} {a}, G{g}P{para} {ge}"),
            }
        }
        AgeBand::Child if a == 0 => {
            let m = p.months;
            match rng.random_range(0..6) {
                0 => format!("{m}/12 old {boy}"),
                1 => format!("{m} mo {s}"),
                2 => format!("{m} month old {}", one(rng, &["baby", "infant", boy])),
                3 => format!("{m}mth old {boy}"),
                4 => format!("{m}mo old"),
                _ => format!("infant {s} {m}/12"),
            }
        }
        AgeBand::Child | AgeBand::Adolescent => match rng.random_range(0..8) {
            0 | 1 => format!("{a}yo {boy}"),
            2 => format!("{a} y/o {s}"),
            3 => format!("{a}yr old {boy}"),
            4 => format!("{a} year old {boy}"),
            5 => format!("{a}{s}"),
            6 => format!("{boy}, {a}"),
            _ if p.band == AgeBand::Adolescent => format!("{a} y/o {}", if p.sex == Sex::Male { "young man" } else { "young woman" }),
            _ => format!("{a}yo {s}"),
        },
        AgeBand::Neonate => {
            let dd = p.days;
            match rng.random_range(0..8) {
                0 => format!("{dd}/7 old {}", one(rng, &["baby boy", "baby girl", "neonate"])),
                1 => format!("day {dd} {}", one(rng, &["baby", "neonate", "infant"])),
                2 => format!("term {} day {dd}", one(rng, &["baby", "infant"])),
                3 => format!("baby {boy} {dd} days old"),
                4 => format!("ex-{}/40 {} day {dd}", p.gest_weeks.min(36), one(rng, &["baby", "infant", "prem"])),
                5 => format!("{dd}d old {s}"),
                6 => format!("newborn {boy}"),
                _ => format!("Baby {ini} day {dd}"),
            }
        }
    };
    let wants_weight = match p.band {
        AgeBand::Neonate => 0.45,
        AgeBand::Child => 0.35,
        AgeBand::Adolescent => 0.1,
        _ => 0.0,
    };
    if rng.random::<f64>() < wants_weight {
        let w = format_weight(rng, p);
        d.push_str(&match rng.random_range(0..4) {
            0 => format!(", {w}"),
            1 => format!(" ({w})"),
            2 => format!(" wt {w}"),
            _ => format!(", weight {w}"),
        });
    }
    d
}

fn format_weight(rng: &mut ChaCha8Rng, p: &Patient) -> String {
    let w = p.weight_kg;
    if p.band == AgeBand::Neonate && rng.random::<f64>() < 0.3 {
        return format!("{}g", (w * 1000.0).round() as u32);
    }
    match rng.random_range(0..3) {
        0 => format!("{w:.1}kg"),
        1 => format!("{w:.1} kg"),
        _ => format!("{}kg", w.round() as u32),
    }
}

/// The patient's weight written as "14.2kg", "3200g"…
pub(super) fn weight(rng: &mut ChaCha8Rng, p: &Patient) -> String {
    format_weight(rng, p)
}

/// A short back-reference: "pt", "she", "Mr K", "the baby"…
pub(super) fn reference(rng: &mut ChaCha8Rng, p: &Patient) -> String {
    let named = match p.sex {
        Sex::Male => format!("Mr {}", p.initial),
        Sex::Female => format!("{} {}", one(rng, &["Mrs", "Ms"]), p.initial),
    };
    let opts: Vec<String> = match p.band {
        AgeBand::Neonate => vec!["baby".into(), "the baby".into(), "pt".into(), format!("baby {}", p.initial)],
        AgeBand::Child => {
            vec!["pt".into(), "child".into(), "the child".into(), (if p.sex == Sex::Male { "the boy" } else { "the girl" }).into()]
        }
        AgeBand::Adolescent => vec!["pt".into(), "patient".into(), "young person".into(), "the YP".into()],
        _ => vec!["pt".into(), "pt".into(), "patient".into(), named, (if p.sex == Sex::Male { "this gent" } else { "this lady" }).into()],
    };
    opts[rng.random_range(0..opts.len())].clone()
}

fn band_row(p: &Patient) -> usize {
    match p.band {
        AgeBand::Neonate => 0,
        AgeBand::Child if p.years < 5 => 1,
        AgeBand::Child => 2,
        _ => 3,
    }
}

fn sev_col(sev: Sev) -> usize {
    match sev {
        Sev::Stable => 0,
        Sev::Unwell => 1,
        Sev::Critical => 2,
    }
}

pub(super) fn heart_rate(rng: &mut ChaCha8Rng, p: &Patient, sev: Sev) -> String {
    const R: [[(u32, u32); 3]; 4] = [
        [(115, 160), (165, 195), (190, 225)],
        [(90, 135), (140, 175), (170, 210)],
        [(75, 115), (120, 150), (150, 185)],
        [(58, 96), (98, 128), (125, 165)],
    ];
    let brady = sev != Sev::Stable && rng.random::<f64>() < 0.07;
    let hr = if brady {
        if band_row(p) == 0 {
            rng.random_range(60..90)
        } else {
            rng.random_range(28..46)
        }
    } else {
        let (lo, hi) = R[band_row(p)][sev_col(sev)];
        rng.random_range(lo..=hi)
    };
    match rng.random_range(0..9) {
        0 | 1 => format!("HR {hr}"),
        2 => format!("HR{hr}"),
        3 => format!("HR: {hr}"),
        4 => format!("P {hr}"),
        5 => format!("pulse {hr}"),
        6 => format!("HR {hr}bpm"),
        7 if hr > 100 && band_row(p) == 3 => format!("tachy {hr}"),
        7 if hr < 50 => format!("brady {hr}"),
        _ => format!("HR {hr} {}", one(rng, &["regular", "irreg", "SR", "sinus"])),
    }
}

pub(super) fn blood_pressure(rng: &mut ChaCha8Rng, p: &Patient, sev: Sev) -> String {
    let (sys, dia) = match (band_row(p), sev) {
        (3, Sev::Stable) => (rng.random_range(104..158), rng.random_range(58..92)),
        (3, Sev::Unwell) if p.band == AgeBand::Obstetric || rng.random::<f64>() < 0.3 => {
            (rng.random_range(152..198), rng.random_range(92..118))
        }
        (3, Sev::Unwell) => (rng.random_range(88..112), rng.random_range(48..70)),
        (3, Sev::Critical) => (rng.random_range(62..90), rng.random_range(30..55)),
        (_, Sev::Stable) => (rng.random_range(85..112), rng.random_range(50..72)),
        (_, Sev::Unwell) => (rng.random_range(74..92), rng.random_range(40..56)),
        (_, Sev::Critical) => (rng.random_range(52..76), rng.random_range(25..42)),
    };
    match rng.random_range(0..8) {
        0..=2 => format!("BP {sys}/{dia}"),
        3 => format!("BP{sys}/{dia}"),
        4 => format!("BP: {sys}/{dia}"),
        5 => format!("NIBP {sys}/{dia}"),
        6 => format!("BP {sys}/{dia} mmHg"),
        _ if sys < 90 => format!("{} {sys}/{dia}", one(rng, &["hypotensive", "soft BP", "BP low"])),
        _ => format!("SBP {sys}"),
    }
}

pub(super) fn resp_rate(rng: &mut ChaCha8Rng, p: &Patient, sev: Sev) -> String {
    const R: [[(u32, u32); 3]; 4] =
        [[(35, 55), (60, 80), (70, 95)], [(24, 36), (40, 55), (55, 75)], [(18, 26), (28, 40), (40, 60)], [(12, 19), (20, 28), (28, 44)]];
    let (lo, hi) = R[band_row(p)][sev_col(sev)];
    let rr = rng.random_range(lo..=hi);
    match rng.random_range(0..7) {
        0..=2 => format!("RR {rr}"),
        3 => format!("RR{rr}"),
        4 => format!("resp rate {rr}"),
        5 => format!("RR {rr}/min"),
        _ => format!("resps {rr}"),
    }
}

pub(super) fn sats(rng: &mut ChaCha8Rng, p: &Patient, sev: Sev, us: bool) -> String {
    let child = p.is_child();
    let air = if child { one(rng, &["in air", "in air", "RA", "on air"]) } else { one(rng, &["RA", "on air", "on RA", "(air)", "OA"]) };
    let lab =
        if us { one(rng, &["O2 sat", "SpO2", "sats", "pulse ox"]) } else { one(rng, &["sats", "sats", "SpO2", "O2 sats", "Sats", "SaO2"]) };
    match sev {
        Sev::Stable => {
            let v = rng.random_range(94..=99);
            match rng.random_range(0..4) {
                0 => format!("{lab} {v}% {air}"),
                1 => format!("{lab} {v}%"),
                2 => format!("{lab} {v}"),
                _ => format!("{v}% {air}"),
            }
        }
        Sev::Unwell => {
            let v = rng.random_range(88..=95);
            if rng.random::<f64>() < 0.45 {
                format!("{lab} {v}% {air}")
            } else {
                let l = rng.random_range(1..=5);
                let dev = if child {
                    one(rng, &["NCO2", "nasal cannulae", "LFO2", "via nasal specs"])
                } else {
                    one(rng, &["NC", "NP", "nasal specs", "via NC", "", "28% venturi", "35% venturi"])
                };
                if dev.contains("venturi") {
                    format!("{lab} {v}% on {dev}")
                } else {
                    format!("{lab} {v}% on {l}L {dev}")
                }
            }
        }
        Sev::Critical => {
            let v = rng.random_range(76..=91);
            let on = if child {
                one(rng, &["on 15L NRB", "on HFNC 2L/kg", "in 100% O2", "on headbox O2"])
            } else {
                one(rng, &["on 15L NRB", "on 15L", "on 60% HFNC", "on NRB", "on 10L", "despite 15L O2", "on 15L via reservoir mask"])
            };
            format!("{lab} {v}% {on}")
        }
    }
}

pub(super) fn temperature(rng: &mut ChaCha8Rng, sev: Sev, us: bool) -> String {
    let t: f64 = match sev {
        Sev::Stable => rng.random_range(36.1..37.6),
        Sev::Unwell if rng.random::<f64>() < 0.7 => rng.random_range(37.8..39.5),
        Sev::Unwell => rng.random_range(36.2..37.6),
        Sev::Critical if rng.random::<f64>() < 0.15 => rng.random_range(34.6..35.8),
        Sev::Critical => rng.random_range(38.4..40.5),
    };
    if us && rng.random::<f64>() < 0.5 {
        let f = t * 9.0 / 5.0 + 32.0;
        return format!("{} {f:.1}F", one(rng, &["T", "temp", "Tmax"]));
    }
    match rng.random_range(0..8) {
        0 | 1 => format!("T {t:.1}"),
        2 => format!("temp {t:.1}"),
        3 => format!("T{t:.1}C"),
        4 => format!("temp {t:.1}C"),
        5 if t >= 37.8 => format!("{} {t:.1}", one(rng, &["febrile", "pyrexial", "spiked"])),
        5 if t < 36.0 => format!("hypothermic {t:.1}"),
        5 => "afebrile".to_owned(),
        6 => format!("Temp: {t:.1}"),
        _ => format!("T {t:.1} C"),
    }
}

pub(super) fn gcs(rng: &mut ChaCha8Rng, sev: Sev) -> String {
    let g: u32 = match sev {
        Sev::Stable => 15,
        Sev::Unwell => rng.random_range(13..=15),
        Sev::Critical => rng.random_range(5..=13),
    };
    match rng.random_range(0..6) {
        0 | 1 => format!("GCS {g}"),
        2 => format!("GCS {g}/15"),
        3 if g < 15 => {
            let m = if g >= 9 { 6 } else { 5.min(g - 2) };
            let rest = g - m;
            let e = rest.div_ceil(2).clamp(1, 4);
            let v = (rest - e).clamp(1, 5);
            format!("GCS {g} (E{e}V{v}M{m})")
        }
        4 => format!("GCS{g}"),
        _ if g == 15 => one(rng, &["alert", "AVPU A", "GCS 15"]).to_owned(),
        _ if g <= 8 => format!("GCS {g}, {}", one(rng, &["AVPU P", "responds to pain", "not protecting airway?"])),
        _ => format!("GCS {g}, {}", one(rng, &["AVPU V", "drowsy", "confused"])),
    }
}

/// NEWS2 for adults, PEWS for children, MEWS at US-style sites.
pub(super) fn early_warning(rng: &mut ChaCha8Rng, p: &Patient, sev: Sev, us: bool) -> String {
    let v = match sev {
        Sev::Stable => rng.random_range(0..=2),
        Sev::Unwell => rng.random_range(3..=6),
        Sev::Critical => rng.random_range(7..=13),
    };
    if p.is_child() {
        let v = v.min(9);
        return match rng.random_range(0..3) {
            0 => format!("PEWS {v}"),
            1 => format!("PEWS score {v}"),
            _ => format!("PEWS={v}"),
        };
    }
    if us && rng.random::<f64>() < 0.6 {
        return format!("{} {}", one(rng, &["MEWS", "MEWS score"]), v.min(9));
    }
    match rng.random_range(0..6) {
        0 | 1 => format!("NEWS2 {v}"),
        2 => format!("NEWS {v}"),
        3 => format!("NEWS2={v}"),
        4 => format!("NEWS2 score {v}"),
        _ => format!("NEWS {v}{}", if v >= 5 { " (was 2)" } else { "" }),
    }
}

fn glucose(rng: &mut ChaCha8Rng, us: bool) -> String {
    if us {
        return format!("{} {}", one(rng, &["glucose", "FSBG", "POC glucose", "BG"]), rng.random_range(45..520));
    }
    let v: f64 = if rng.random::<f64>() < 0.3 { rng.random_range(1.8..3.9) } else { rng.random_range(4.2..28.0) };
    format!("{} {v:.1}", one(rng, &["BM", "CBG", "cap glucose", "BM", "gluc"]))
}

/// One line of observations: which ones, their order, labels and separators all vary.
pub(super) fn vitals(rng: &mut ChaCha8Rng, p: &Patient, sev: Sev, us: bool) -> String {
    #[derive(Clone, Copy)]
    enum V {
        Hr,
        Bp,
        Rr,
        Sats,
        Temp,
        Gcs,
        Ews,
        Gluc,
        Crt,
    }
    let pool: &[V] = match p.band {
        AgeBand::Neonate => &[V::Hr, V::Rr, V::Sats, V::Temp, V::Gluc, V::Crt],
        AgeBand::Child => &[V::Hr, V::Rr, V::Sats, V::Temp, V::Crt, V::Ews, V::Bp],
        _ => &[V::Hr, V::Bp, V::Rr, V::Sats, V::Temp, V::Gcs, V::Ews, V::Gluc],
    };
    let k = rng.random_range(2..=5.min(pool.len()));
    // Partial Fisher-Yates: the first k of a shuffled copy, then mostly in the usual order.
    let mut idx: Vec<usize> = (0..pool.len()).collect();
    for i in 0..k {
        let j = rng.random_range(i..idx.len());
        idx.swap(i, j);
    }
    let mut chosen: Vec<usize> = idx[..k].to_vec();
    if rng.random::<f64>() < 0.7 {
        chosen.sort_unstable();
    }
    let items: Vec<String> = chosen
        .iter()
        .map(|&i| match pool[i] {
            V::Hr => heart_rate(rng, p, sev),
            V::Bp => blood_pressure(rng, p, sev),
            V::Rr => resp_rate(rng, p, sev),
            V::Sats => sats(rng, p, sev, us),
            V::Temp => temperature(rng, sev, us),
            V::Gcs => gcs(rng, sev),
            V::Ews => early_warning(rng, p, sev, us),
            V::Gluc => glucose(rng, us),
            V::Crt => match sev {
                Sev::Stable => format!("CRT {}s", rng.random_range(1..=2)),
                _ => format!("CRT {}{}", rng.random_range(3..=5), one(rng, &["s", " sec", "s central"])),
            },
        })
        .collect();
    let sep = one(rng, &[", ", ", ", " ", "; ", " / ", ", "]);
    let prefix = one(rng, &["", "", "", "obs: ", "Obs ", "vitals: ", "VS: ", "obs - ", "Obs: ", "OBS ", "on arrival "]);
    format!("{prefix}{}", items.join(sep))
}

/// A place in the hospital that is not a request for it: "bed 12", "bay 3 bed 4", "cubicle 7"…
pub(super) fn location(rng: &mut ChaCha8Rng) -> String {
    let n = rng.random_range(1..=36);
    let b = rng.random_range(1..=8);
    match rng.random_range(0..12) {
        0 | 1 => format!("bed {n}"),
        2 => format!("Bed {n}"),
        3 => format!("bay {b} bed {}", rng.random_range(1..=6)),
        4 => format!("B{b} bed {}", rng.random_range(1..=6)),
        5 => format!("side room {b}"),
        6 => format!("SR{b}"),
        7 => format!("cubicle {n}"),
        8 => format!("cube {n}"),
        9 => format!("resus {}", rng.random_range(1..=4)),
        10 => format!("majors {n}"),
        _ => format!("room {}{:02}", rng.random_range(2..=6), n),
    }
}

pub(super) fn clock_time(rng: &mut ChaCha8Rng) -> String {
    let h = rng.random_range(0..24u32);
    let m = [0, 10, 15, 20, 30, 40, 45, 50][rng.random_range(0..8)];
    match rng.random_range(0..4) {
        0 => format!("{h:02}:{m:02}"),
        1 => format!("{h:02}{m:02}"),
        2 => format!("{}{}", if h % 12 == 0 { 12 } else { h % 12 }, if h < 12 { "am" } else { "pm" }),
        _ => format!("{h:02}:{m:02}h"),
    }
}

pub(super) fn duration(rng: &mut ChaCha8Rng) -> String {
    match rng.random_range(0..10) {
        0 | 1 => format!("{}/7", rng.random_range(1..=6)),
        2 => format!("{} days", rng.random_range(2..=6)),
        3 => "since yesterday".to_owned(),
        4 => format!("x{}/52", rng.random_range(1..=3)),
        5 => format!("{}/52", rng.random_range(1..=6)),
        6 => "since this am".to_owned(),
        7 => format!("{}h", rng.random_range(2..=12)),
        8 => format!("{} weeks", rng.random_range(1..=3)),
        _ => "overnight".to_owned(),
    }
}

pub(super) fn extension(rng: &mut ChaCha8Rng) -> String {
    let n = rng.random_range(1000..9999);
    match rng.random_range(0..6) {
        0 | 5 => format!("bleep {n}"),
        1 => format!("ext {n}"),
        2 => format!("x{n}"),
        3 => format!("pager {}", n % 1000),
        _ => format!("bleep {}", n % 1000),
    }
}

pub(super) fn initials(rng: &mut ChaCha8Rng) -> String {
    let a = char::from(b'A' + rng.random_range(0..26u8));
    let b = char::from(b'A' + rng.random_range(0..26u8));
    match rng.random_range(0..6) {
        0 => format!("Dr {a}"),
        1 => format!("{a}.{b}."),
        2 => format!("RN {a}"),
        3 => format!("SN {a}{b}"),
        4 => format!("{a}{b}"),
        _ => format!("Dr {a}{b}"),
    }
}

/// "Dr K", "Dr AB".
pub(super) fn doctor_initials(rng: &mut ChaCha8Rng) -> String {
    let a = char::from(b'A' + rng.random_range(0..26u8));
    if rng.random::<bool>() {
        format!("Dr {a}")
    } else {
        format!("Dr {a}{}", char::from(b'A' + rng.random_range(0..26u8)))
    }
}

pub(super) fn day(rng: &mut ChaCha8Rng) -> String {
    let d = rng.random_range(1..=12);
    match rng.random_range(0..5) {
        0 => format!("day {d}"),
        1 => format!("D{d}"),
        2 => format!("day {d} of admission"),
        3 => format!("d{d}"),
        _ => format!("Day {d}"),
    }
}

pub(super) const LANGUAGES: Bank = &[
    "Polish",
    "Urdu",
    "Arabic",
    "Portuguese",
    "Mandarin",
    "Cantonese",
    "Romanian",
    "Somali",
    "Bengali",
    "Sylheti",
    "Tigrinya",
    "Farsi",
    "Dari",
    "Pashto",
    "Spanish",
    "Vietnamese",
    "Turkish",
    "Punjabi",
    "Lithuanian",
    "Kurdish",
    "Tamil",
    "Gujarati",
    "Russian",
    "Ukrainian",
    "Haitian Creole",
    "Amharic",
];

/// Who comes in with an adult.
pub(super) const RELATIVES: Bank = &["daughter", "son", "wife", "husband", "carer", "partner", "NOK", "family"];

pub(super) const PARENTS: Bank = &["mum", "Mum", "dad", "parents", "mother", "father", "carer", "grandma", "foster carer", "mum and dad"];
