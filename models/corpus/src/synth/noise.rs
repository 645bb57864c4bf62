//! Character-level typos and casing: the slips of someone typing fast on a ward computer or phone.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Neighbouring keys on a QWERTY keyboard, for substitution typos.
fn neighbours(c: char) -> &'static str {
    match c.to_ascii_lowercase() {
        'q' => "wa",
        'w' => "qes",
        'e' => "wrd",
        'r' => "etf",
        't' => "ryg",
        'y' => "tuh",
        'u' => "yij",
        'i' => "uok",
        'o' => "ipl",
        'p' => "ol",
        'a' => "qsz",
        's' => "adwx",
        'd' => "sfe",
        'f' => "dgr",
        'g' => "fht",
        'h' => "gjy",
        'j' => "hku",
        'k' => "jli",
        'l' => "ko",
        'z' => "xa",
        'x' => "zcs",
        'c' => "xvd",
        'v' => "cbf",
        'b' => "vng",
        'n' => "bmh",
        'm' => "nj",
        _ => "",
    }
}

/// One typo in a word of ASCII letters (4+ long): swap, drop, double or hit a neighbouring key.
fn typo_word(rng: &mut ChaCha8Rng, w: &str) -> String {
    let mut cs: Vec<char> = w.chars().collect();
    let n = cs.len();
    // Leave the first letter alone: people rarely mistype it and it keeps the word recognisable.
    let i = rng.random_range(1..n);
    match rng.random_range(0..10) {
        0..=3 if i + 1 < n => cs.swap(i, i + 1),
        0..=3 => cs.swap(i - 1, i),
        4..=5 => {
            cs.remove(i);
        }
        6 => cs.insert(i, cs[i]),
        _ => {
            let nb = neighbours(cs[i]);
            if !nb.is_empty() {
                let k = rng.random_range(0..nb.len());
                let mut r = nb.as_bytes()[k] as char;
                if cs[i].is_ascii_uppercase() {
                    r = r.to_ascii_uppercase();
                }
                cs[i] = r;
            }
        }
    }
    cs.into_iter().collect()
}

/// Typos at `rate` per eligible word; occasionally two words run together.
pub(super) fn typos(rng: &mut ChaCha8Rng, text: &str, rate: f64) -> (String, usize) {
    let words: Vec<&str> = text.split(' ').collect();
    let mut out = String::with_capacity(text.len() + 4);
    let mut count = 0;
    for (k, w) in words.iter().enumerate() {
        let letters = w.trim_end_matches([',', '.', ';', ':', '?', '!']);
        let tail = &w[letters.len()..];
        let eligible = letters.len() >= 4 && letters.bytes().all(|b| b.is_ascii_alphabetic());
        let mut joined = false;
        if eligible && rng.random::<f64>() < rate {
            count += 1;
            if rng.random::<f64>() < 0.08 && k + 1 < words.len() && tail.is_empty() {
                // Missed space bar.
                out.push_str(letters);
                joined = true;
            } else {
                out.push_str(&typo_word(rng, letters));
                out.push_str(tail);
            }
        } else {
            out.push_str(w);
        }
        if k + 1 < words.len() && !joined {
            out.push(' ');
        }
    }
    (out, count)
}

/// Upper-cases the first letter.
pub(super) fn capitalise(s: &str) -> String {
    let mut cs = s.chars();
    match cs.next() {
        Some(c) => c.to_uppercase().collect::<String>() + cs.as_str(),
        None => String::new(),
    }
}

/// Lower-cases the first letter unless the first word looks like an acronym ("CT", "NIV").
pub(super) fn decapitalise(s: &str) -> String {
    let first = s.split(' ').next().unwrap_or("");
    if first.chars().filter(|c| c.is_alphabetic()).count() > 1 && first.chars().all(|c| !c.is_lowercase()) {
        return s.to_owned();
    }
    let mut cs = s.chars();
    match cs.next() {
        Some(c) => c.to_lowercase().collect::<String>() + cs.as_str(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn typos_change_only_eligible_words() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (s, n) = typos(&mut rng, "needs CT 12 pls, cardiology review", 1.0);
        assert!(n >= 2, "{s}");
        assert!(s.contains("CT 12 pls,"), "{s}");
        assert_ne!(s, "needs CT 12 pls, cardiology review");
    }

    #[test]
    fn decapitalise_keeps_acronyms() {
        assert_eq!(decapitalise("CT head pls"), "CT head pls");
        assert_eq!(decapitalise("Needs bed"), "needs bed");
    }
}
