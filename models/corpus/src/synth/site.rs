//! Site styles: how one kind of hospital differs from another in patients, note types, shorthand,
//! typos, spelling and the resources it asks for most.

use std::fmt;
use std::str::FromStr;

use super::specialty::Spec::{self, *};
use super::template::Bank;

/// The kind of hospital a site is; decides its non-IID note style.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SiteStyle {
    /// Major trauma centre: orthopaedics, surgery, CT, ventilators, fast ED notes.
    TraumaCentre,
    /// Small rural hospital: older patients, transfers to a tertiary centre, limited CT hours, more typos.
    RuralHospital,
    /// Children's hospital: paediatric phrasing, weights in kg, parents, PICU/NICU.
    ChildrensHospital,
    /// Large teaching hospital: broad case mix, heavy shorthand, US-trained staff and spelling.
    TeachingHospital,
    /// Cancer centre: oncology and haematology, isolation rooms, syringe drivers, chaplaincy.
    CancerCentre,
}

impl SiteStyle {
    pub const ALL: [SiteStyle; 5] = [
        SiteStyle::TraumaCentre,
        SiteStyle::RuralHospital,
        SiteStyle::ChildrensHospital,
        SiteStyle::TeachingHospital,
        SiteStyle::CancerCentre,
    ];

    /// The kebab-case name used in configs and directory names.
    pub fn as_str(self) -> &'static str {
        match self {
            SiteStyle::TraumaCentre => "trauma-centre",
            SiteStyle::RuralHospital => "rural-hospital",
            SiteStyle::ChildrensHospital => "childrens-hospital",
            SiteStyle::TeachingHospital => "teaching-hospital",
            SiteStyle::CancerCentre => "cancer-centre",
        }
    }

    pub(super) fn profile(self) -> &'static SiteProfile {
        match self {
            SiteStyle::TraumaCentre => &TRAUMA,
            SiteStyle::RuralHospital => &RURAL,
            SiteStyle::ChildrensHospital => &CHILDRENS,
            SiteStyle::TeachingHospital => &TEACHING,
            SiteStyle::CancerCentre => &CANCER,
        }
    }
}

impl fmt::Display for SiteStyle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown site style name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown site style (expected one of trauma-centre, rural-hospital, childrens-hospital, teaching-hospital, cancer-centre)")]
pub struct UnknownSiteStyle;

impl FromStr for SiteStyle {
    type Err = UnknownSiteStyle;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SiteStyle::ALL.into_iter().find(|st| st.as_str() == s).ok_or(UnknownSiteStyle)
    }
}

/// Note types, in the order of `SiteProfile::note_mix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NoteType {
    EdTriage,
    WardRound,
    NurseNote,
    OrderComment,
    Handover,
    BedManager,
    Pager,
    DischargePlanning,
}

impl NoteType {
    pub const ALL: [NoteType; 8] = [
        NoteType::EdTriage,
        NoteType::WardRound,
        NoteType::NurseNote,
        NoteType::OrderComment,
        NoteType::Handover,
        NoteType::BedManager,
        NoteType::Pager,
        NoteType::DischargePlanning,
    ];

    /// How likely each label is to be asked in this kind of note (doctor, bed, device, other).
    pub fn affinity(self) -> [f64; 4] {
        match self {
            NoteType::EdTriage => [1.0, 1.0, 0.8, 0.3],
            NoteType::WardRound => [0.8, 0.6, 0.8, 0.8],
            NoteType::NurseNote => [1.0, 0.5, 0.8, 0.8],
            NoteType::OrderComment => [0.4, 0.4, 1.3, 0.5],
            NoteType::Handover => [1.0, 0.8, 0.8, 0.6],
            NoteType::BedManager => [0.12, 2.2, 0.12, 0.3],
            NoteType::Pager => [1.5, 0.5, 0.6, 0.5],
            NoteType::DischargePlanning => [0.25, 0.2, 0.5, 2.0],
        }
    }

    /// Multiplier on the site's all-lowercase rate: quick messages are typed carelessly.
    pub fn lowercase_factor(self) -> f64 {
        match self {
            NoteType::Pager => 2.2,
            NoteType::Handover | NoteType::NurseNote => 1.3,
            NoteType::OrderComment | NoteType::DischargePlanning => 0.6,
            _ => 1.0,
        }
    }
}

pub(super) struct SiteProfile {
    pub specialties: &'static [(Spec, f64)],
    /// Weights over `NoteType::ALL`.
    pub note_mix: [f64; 8],
    /// Chance an expandable phrase is written in shorthand.
    pub abbrev: f64,
    /// Chance per word (4+ letters) of a character-level typo.
    pub typo: f64,
    /// Chance a note is written with US spelling and terms.
    pub us: f64,
    /// Chance a note is typed all in lowercase.
    pub lower: f64,
    /// Share of notes built as hard cases (negation, distractor, secondary need, review-to-decide).
    pub hard: f64,
    /// Resource weight multipliers by resource key.
    pub boosts: &'static [(&'static str, f64)],
    /// Site-flavoured context lines ("CT closes at 1700", "mum at bedside").
    pub context: Bank,
    pub context_rate: f64,
    pub wards: Bank,
    pub hospitals: Bank,
}

