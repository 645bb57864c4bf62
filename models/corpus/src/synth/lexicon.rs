//! Word-level rewrites: clinical shorthand in both directions, British to US spelling, US hospital terms.
//!
//! Banks are written in British spelling with mixed shorthand; these passes make each site's notes
//! read like that site's staff wrote them. Matching is case-insensitive on word boundaries and keeps
//! the case shape of what it replaces.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A phrase and its shorthand forms. `expand`: the shorthand may be written out again.
struct Abbrev {
    full: &'static str,
    short: &'static [&'static str],
    expand: bool,
}

const fn ab(full: &'static str, short: &'static [&'static str], expand: bool) -> Abbrev {
    Abbrev { full, short, expand }
}

const ABBREVS: &[Abbrev] = &[
    ab("patient", &["pt", "pt", "pt."], true),
    ab("shortness of breath", &["SOB"], true),
    ab("short of breath", &["SOB"], false),
    ab("complaining of", &["c/o"], true),
    ab("history of", &["h/o", "hx of"], true),
    ab("history", &["hx", "Hx"], true),
    ab("review", &["r/v", "r/v", "rv", "review"], true),
    ab("investigations", &["ix", "Ix"], true),
    ab("observations", &["obs"], false),
    ab("saturations", &["sats"], true),
    ab("respiratory rate", &["RR"], false),
    ab("heart rate", &["HR"], false),
    ab("blood pressure", &["BP"], false),
    ab("chest pain", &["CP"], false),
    ab("diagnosis", &["dx", "Dx"], true),
    ab("treatment", &["tx", "Rx"], true),
    ab("with", &["w/"], false),
    ab("without", &["w/o"], false),
    ab("discharge", &["d/c", "D/C", "dc"], true),
    ab("nil by mouth", &["NBM"], true),
    ab("as required", &["PRN", "prn"], true),
    ab("consultant", &["cons", "Cons"], true),
    ab("registrar", &["reg", "SpR"], true),
    ab("please", &["pls", "pls", "plz"], true),
    ab("thanks", &["thx", "ta", "tks"], false),
    ab("urinary tract infection", &["UTI"], true),
    ab("chronic obstructive pulmonary disease", &["COPD"], true),
    ab("acute kidney injury", &["AKI"], true),
    ab("myocardial infarction", &["MI"], true),
    ab("atrial fibrillation", &["AF", "afib"], true),
    ab("heart failure", &["HF", "CCF"], false),
    ab("intravenous", &["IV"], true),
    ab("antibiotics", &["abx", "ABx"], true),
    ab("fracture", &["#", "fx"], false),
    ab("fractured neck of femur", &["#NOF", "NOF #"], true),
    ab("deep vein thrombosis", &["DVT"], true),
    ab("pulmonary embolism", &["PE"], true),
    ab("temperature", &["temp", "T"], false),
    ab("on examination", &["O/E", "o/e"], true),
    ab("no abnormality detected", &["NAD"], true),
    ab("past medical history", &["PMH", "PMHx"], true),
    ab("medically fit for discharge", &["MFFD", "MFFD"], true),
    ab("ward round", &["WR"], true),
    ab("emergency department", &["ED"], true),
    ab("intensive care", &["ICU", "ITU"], false),
    ab("high dependency unit", &["HDU"], true),
    ab("non-invasive ventilation", &["NIV"], true),
    ab("ultrasound", &["USS", "US"], false),
    ab("chest X-ray", &["CXR"], true),
    ab("X-ray", &["XR", "xray"], false),
    ab("social worker", &["SW"], false),
    ab("social work", &["SW"], false),
    ab("occupational therapy", &["OT"], false),
    ab("physiotherapy", &["physio"], true),
    ab("speech and language therapy", &["SALT", "SLT"], true),
    ab("nasogastric", &["NG"], true),
    ab("lower respiratory tract infection", &["LRTI"], true),
    ab("community acquired pneumonia", &["CAP"], false),
    ab("diabetic ketoacidosis", &["DKA"], true),
    ab("general practitioner", &["GP"], false),
    ab("bilateral", &["bilat", "B/L"], false),
    ab("hours", &["hrs", "h"], false),
    ab("minutes", &["mins"], true),
    ab("medications", &["meds"], true),
    ab("secondary to", &["2/2", "2'"], false),
    ab("follow-up", &["f/u", "FU"], true),
    ab("follow up", &["f/u"], false),
    ab("outpatient", &["OP", "OPD"], false),
    ab("appointment", &["appt"], true),
    ab("nursing home", &["NH"], true),
    ab("as soon as possible", &["asap", "ASAP"], true),
    ab("hypertension", &["HTN"], true),
    ab("type 2 diabetes", &["T2DM"], true),
    ab("type 1 diabetes", &["T1DM"], true),
    ab("ischaemic heart disease", &["IHD"], true),
    ab("chronic kidney disease", &["CKD"], true),
    ab("transient ischaemic attack", &["TIA"], true),
    ab("white cell count", &["WCC", "WBC"], true),
    ab("urea and electrolytes", &["U&Es", "U+E"], true),
    ab("blood cultures", &["BCs", "BC"], false),
    ab("doctor", &["dr", "Dr"], false),
    ab("nurse in charge", &["NIC"], true),
    ab("post-operative", &["post-op", "postop"], true),
    ab("pre-operative", &["pre-op"], true),
    ab("operation", &["op"], false),
    ab("tablets", &["tabs"], true),
    ab("haemoglobin", &["Hb"], false),
    ab("day of admission", &["DOA"], false),
    ab("because", &["b/c"], false),
    ab("month", &["mo"], false),
    ab("morning", &["am"], false),
    ab("tonight", &["tonite"], false),
    ab("pressure ulcer", &["PU"], false),
    ab("reduced fetal movements", &["RFM"], true),
    ab("spontaneous vaginal delivery", &["SVD"], true),
    ab("caesarean section", &["LSCS", "CS"], false),
    ab("electrocardiogram", &["ECG", "EKG"], false),
    ab("arterial blood gas", &["ABG"], false),
    ab("blood sugar", &["BM", "CBG"], true),
    ab("subcutaneous", &["subcut", "SC"], false),
    ab("package of care", &["POC"], false),
    ab("no fixed abode", &["NFA"], true),
    ab("domestic violence", &["DV"], true),
    ab("loss of consciousness", &["LOC"], true),
    ab("head injury", &["HI"], false),
    ab("road traffic collision", &["RTC"], true),
    ab("fall on outstretched hand", &["FOOSH"], true),
    ab("abdomen", &["abdo"], false),
    ab("abdominal", &["abdo"], false),
];

/// (British, US) rewrites applied inside words; the first match in a word wins.
const SPELL_INFIX: &[(&str, &str)] = &[
    ("oesoph", "esoph"),
    ("oedem", "edem"),
    ("oestr", "estr"),
    ("anaesth", "anesth"),
    ("gynaec", "gynec"),
    ("haem", "hem"),
    ("aemi", "emi"),
    ("paed", "ped"),
    ("rrhoea", "rrhea"),
    ("pnoea", "pnea"),
    ("faec", "fec"),
    ("caesar", "cesar"),
    ("foet", "fet"),
    ("coeliac", "celiac"),
    ("aetiol", "etiol"),
];

/// (British, US) whole words, or word stems when the British form ends in `*`.
const SPELL_WORD: &[(&str, &str)] = &[
    ("centre", "center"),
    ("centres", "centers"),
    ("litre", "liter"),
    ("litres", "liters"),
    ("metres", "meters"),
    ("tumour", "tumor"),
    ("tumours", "tumors"),
    ("colour", "color"),
    ("behaviour", "behavior"),
    ("labour", "labor"),
    ("labouring", "laboring"),
    ("favour", "favor"),
    ("odour", "odor"),
    ("programme", "program"),
    ("counselling", "counseling"),
    ("travelled", "traveled"),
    ("cancelled", "canceled"),
    ("ageing", "aging"),
    ("fibre", "fiber"),
    ("manoeuvre", "maneuver"),
    ("grey", "gray"),
    ("sulphate", "sulfate"),
    ("organis*", "organiz"),
    ("mobilis*", "mobiliz"),
    ("stabilis*", "stabiliz"),
    ("recognis*", "recogniz"),
    ("prioritis*", "prioritiz"),
    ("authoris*", "authoriz"),
    ("hospitalis*", "hospitaliz"),
    ("catheteris*", "catheteriz"),
    ("immobilis*", "immobiliz"),
    ("sterilis*", "steriliz"),
    ("optimis*", "optimiz"),
    ("minimis*", "minimiz"),
    ("summaris*", "summariz"),
    ("characteris*", "characteriz"),
    ("randomis*", "randomiz"),
    ("apologis*", "apologiz"),
    ("normalis*", "normaliz"),
    ("localis*", "localiz"),
    ("familiaris*", "familiariz"),
    ("specialis*", "specializ"),
    ("visualis*", "visualiz"),
    ("dialys*", "dialyz"),
];

/// US hospital vocabulary for British terms; whole phrases, case-insensitive.
const US_TERMS: &[(&str, &[&str])] = &[
    ("A&E", &["ER", "ED"]),
    ("registrar", &["resident", "fellow"]),
    ("SpR", &["fellow", "senior resident"]),
    ("consultant", &["attending"]),
    ("SHO", &["resident"]),
    ("FY1", &["intern"]),
    ("bleep", &["page"]),
    ("bleeped", &["paged"]),
    ("theatre", &["OR"]),
    ("theatres", &["the OR"]),
    ("paracetamol", &["acetaminophen", "Tylenol"]),
    ("GP", &["PCP"]),
    ("ITU", &["ICU"]),
    ("TTOs", &["discharge meds"]),
    ("TTO", &["discharge med"]),
    ("mum", &["mom"]),
    ("nappies", &["diapers"]),
    ("nappy", &["diaper"]),
    ("labour ward", &["L&D"]),
    ("nil by mouth", &["NPO"]),
    ("NBM", &["NPO"]),
    ("NH", &["SNF", "NH"]),
    ("nursing home", &["SNF", "nursing home"]),
    ("HDU", &["step-down", "HDU"]),
    ("A&E triage", &["ER triage"]),
    ("ward round", &["rounds"]),
    ("post-take", &["admitting"]),
    ("MFFD", &["medically ready", "MFFD"]),
    ("sister", &["charge nurse"]),
    ("cot", &["crib"]),
    ("fit note", &["work note"]),
    ("sick note", &["work note"]),
    ("NEWS2", &["MEWS"]),
];

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// Word characters for boundaries: shorthand like "k/c/o" or "r/v'd" is one word.
fn is_joined_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'/' || b == b'\''
}

