//! The hospital's allocation engine (issue 20): given the open requests (what the model
//! predicts each note asks for, how sure it is, how urgent, how long it has waited) and the
//! free resources, decide who gets which doctor, bed or device. Pure: no I/O, no clock
//! (waiting times come in), deterministic.
//!
//! Two methods over the same rules:
//! - [`greedy`]: what a bed manager does by hand: requests by priority (urgency, then
//!   waiting time, then confidence), each takes the first free unit that fits.
//! - [`optimal`]: one decision epoch solved exactly as an assignment problem: maximise the
//!   summed [`value`] of the requests served (urgency-weighted, growing with the wait) over
//!   matchings that respect the constraints (resource kind, specialty/ward/device type,
//!   bed features such as isolation). Solved with Kuhn-Munkres (`pathfinding`): every free
//!   unit is a column, plus one "not served now" column per request, so the problem is
//!   square-or-wider and exact. An epoch larger than [`Policy::max_exact_cells`] (the
//!   solver is cubic) falls back to greedy, and says so.
//!
//! Predictions below [`Policy::review_below`] are never auto-assigned: they go to a human
//! review queue. A note predicted `other` asks for no resource this engine allocates.

use std::collections::BTreeSet;

use pathfinding::kuhn_munkres::kuhn_munkres;
use pathfinding::matrix::Matrix;

/// What a note asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Doctor,
    Bed,
    Device,
    Other,
}

/// One free unit: a doctor on shift, a bed, a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    pub id: String,
    pub kind: Kind,
    /// Specialty (doctor), ward (bed) or device type (ventilator, infusion-pump, ...).
    pub group: String,
    /// Features: `isolation`, `monitored`, ...
    pub features: BTreeSet<String>,
}

/// One open request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub id: String,
    /// The model's prediction and its probability.
    pub kind: Kind,
    pub confidence: f64,
    /// 1 (most urgent, resuscitation) to 5 (non-urgent), as in five-level triage scales.
    pub urgency: u8,
    pub waited_secs: u64,
    /// The specialty, ward or device type it must have, when it names one.
    pub group: Option<String>,
    /// Features the unit must have.
    pub needs: BTreeSet<String>,
}

/// The engine's settings.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Predictions less sure than this go to human review.
    pub review_below: f64,
    /// Value added per hour waited, in units of an urgency-5 request.
    pub wait_weight_per_hour: f64,
    /// The largest (requests x columns) the exact solver takes; beyond it, greedy.
    pub max_exact_cells: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self { review_below: 0.6, wait_weight_per_hour: 0.5, max_exact_cells: 250_000 }
    }
}

/// What happened to one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Assigned {
        request: String,
        unit: String,
    },
    /// Waits; `position` 1 is next, by priority.
    Queued {
        request: String,
        position: usize,
        reason: String,
    },
    /// A person must confirm what the note asks for.
    Review {
        request: String,
        reason: String,
    },
}

/// How a plan was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// First come, first served: arrival order, urgency ignored (the floor to beat).
    Fcfs,
    Greedy,
    Exact,
    /// The epoch was too large for the exact solver.
    GreedyFallback,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub method: Method,
    pub decisions: Vec<Decision>,
    /// The summed value of the requests served.
    pub objective: f64,
}

/// A pool of interchangeable units: the beds of one ward with the same features, the
/// doctors of one specialty on shift, the devices of one type.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub kind: Kind,
    /// Ward (beds), specialty (doctors) or device type (devices).
    pub group: String,
    /// Bed features such as `isolation` or `monitored`.
    #[serde(default)]
    pub features: BTreeSet<String>,
    pub total: u32,
    pub free: u32,
}

impl Pool {
    /// `kind:group` or `kind:group:feature+feature`, e.g. `bed:medical:isolation`.
    pub fn id(&self) -> String {
        let kind = match self.kind {
            Kind::Doctor => "doctor",
            Kind::Bed => "bed",
            Kind::Device => "device",
            Kind::Other => "other",
        };
        let mut id = format!("{kind}:{}", self.group);
        if !self.features.is_empty() {
            id.push(':');
            id.push_str(&self.features.iter().cloned().collect::<Vec<_>>().join("+"));
        }
        id
    }
}

/// Why a capacity is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapacityError {
    #[error("resource {index}: {reason}")]
    Invalid { index: usize, reason: String },
    #[error("resource {0} is listed twice")]
    Duplicate(String),
    #[error("no resource {0}")]
    Unknown(String),
    #[error("every unit of {0} is already free")]
    AllFree(String),
}

/// The live inventory: every pool and how many of its units are free.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub resources: Vec<Pool>,
}

/// Names are short, printable and free of the `:`/`+` that build pool ids.
fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '))
}