impl SiteProfile {
    pub fn boost(&self, key: &str) -> f64 {
        self.boosts.iter().find(|(k, _)| *k == key).map_or(1.0, |(_, b)| *b)
    }
}

const HOSPITALS: Bank = &[
    "the tertiary centre",
    "the regional centre",
    "City General",
    "the university hospital",
    "the MTC",
    "St Mary's",
    "the Royal",
    "the cardiothoracic centre",
    "Queen's",
    "the neuro centre",
    "the teaching hospital",
    "the regional burns unit",
];

static TRAUMA: SiteProfile = SiteProfile {
    specialties: &[
        (Orthopaedics, 0.22),
        (Surgery, 0.17),
        (Neurology, 0.08),
        (Icu, 0.12),
        (AcuteMedicine, 0.1),
        (Cardiology, 0.05),
        (Respiratory, 0.05),
        (Psychiatry, 0.06),
        (Geriatrics, 0.06),
        (Renal, 0.03),
        (Infectious, 0.03),
        (Gastro, 0.03),
    ],
    note_mix: [0.28, 0.08, 0.06, 0.16, 0.15, 0.1, 0.15, 0.02],
    abbrev: 0.75,
    typo: 0.015,
    us: 0.15,
    lower: 0.12,
    hard: 0.26,
    boosts: &[
        ("ct", 3.0),
        ("xray", 2.0),
        ("ventilator", 1.8),
        ("wound_vac", 2.0),
        ("icu_bed", 1.5),
        ("pca_pump", 1.5),
        ("surgical_bed", 1.5),
        ("hoist", 1.3),
        ("specialist", 1.2),
    ],
    context: &[
        "{trauma call|major trauma call} {activated|put out}",
        "{pre-alert|HEMS pre-alert} {received|}",
        "{MTC|major trauma} pathway",
        "{primary survey|ATLS primary survey} {done|complete}",
        "{c-spine immobilised|collar and blocks on}",
        "{2 large-bore cannulae|2x 14G} in",
        "{TXA given|1g TXA given} {at scene|pre-hospital}",
        "{log rolled|log roll done}",
        "{mechanism:|MOI:} {fall from height|RTC|assault}",
    ],
    context_rate: 0.3,
    wards: &["ward 7", "7B", "the trauma ward", "SAU", "T&O ward", "ward 22", "Major Trauma Ward", "resus", "ward 9", "4 North"],
    hospitals: HOSPITALS,
};

static RURAL: SiteProfile = SiteProfile {
    specialties: &[
        (AcuteMedicine, 0.2),
        (Geriatrics, 0.16),
        (Respiratory, 0.12),
        (Cardiology, 0.1),
        (Obstetrics, 0.05),
        (Surgery, 0.07),
        (Orthopaedics, 0.06),
        (Paediatrics, 0.05),
        (Renal, 0.04),
        (Psychiatry, 0.05),
        (Infectious, 0.04),
        (Gastro, 0.04),
        (Neurology, 0.02),
    ],
    note_mix: [0.2, 0.1, 0.25, 0.05, 0.1, 0.05, 0.12, 0.13],
    abbrev: 0.5,
    typo: 0.03,
    us: 0.2,
    lower: 0.2,
    hard: 0.26,
    boosts: &[
        ("tertiary_transfer", 5.0),
        ("ct", 0.7),
        ("o2_concentrator", 2.0),
        ("ventilator", 1.3),
        ("transport", 1.5),
        ("ecmo", 0.0),
        ("crrt", 0.0),
        ("hoist", 1.3),
        ("senior", 1.4),
    ],
    context: &[
        "{CT closes at 1700|no CT after 5pm|CT only till 17:00}",
        "{nearest CT 90 min away|nearest cath lab 2h away}",
        "{no on-site ICU|no ICU on site}",
        "{single doctor on site overnight|only 1 doctor on tonight}",
        "{retrieval service aware|retrieval team notified}",
        "{weather may delay transfer|roads closed with snow}",
        "{locum GP covering|VMO on call}",
        "{lives on farm 30 miles out|remote property}",
        "{no pharmacy on weekends|pharmacy closed till Monday}",
    ],
    context_rate: 0.3,
    wards: &[
        "the ward",
        "Medical ward",
        "ward 2",
        "Acute ward",
        "GP beds",
        "the main ward",
        "Ward A",
        "ED",
        "the nursing station",
        "Ward B",
    ],
    hospitals: HOSPITALS,
};