/// Case shape of `src` applied to `rep`: Titlecase stays Titlecase, ALL CAPS words stay caps.
fn shape_like(src: &str, rep: &str) -> String {
    let letters: Vec<char> = src.chars().filter(|c| c.is_alphabetic()).collect();
    let all_upper = letters.len() > 1 && letters.iter().all(|c| c.is_uppercase());
    let title = letters.first().is_some_and(|c| c.is_uppercase()) && letters.len() > 1 && letters.iter().skip(1).all(|c| c.is_lowercase());
    let rep_has_lower = rep.chars().any(|c| c.is_lowercase());
    if all_upper && rep_has_lower && src.len() > 3 {
        return rep.to_uppercase();
    }
    if title && rep.chars().next().is_some_and(|c| c.is_lowercase()) {
        let mut cs = rep.chars();
        return cs.next().map(|c| c.to_uppercase().collect::<String>() + cs.as_str()).unwrap_or_default();
    }
    rep.to_owned()
}

/// Length of `needle` at `text[pos..]` if it matches case-insensitively and ends on a word boundary.
fn match_at(text: &str, pos: usize, needle: &str) -> Option<usize> {
    let t = text.as_bytes();
    let n = needle.as_bytes();
    if pos + n.len() > t.len() || !t[pos..pos + n.len()].eq_ignore_ascii_case(n) {
        return None;
    }
    let end = pos + n.len();
    // Shorthand like "c/o" or "#" ends in a symbol: the boundary only matters after a word character.
    let needs_boundary = n.last().is_some_and(|b| is_word_byte(*b));
    if needs_boundary && end < t.len() && is_joined_byte(t[end]) {
        return None;
    }
    if !text.is_char_boundary(end) {
        return None;
    }
    Some(n.len())
}