impl Capacity {
    /// Checks names, counts and that no pool appears twice.
    pub fn validate(&self) -> Result<(), CapacityError> {
        let mut seen = BTreeSet::new();
        for (index, p) in self.resources.iter().enumerate() {
            let invalid = |reason: &str| Err(CapacityError::Invalid { index, reason: reason.into() });
            if p.kind == Kind::Other {
                return invalid("kind must be doctor, bed or device");
            }
            if !valid_name(&p.group) {
                return invalid("group must be 1-64 letters, digits, spaces, '-', '_' or '.'");
            }
            if p.features.iter().any(|f| !valid_name(f)) {
                return invalid("features must be 1-64 letters, digits, spaces, '-', '_' or '.'");
            }
            if p.free > p.total {
                return invalid("free exceeds total");
            }
            if !seen.insert(p.id()) {
                return Err(CapacityError::Duplicate(p.id()));
            }
        }
        Ok(())
    }

    /// One [`Unit`] per free unit; a unit's id is its pool's.
    pub fn units(&self) -> Vec<Unit> {
        self.resources
            .iter()
            .flat_map(|p| {
                let unit = Unit { id: p.id(), kind: p.kind, group: p.group.clone(), features: p.features.clone() };
                std::iter::repeat_n(unit, p.free as usize)
            })
            .collect()
    }

    fn pool_mut(&mut self, id: &str) -> Result<&mut Pool, CapacityError> {
        self.resources.iter_mut().find(|p| p.id() == id).ok_or_else(|| CapacityError::Unknown(id.to_owned()))
    }

    /// Marks one unit of pool `id` in use.
    pub fn take(&mut self, id: &str) -> Result<(), CapacityError> {
        let pool = self.pool_mut(id)?;
        pool.free = pool.free.checked_sub(1).ok_or_else(|| CapacityError::Invalid { index: 0, reason: format!("{id} has no free unit") })?;
        Ok(())
    }

    /// Frees one unit of pool `id`.
    pub fn release(&mut self, id: &str) -> Result<(), CapacityError> {
        let pool = self.pool_mut(id)?;
        if pool.free >= pool.total {
            return Err(CapacityError::AllFree(id.to_owned()));
        }
        pool.free += 1;
        Ok(())
    }
}

/// The value of serving `r` now: `2^(5 - urgency)` (an urgency-1 request weighs sixteen
/// urgency-5 ones) plus `wait_weight_per_hour` per hour waited.
pub fn value(r: &Request, policy: &Policy) -> f64 {
    let urgency = r.urgency.clamp(1, 5);
    f64::from(1u32 << (5 - urgency)) + policy.wait_weight_per_hour * r.waited_secs as f64 / 3600.0
}

/// Whether `u` can serve `r`.
pub fn fits(r: &Request, u: &Unit) -> bool {
    r.kind == u.kind && r.group.as_ref().is_none_or(|g| *g == u.group) && r.needs.is_subset(&u.features)
}

/// Requests to auto-assign, by priority; the others' review decisions.
fn triage<'a>(requests: &'a [Request], policy: &Policy) -> (Vec<&'a Request>, Vec<Decision>) {
    let mut review = Vec::new();
    let mut open = Vec::new();
    for r in requests {
        if r.kind == Kind::Other {
            review.push(Decision::Review { request: r.id.clone(), reason: "the note asks for no doctor, bed or device".into() });
        } else if r.confidence.is_nan() || r.confidence < policy.review_below {
            review.push(Decision::Review {
                request: r.id.clone(),
                reason: format!("the prediction's confidence {:.2} is below {:.2}", r.confidence, policy.review_below),
            });
        } else {
            open.push(r);
        }
    }
    open.sort_by(|a, b| {
        a.urgency.cmp(&b.urgency).then(b.waited_secs.cmp(&a.waited_secs)).then(b.confidence.total_cmp(&a.confidence)).then(a.id.cmp(&b.id))
    });
    (open, review)
}

/// The plan from a choice of unit (index) per open request, in priority order.
fn plan(method: Method, open: &[&Request], units: &[Unit], chosen: &[Option<usize>], review: Vec<Decision>, policy: &Policy) -> Plan {
    let mut decisions = Vec::new();
    let mut objective = 0.0;
    let mut position = 0;
    for (r, c) in open.iter().zip(chosen) {
        match c {
            Some(u) => {
                objective += value(r, policy);
                decisions.push(Decision::Assigned { request: r.id.clone(), unit: units[*u].id.clone() });
            }
            None => {
                position += 1;
                let any = units.iter().any(|u| fits(r, u));
                let reason = if any { "every fitting unit went to a request of higher value" } else { "no free unit fits" };
                decisions.push(Decision::Queued { request: r.id.clone(), position, reason: reason.into() });
            }
        }
    }
    decisions.extend(review);
    Plan { method, decisions, objective }
}