static CHILDRENS: SiteProfile = SiteProfile {
    specialties: &[(Paediatrics, 0.5), (Neonatal, 0.16), (PaedSurgery, 0.22), (Camhs, 0.12)],
    note_mix: [0.22, 0.14, 0.18, 0.1, 0.12, 0.08, 0.1, 0.06],
    abbrev: 0.55,
    typo: 0.012,
    us: 0.25,
    lower: 0.1,
    hard: 0.26,
    boosts: &[("interpreter", 1.3), ("social_work", 1.4), ("play_specialist", 1.5), ("hfno", 1.8), ("ultrasound", 1.5), ("xray", 1.3)],
    context: &[
        "{<parent> present|<parent> at bedside|<parent> anxious}",
        "{no safeguarding concerns|safeguarding checked}",
        "{immunisations UTD|fully immunised}",
        "{siblings unwell too|nursery contacts unwell}",
        "{<parent> consented|consent from <parent>}",
        "{<parent> resident|<parent> staying}",
        "wt <wt>",
    ],
    context_rate: 0.45,
    wards: &[
        "Puffin ward",
        "Starfish",
        "Rainbow ward",
        "PAU",
        "ward 3",
        "NNU",
        "the surgical ward",
        "Sunflower ward",
        "PHDU",
        "the day unit",
    ],
    hospitals: &[
        "the tertiary centre",
        "the regional PICU",
        "the cardiac centre",
        "the neonatal surgical unit",
        "the regional centre",
        "the burns unit",
        "Great Ormond",
    ],
};

static TEACHING: SiteProfile = SiteProfile {
    specialties: &[
        (Cardiology, 0.09),
        (Respiratory, 0.08),
        (Renal, 0.07),
        (Gastro, 0.07),
        (Surgery, 0.08),
        (Orthopaedics, 0.05),
        (Obstetrics, 0.05),
        (Neurology, 0.08),
        (Oncology, 0.05),
        (Haematology, 0.04),
        (Geriatrics, 0.08),
        (Icu, 0.07),
        (Psychiatry, 0.05),
        (Infectious, 0.06),
        (AcuteMedicine, 0.1),
    ],
    note_mix: [0.12, 0.2, 0.1, 0.15, 0.12, 0.08, 0.15, 0.08],
    abbrev: 0.72,
    typo: 0.02,
    us: 0.35,
    lower: 0.12,
    hard: 0.26,
    boosts: &[("specialist", 1.4), ("preauth", 2.0), ("mri", 1.3), ("ecmo", 1.5), ("records", 1.3)],
    context: &[
        "{seen on post-take|post-take}",
        "{research|trial} {participant|patient}",
        "{under|known to} {multiple teams|several specialties}",
        "{complex pt|complex case}",
        "{transfer from|repatriation from} {DGH|district hospital}",
        "{team A|firm B|blue team} pt",
        "{students|med students} {shadowing|present}",
    ],
    context_rate: 0.15,
    wards: &[
        "ward 7",
        "AMU",
        "Elm ward",
        "5 East",
        "the floor",
        "MICU",
        "4 North",
        "ward 22",
        "CCU",
        "Cedar",
        "6 West",
        "the step-down unit",
    ],
    hospitals: HOSPITALS,
};

static CANCER: SiteProfile = SiteProfile {
    specialties: &[
        (Oncology, 0.36),
        (Haematology, 0.2),
        (Gastro, 0.05),
        (Respiratory, 0.06),
        (Surgery, 0.08),
        (AcuteMedicine, 0.07),
        (Infectious, 0.06),
        (Renal, 0.03),
        (Neurology, 0.04),
        (Icu, 0.03),
        (Geriatrics, 0.02),
    ],
    note_mix: [0.08, 0.2, 0.16, 0.12, 0.14, 0.08, 0.12, 0.1],
    abbrev: 0.6,
    typo: 0.015,
    us: 0.1,
    lower: 0.08,
    hard: 0.26,
    boosts: &[
        ("isolation_room", 3.0),
        ("syringe_driver", 3.0),
        ("mri", 2.0),
        ("infusion_pump", 2.0),
        ("chaplain", 2.5),
        ("social_work", 1.2),
        ("oncology_bed", 2.0),
        ("pharmacy", 1.3),
    ],
    context: &[
        "{cycle 3 day 10|C2D8} {of chemo|}",
        "{PS 1|ECOG 2}",
        "{DNACPR|ReSPECT} {in place|discussed}",
        "{on trial drug|in clinical trial}",
        "{palliative intent|curative intent}",
        "{PICC in situ|portacath in situ}",
        "{known to AOS|under AOS}",
    ],
    context_rate: 0.3,
    wards: &[
        "the onc ward",
        "ward 8",
        "the haem unit",
        "the day unit",
        "TYA unit",
        "ward 10",
        "the chemo suite",
        "Maple ward",
        "the triage unit",
    ],
    hospitals: HOSPITALS,
};