/// One of `xs`; every lexicon entry lists at least one form.
fn pick<'a>(rng: &mut ChaCha8Rng, xs: &[&'a str]) -> &'a str {
    xs.get(rng.random_range(0..xs.len().max(1))).copied().unwrap_or("")
}

/// Writes expandable phrases in shorthand with chance `rate`, and expands shorthand with chance
/// `(1 - rate) / 2`.
pub(super) fn abbreviate(rng: &mut ChaCha8Rng, text: &str, rate: f64) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    while pos < bytes.len() {
        let at_start = pos == 0 || !is_joined_byte(bytes[pos - 1]);
        if at_start && is_word_byte(bytes[pos]) {
            let mut done = false;
            for a in ABBREVS {
                if let Some(len) = match_at(text, pos, a.full) {
                    let src = &text[pos..pos + len];
                    if rng.random::<f64>() < rate {
                        out.push_str(&shape_like(src, pick(rng, a.short)));
                    } else {
                        out.push_str(src);
                    }
                    pos += len;
                    done = true;
                    break;
                }
                if a.expand {
                    if let Some(s) =
                        a.short.iter().find(|s| s.len() > 1 && s.as_bytes()[0].is_ascii_alphabetic() && match_at(text, pos, s).is_some())
                    {
                        let len = s.len();
                        let src = &text[pos..pos + len];
                        if rng.random::<f64>() < (1.0 - rate) * 0.5 {
                            let full = if src.chars().all(|c| !c.is_lowercase()) { a.full.to_owned() } else { shape_like(src, a.full) };
                            out.push_str(&full);
                        } else {
                            out.push_str(src);
                        }
                        pos += len;
                        done = true;
                        break;
                    }
                }
            }
            if done {
                continue;
            }
            // Copy the rest of this word unchanged.
            let end = bytes[pos..].iter().position(|b| !is_word_byte(*b)).map_or(bytes.len(), |e| pos + e);
            out.push_str(&text[pos..end]);
            pos = end;
        } else {
            let ch_len = text[pos..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&text[pos..pos + ch_len]);
            pos += ch_len;
        }
    }
    out
}