/// First come, first served: the longest-waiting request takes the first free unit that
/// fits, whatever its urgency.
pub fn fcfs(requests: &[Request], units: &[Unit], policy: &Policy) -> Plan {
    let (mut open, review) = triage(requests, policy);
    open.sort_by(|a, b| b.waited_secs.cmp(&a.waited_secs).then(a.id.cmp(&b.id)));
    greedy_from(Method::Fcfs, &open, units, review, policy)
}

/// The plan `method` makes (`GreedyFallback` is chosen by [`optimal`], not asked for).
pub fn decide(method: Method, requests: &[Request], units: &[Unit], policy: &Policy) -> Plan {
    match method {
        Method::Fcfs => fcfs(requests, units, policy),
        Method::Greedy => greedy(requests, units, policy),
        Method::Exact | Method::GreedyFallback => optimal(requests, units, policy),
    }
}

/// The bed manager's way: by priority, the first free unit that fits.
pub fn greedy(requests: &[Request], units: &[Unit], policy: &Policy) -> Plan {
    let (open, review) = triage(requests, policy);
    greedy_from(Method::Greedy, &open, units, review, policy)
}

fn greedy_from(method: Method, open: &[&Request], units: &[Unit], review: Vec<Decision>, policy: &Policy) -> Plan {
    let mut taken = vec![false; units.len()];
    let chosen: Vec<Option<usize>> = open
        .iter()
        .map(|r| {
            let u = (0..units.len()).find(|&u| !taken[u] && fits(r, &units[u]))?;
            taken[u] = true;
            Some(u)
        })
        .collect();
    plan(method, open, units, &chosen, review, policy)
}

