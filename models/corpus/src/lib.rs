//! fedward's site data, without the ML stack: the synthetic multi-site corpus of clinical
//! notes (`data synth`), the validation of a site's own labelled notes (`data import`) and the
//! hand-written evaluation set (`handwritten`), which the generator never wrote.
//!
//! Nothing here links candle or tokenizers, so the site's data tools and their tests build
//! on their own.

pub mod handwritten;
pub mod import;
pub mod synth;