/// US hospital terms for British ones.
pub(super) fn us_terms(rng: &mut ChaCha8Rng, text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    'outer: while pos < bytes.len() {
        let at_start = pos == 0 || !is_word_byte(bytes[pos - 1]);
        if at_start {
            // Longest British form first, so "A&E triage" wins over "A&E".
            let mut best: Option<(usize, &[&str])> = None;
            for (uk, us) in US_TERMS {
                if let Some(len) = match_at(text, pos, uk) {
                    if best.is_none_or(|(l, _)| len > l) {
                        best = Some((len, us));
                    }
                }
            }
            if let Some((len, us)) = best {
                let src = &text[pos..pos + len];
                out.push_str(&shape_like(src, pick(rng, us)));
                pos += len;
                continue 'outer;
            }
        }
        let ch_len = text[pos..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&text[pos..pos + ch_len]);
        pos += ch_len;
    }
    out
}

/// US spelling of one lowercase word, if it differs.
fn us_word(lower: &str) -> Option<String> {
    for (uk, us) in SPELL_WORD {
        if let Some(stem) = uk.strip_suffix('*') {
            if let Some(rest) = lower.strip_prefix(stem) {
                if rest.is_empty() || ["e", "ed", "es", "ing", "ation", "ations", "er", "ers"].contains(&rest) {
                    return Some(format!("{us}{rest}"));
                }
            }
        } else if lower == *uk {
            return Some((*us).to_owned());
        }
    }
    for (uk, us) in SPELL_INFIX {
        if let Some(i) = lower.find(uk) {
            return Some(format!("{}{}{}", &lower[..i], us, &lower[i + uk.len()..]));
        }
    }
    None
}

/// British spellings to US, each word kept British with chance `keep` (staff spell inconsistently).
pub(super) fn us_spelling(rng: &mut ChaCha8Rng, text: &str, keep: f64) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String, rng: &mut ChaCha8Rng| {
        if word.is_empty() {
            return;
        }
        let lower = word.to_ascii_lowercase();
        match us_word(&lower) {
            Some(us) if rng.random::<f64>() >= keep => out.push_str(&shape_like(word, &us)),
            _ => out.push_str(word),
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            word.push(c);
        } else {
            flush(&mut word, &mut out, rng);
            out.push(c);
        }
    }
    flush(&mut word, &mut out, rng);
    out
}

/// Re-agrees lowercase "a"/"an" with the word after it, which shorthand, spelling and US-term passes
/// (or a frame's fixed article) may have changed: "a oncology review" -> "an oncology review".
pub(super) fn fix_articles(text: &str) -> String {
    let words: Vec<&str> = text.split(' ').collect();
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    for (i, w) in words.iter().enumerate() {
        match (*w, words.get(i + 1)) {
            ("a" | "an", Some(next)) if next.starts_with(|c: char| c.is_ascii_alphanumeric()) => {
                out.push(super::template::article(next).to_owned());
            }
            _ => out.push((*w).to_owned()),
        }
    }
    out.join(" ")
}

/// Number of lexicon entries (shorthand pairs, spelling rules, US terms), for the building-block count.
pub(super) fn entry_count() -> usize {
    ABBREVS.len() + SPELL_INFIX.len() + SPELL_WORD.len() + US_TERMS.len()
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn us_spelling_rewrites_words_and_stems() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let s =
            us_spelling(&mut rng, "Paediatric haemoglobin low; oesophageal tumour at the centre, pls organise. Anaemia, diarrhoea", 0.0);
        assert_eq!(s, "Pediatric hemoglobin low; esophageal tumor at the center, pls organize. Anemia, diarrhea");
    }

    #[test]
    fn abbreviate_respects_word_boundaries_and_case() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        assert_eq!(abbreviate(&mut rng, "Patient complaining of shortness of breath, reviewed", 1.0), "Pt c/o SOB, reviewed");
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        // "reviewed" and "patients" are not whole-word matches.
        assert_eq!(abbreviate(&mut rng, "patients reviewed", 1.0), "patients reviewed");
    }

    #[test]
    fn articles_follow_the_next_word() {
        assert_eq!(fix_articles("needs a oncology review and an step-down bed"), "needs an oncology review and a step-down bed");
        assert_eq!(fix_articles("an MRI, a CT, a USS and A bed"), "an MRI, a CT, a USS and A bed");
    }

    #[test]
    fn us_terms_prefer_longest_match() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let s = us_terms(&mut rng, "A&E triage: for theatre");
        assert!(s.starts_with("ER triage: for OR"), "{s}");
    }
}