/// The assignment of most value for this epoch (see the module's documentation).
pub fn optimal(requests: &[Request], units: &[Unit], policy: &Policy) -> Plan {
    let (open, review) = triage(requests, policy);
    let columns = units.len() + open.len();
    if open.is_empty() || open.len().saturating_mul(columns) > policy.max_exact_cells {
        let method = if open.is_empty() { Method::Exact } else { Method::GreedyFallback };
        return greedy_from(method, &open, units, review, policy);
    }
    // Integer weights (the solver needs an exact order): value in thousandths. A pair that
    // does not fit weighs far below "not served", so it is never chosen.
    const SCALE: f64 = 1000.0;
    let forbidden = -(1i64 << 40);
    let weights = Matrix::from_fn(open.len(), columns, |(r, c)| {
        if c < units.len() {
            if fits(open[r], &units[c]) {
                (value(open[r], policy) * SCALE).round() as i64
            } else {
                forbidden
            }
        } else if c - units.len() == r {
            0
        } else {
            forbidden
        }
    });
    let (_, assignment) = kuhn_munkres(&weights);
    let chosen: Vec<Option<usize>> = assignment.into_iter().map(|c| (c < units.len()).then_some(c)).collect();
    plan(Method::Exact, &open, units, &chosen, review, policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(id: &str, kind: Kind, group: &str, features: &[&str]) -> Unit {
        Unit { id: id.into(), kind, group: group.into(), features: features.iter().map(|s| (*s).to_owned()).collect() }
    }

    fn request(id: &str, kind: Kind, urgency: u8, group: Option<&str>, needs: &[&str]) -> Request {
        Request {
            id: id.into(),
            kind,
            confidence: 0.9,
            urgency,
            waited_secs: 0,
            group: group.map(str::to_owned),
            needs: needs.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn assigned(p: &Plan) -> Vec<(String, String)> {
        p.decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Assigned { request, unit } => Some((request.clone(), unit.clone())),
                _ => None,
            })
            .collect()
    }

    /// The bed manager gives the isolation bed to the more urgent patient who does not
    /// need it; the exact plan serves both.
    #[test]
    fn the_exact_plan_serves_what_greedy_strands() {
        let units = [unit("bed-iso", Kind::Bed, "medical", &["isolation"]), unit("bed-7", Kind::Bed, "medical", &[])];
        let requests = [request("r1", Kind::Bed, 2, None, &[]), request("r2", Kind::Bed, 3, None, &["isolation"])];
        let p = Policy::default();
        let g = greedy(&requests, &units, &p);
        assert_eq!(assigned(&g), [("r1".to_owned(), "bed-iso".to_owned())]);
        assert!(matches!(&g.decisions[1], Decision::Queued { request, position: 1, .. } if request == "r2"));
        let o = optimal(&requests, &units, &p);
        assert_eq!(o.method, Method::Exact);
        let mut served = assigned(&o);
        served.sort();
        assert_eq!(served, [("r1".to_owned(), "bed-7".to_owned()), ("r2".to_owned(), "bed-iso".to_owned())]);
        assert!(o.objective > g.objective);
    }

    #[test]
    fn the_scarce_unit_goes_to_the_most_urgent_and_the_longest_wait_counts() {
        let units = [unit("dr-a", Kind::Doctor, "cardiology", &[])];
        let mut minor = request("minor", Kind::Doctor, 4, Some("cardiology"), &[]);
        let major = request("major", Kind::Doctor, 2, Some("cardiology"), &[]);
        let p = Policy::default();
        assert_eq!(assigned(&optimal(&[minor.clone(), major.clone()], &units, &p)), [("major".to_owned(), "dr-a".to_owned())]);
        // Thirteen hours of waiting outweigh the urgency gap (2 + 0.5 * 13 > 8).
        minor.waited_secs = 13 * 3600;
        assert_eq!(assigned(&optimal(&[minor, major], &units, &p)), [("minor".to_owned(), "dr-a".to_owned())]);
    }

    #[test]
    fn constraints_hold_and_unsure_or_other_notes_go_to_review() {
        let units = [unit("vent-1", Kind::Device, "ventilator", &[]), unit("pump-1", Kind::Device, "infusion-pump", &[])];
        let mut unsure = request("unsure", Kind::Device, 1, Some("ventilator"), &[]);
        unsure.confidence = 0.4;
        let requests = [
            unsure,
            request("other", Kind::Other, 1, None, &[]),
            request("wrong-type", Kind::Device, 1, Some("monitor"), &[]),
            request("vent", Kind::Device, 3, Some("ventilator"), &[]),
        ];
        for plan in [greedy(&requests, &units, &Policy::default()), optimal(&requests, &units, &Policy::default())] {
            assert_eq!(assigned(&plan), [("vent".to_owned(), "vent-1".to_owned())]);
            let review: Vec<&str> = plan
                .decisions
                .iter()
                .filter_map(|d| match d {
                    Decision::Review { request, .. } => Some(request.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(review, ["unsure", "other"]);
            assert!(plan.decisions.iter().any(
                |d| matches!(d, Decision::Queued { request, reason, .. } if request == "wrong-type" && reason == "no free unit fits")
            ));
        }
    }

    #[test]
    fn a_large_epoch_falls_back_to_greedy_and_says_so() {
        let units: Vec<Unit> = (0..10).map(|i| unit(&format!("b{i}"), Kind::Bed, "w", &[])).collect();
        let requests: Vec<Request> = (0..10).map(|i| request(&format!("r{i}"), Kind::Bed, 3, None, &[])).collect();
        let small = Policy { max_exact_cells: 50, ..Policy::default() };
        let p = optimal(&requests, &units, &small);
        assert_eq!(p.method, Method::GreedyFallback);
        assert_eq!(assigned(&p).len(), 10);
        assert_eq!(optimal(&requests, &units, &Policy::default()).objective, p.objective);
    }

    /// Exact never does worse than greedy, on seeded random epochs.
    #[test]
    fn exact_is_never_worse_than_greedy() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(20);
        let kinds = [Kind::Doctor, Kind::Bed, Kind::Device];
        let groups = ["a", "b", "c"];
        for _ in 0..200 {
            let units: Vec<Unit> = (0..rng.random_range(0..8))
                .map(|i| {
                    let f: &[&str] = if rng.random_bool(0.3) { &["isolation"] } else { &[] };
                    unit(&format!("u{i}"), kinds[rng.random_range(0..3)], groups[rng.random_range(0..3)], f)
                })
                .collect();
            let requests: Vec<Request> = (0..rng.random_range(0..10))
                .map(|i| {
                    let n: &[&str] = if rng.random_bool(0.2) { &["isolation"] } else { &[] };
                    let g = rng.random_bool(0.5).then(|| groups[rng.random_range(0..3)]);
                    let mut r = request(&format!("r{i}"), kinds[rng.random_range(0..3)], rng.random_range(1..=5), g, n);
                    r.waited_secs = rng.random_range(0..20_000);
                    r
                })
                .collect();
            let p = Policy::default();
            let (g, o) = (greedy(&requests, &units, &p), optimal(&requests, &units, &p));
            assert!(o.objective >= g.objective - 1e-6, "{} < {}", o.objective, g.objective);
            assert_eq!(o.decisions.len(), requests.len());
            for (r, u) in assigned(&o) {
                let (r, u) = (requests.iter().find(|x| x.id == r).unwrap(), units.iter().find(|x| x.id == u).unwrap());
                assert!(fits(r, u));
            }
        }
    }
}
