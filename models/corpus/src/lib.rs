//! fedward's site data, without the ML stack: the synthetic multi-site corpus of clinical
//! notes (`data synth`) and the validation of a site's own labelled notes (`data import`).
//!
//! Nothing here links candle or tokenizers, so the site's data tools and their tests build
//! on their own.

pub mod import;
pub mod synth;
