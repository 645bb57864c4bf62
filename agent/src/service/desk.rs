//! The triage desk: the service's state and rules, pure (the clock comes in as `now`,
//! unix seconds). It holds the live capacity, every open request (queued or waiting for a
//! person's review), the units requests hold, and a bounded log of recent decisions, and
//! runs a decision epoch of the allocation engine after every change: a new request, a
//! capacity update, a release, a correction.
//!
//! A note's text is held here, in memory only, while its request is open or among the
//! recent ones, so that a clinician's correction can be stored as a labelled example. It
//! is never in a view, an event or a `Debug` output.

use std::collections::{BTreeSet, VecDeque};

use serde::Serialize;

use crate::allocation::{self, valid_name, Capacity, CapacityError, Decision, Kind, Method, Policy, Request};

/// Most features a request may ask for.
const MAX_NEEDS: usize = 8;

/// What a new request says (its note is classified before it reaches the desk).
#[derive(Clone, Default)]
pub struct NewRequest {
    pub id: Option<String>,
    /// 1 (resuscitation) to 5 (non-urgent).
    pub urgency: u8,
    /// The ward a bed must be in.
    pub ward: Option<String>,
    /// The specialty a doctor must have.
    pub specialty: Option<String>,
    /// The device type a device must be.
    pub device_type: Option<String>,
    /// Features the unit must have (`isolation`, `monitored`, ...).
    pub needs: BTreeSet<String>,
}

/// Why the desk refused something.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeskError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("request {0} already exists")]
    Duplicate(String),
    #[error("no request {0} (unknown, or too old to be kept)")]
    Unknown(String),
    #[error("request {0} holds no resource")]
    NotHeld(String),
    #[error(transparent)]
    Capacity(#[from] CapacityError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for a unit (or for review, when its confidence is too low).
    Open,
    Held {
        resource: String,
    },
    Closed {
        why: &'static str,
    },
}

struct Entry {
    id: String,
    kind: Kind,
    confidence: f64,
    urgency: u8,
    arrived: u64,
    ward: Option<String>,
    specialty: Option<String>,
    device_type: Option<String>,
    needs: BTreeSet<String>,
    state: State,
    /// What the last epoch said about it while open: (position in the queue, reason) or
    /// the review reason.
    last: Option<Decision>,
    /// A person set its kind.
    corrected: bool,
    /// The note, for a correction to store; dropped with the entry.
    note: Option<String>,
}

impl Entry {
    fn group(&self) -> Option<String> {
        match self.kind {
            Kind::Bed => self.ward.clone(),
            Kind::Doctor => self.specialty.clone(),
            Kind::Device => self.device_type.clone(),
            Kind::Other => None,
        }
    }

    fn request(&self, now: u64) -> Request {
        Request {
            id: self.id.clone(),
            kind: self.kind,
            confidence: self.confidence,
            urgency: self.urgency,
            waited_secs: now.saturating_sub(self.arrived),
            group: self.group(),
            needs: self.needs.clone(),
        }
    }

    fn view(&self, now: u64) -> RequestView {
        let (status, resource, position, reason) = match (&self.state, &self.last) {
            (State::Held { resource }, _) => ("assigned", Some(resource.clone()), None, None),
            (State::Closed { why }, _) => ("closed", None, None, Some((*why).to_owned())),
            (State::Open, Some(Decision::Queued { position, reason, .. })) => ("queued", None, Some(*position), Some(reason.clone())),
            (State::Open, Some(Decision::Review { reason, .. })) => ("review", None, None, Some(reason.clone())),
            (State::Open, _) => ("queued", None, None, None),
        };
        RequestView {
            id: self.id.clone(),
            status,
            kind: self.kind,
            confidence: self.confidence,
            urgency: self.urgency,
            waited_secs: now.saturating_sub(self.arrived),
            group: self.group(),
            needs: self.needs.clone(),
            resource,
            position,
            reason,
            corrected: self.corrected,
        }
    }
}

/// A request as the API shows it: never its note.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RequestView {
    pub id: String,
    /// `assigned`, `queued`, `review` or `closed`.
    pub status: &'static str,
    /// What the desk believes the note asks for (the prediction, or a person's correction).
    pub kind: Kind,
    pub confidence: f64,
    pub urgency: u8,
    pub waited_secs: u64,
    /// The ward, specialty or device type it must have, if any.
    pub group: Option<String>,
    pub needs: BTreeSet<String>,
    /// The pool it holds a unit of.
    pub resource: Option<String>,
    /// Its place in the queue, 1 being next.
    pub position: Option<usize>,
    pub reason: Option<String>,
    pub corrected: bool,
}

/// One line of the recent decisions.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub at: u64,
    pub request: Option<String>,
    /// `assigned`, `queued`, `review`, `released`, `corrected`, `closed`, `capacity`.
    pub what: &'static str,
    pub resource: Option<String>,
    pub detail: Option<String>,
}

/// The queue as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueView {
    /// Waiting for a unit, in priority order.
    pub queued: Vec<RequestView>,
    /// Waiting for a person to confirm what the note asks for.
    pub review: Vec<RequestView>,
    /// Holding a unit.
    pub assigned: Vec<RequestView>,
    /// How the last epoch decided (`optimal` may have fallen back to greedy).
    pub method: Method,
}

/// What a release frees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Release {
    /// The unit a request holds (the patient was discharged, the consult ended).
    Request(String),
    /// One unit of a pool.
    Resource(String),
}

/// A correction's outcome: the note to store as a labelled example (when still held)
/// and the request now.
pub struct Corrected {
    pub note: Option<String>,
    pub request: RequestView,
}

pub struct Desk {
    capacity: Capacity,
    policy: Policy,
    method: Method,
    keep_recent: usize,
    entries: Vec<Entry>,
    events: VecDeque<Event>,
    last_method: Method,
    next_id: u64,
}

impl Desk {
    pub fn new(capacity: Capacity, policy: Policy, method: Method, keep_recent: usize) -> Result<Self, DeskError> {
        capacity.validate()?;
        Ok(Self {
            capacity,
            policy,
            method,
            keep_recent: keep_recent.max(1),
            entries: Vec::new(),
            events: VecDeque::new(),
            last_method: method,
            next_id: 1,
        })
    }

    pub fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Takes a classified request and decides at once.
    pub fn submit(&mut self, new: NewRequest, note: String, kind: Kind, confidence: f64, now: u64) -> Result<RequestView, DeskError> {
        if !(1..=5).contains(&new.urgency) {
            return Err(DeskError::Invalid("urgency must be 1 (most urgent) to 5".into()));
        }
        for (field, value) in [("ward", &new.ward), ("specialty", &new.specialty), ("device_type", &new.device_type)] {
            if value.as_deref().is_some_and(|v| !valid_name(v)) {
                return Err(DeskError::Invalid(format!("{field} must be 1-64 letters, digits, spaces, '-', '_' or '.'")));
            }
        }
        if new.needs.len() > MAX_NEEDS || new.needs.iter().any(|n| !valid_name(n)) {
            return Err(DeskError::Invalid(format!("needs: at most {MAX_NEEDS} names of 1-64 letters, digits, spaces, '-', '_' or '.'")));
        }
        if !confidence.is_finite() {
            return Err(DeskError::Invalid("the model gave no finite confidence".into()));
        }
        let id = match new.id {
            Some(id) if !valid_id(&id) => return Err(DeskError::Invalid("id must be 1-64 letters, digits, '-', '_' or '.'".into())),
            Some(id) if self.find(&id).is_some() => return Err(DeskError::Duplicate(id)),
            Some(id) => id,
            None => loop {
                let id = format!("r-{}", self.next_id);
                self.next_id += 1;
                if self.find(&id).is_none() {
                    break id;
                }
            },
        };
        let closed = kind == Kind::Other && confidence >= self.policy.review_below;
        self.entries.push(Entry {
            id: id.clone(),
            kind,
            confidence,
            urgency: new.urgency,
            arrived: now,
            ward: new.ward,
            specialty: new.specialty,
            device_type: new.device_type,
            needs: new.needs,
            state: if closed { State::Closed { why: NO_RESOURCE } } else { State::Open },
            last: None,
            corrected: false,
            note: Some(note),
        });
        if closed {
            self.log(now, Some(&id), "closed", None, Some(NO_RESOURCE.into()));
        }
        self.epoch(now);
        let view = self.view(&id, now)?;
        if view.status == "queued" || view.status == "review" {
            self.log(now, Some(&id), view.status, None, view.reason.clone());
        }
        self.evict();
        Ok(view)
    }

    /// Replaces the inventory (its `free` counts are the hospital's live figures).
    pub fn set_capacity(&mut self, capacity: Capacity, now: u64) -> Result<(), DeskError> {
        capacity.validate()?;
        let units: u32 = capacity.resources.iter().map(|p| p.free).sum();
        self.capacity = capacity;
        self.log(now, None, "capacity", None, Some(format!("{units} units free")));
        self.epoch(now);
        Ok(())
    }

    /// Frees a unit and gives it to whoever the engine picks.
    pub fn release(&mut self, release: Release, now: u64) -> Result<(), DeskError> {
        match release {
            Release::Resource(pool) => {
                self.capacity.release(&pool)?;
                self.log(now, None, "released", Some(&pool), None);
            }
            Release::Request(id) => {
                let entry = self.find_mut(&id).ok_or_else(|| DeskError::Unknown(id.clone()))?;
                let State::Held { resource } = entry.state.clone() else { return Err(DeskError::NotHeld(id)) };
                entry.state = State::Closed { why: "released" };
                // The inventory may already show it free (a capacity update came first).
                let _ = self.capacity.release(&resource);
                self.log(now, Some(&id), "released", Some(&resource), None);
            }
        }
        self.epoch(now);
        Ok(())
    }

    /// A person says what the note really asks for. A unit of the wrong kind is given
    /// back, and the request waits for the right one (its wait keeps counting).
    pub fn correct(&mut self, id: &str, kind: Kind, now: u64) -> Result<Corrected, DeskError> {
        let entry = self.find_mut(id).ok_or_else(|| DeskError::Unknown(id.to_owned()))?;
        let previous = entry.kind;
        entry.kind = kind;
        entry.confidence = 1.0;
        entry.corrected = true;
        let note = entry.note.clone();
        let mut freed = None;
        match entry.state.clone() {
            State::Held { resource } if previous != kind => {
                entry.state = if kind == Kind::Other { State::Closed { why: NO_RESOURCE } } else { State::Open };
                freed = Some(resource);
            }
            State::Open if kind == Kind::Other => entry.state = State::Closed { why: NO_RESOURCE },
            // A closed `other` that did need something waits from its arrival.
            State::Closed { why } if why == NO_RESOURCE && kind != Kind::Other => entry.state = State::Open,
            _ => {}
        }
        if let Some(resource) = &freed {
            let _ = self.capacity.release(resource);
        }
        let detail = format!("{} -> {}", previous.as_str(), kind.as_str());
        self.log(now, Some(id), "corrected", freed.as_deref(), Some(detail));
        self.epoch(now);
        Ok(Corrected { note, request: self.view(id, now)? })
    }

    /// The note of a request still kept, for a correction to store.
    pub fn note(&self, id: &str) -> Result<String, DeskError> {
        self.find(id).and_then(|e| e.note.clone()).ok_or_else(|| DeskError::Unknown(id.to_owned()))
    }

    pub fn view(&self, id: &str, now: u64) -> Result<RequestView, DeskError> {
        self.find(id).map(|e| e.view(now)).ok_or_else(|| DeskError::Unknown(id.to_owned()))
    }

    pub fn queue(&self, now: u64) -> QueueView {
        let mut queued: Vec<RequestView> = Vec::new();
        let mut review = Vec::new();
        let mut assigned = Vec::new();
        for e in &self.entries {
            let v = e.view(now);
            match v.status {
                "queued" => queued.push(v),
                "review" => review.push(v),
                "assigned" => assigned.push(v),
                _ => {}
            }
        }
        queued.sort_by_key(|v| v.position.unwrap_or(usize::MAX));
        QueueView { queued, review, assigned, method: self.last_method }
    }

    /// The recent decisions, newest first.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.events.iter().rev()
    }

    /// One decision epoch over every open request.
    fn epoch(&mut self, now: u64) {
        let open: Vec<usize> = (0..self.entries.len()).filter(|&i| self.entries[i].state == State::Open).collect();
        if open.is_empty() {
            return;
        }
        let requests: Vec<Request> = open.iter().map(|&i| self.entries[i].request(now)).collect();
        let plan = allocation::decide(self.method, &requests, &self.capacity.units(), &self.policy);
        self.last_method = plan.method;
        for decision in plan.decisions {
            let id = match &decision {
                Decision::Assigned { request, .. } | Decision::Queued { request, .. } | Decision::Review { request, .. } => request.clone(),
            };
            let Some(i) = open.iter().copied().find(|&i| self.entries[i].id == id) else { continue };
            if let Decision::Assigned { unit, .. } = &decision {
                if self.capacity.take(unit).is_ok() {
                    self.entries[i].state = State::Held { resource: unit.clone() };
                    self.log(now, Some(&id), "assigned", Some(unit), Some(format!("{:?}", plan.method).to_lowercase()));
                }
            }
            self.entries[i].last = Some(decision);
        }
    }

    fn find(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id == id)
    }

    fn find_mut(&mut self, id: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.id == id)
    }

    fn log(&mut self, at: u64, request: Option<&str>, what: &'static str, resource: Option<&str>, detail: Option<String>) {
        self.events.push_back(Event { at, request: request.map(str::to_owned), what, resource: resource.map(str::to_owned), detail });
        while self.events.len() > self.keep_recent {
            self.events.pop_front();
        }
    }

    /// Drops the oldest closed requests (and their notes) beyond `keep_recent`.
    fn evict(&mut self) {
        let closed = self.entries.iter().filter(|e| matches!(e.state, State::Closed { .. })).count();
        let mut excess = closed.saturating_sub(self.keep_recent);
        self.entries.retain(|e| {
            if excess > 0 && matches!(e.state, State::Closed { .. }) {
                excess -= 1;
                false
            } else {
                true
            }
        });
    }
}

const NO_RESOURCE: &str = "the note asks for no doctor, bed or device";

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocation::Pool;

    fn pool(kind: Kind, group: &str, features: &[&str], free: u32) -> Pool {
        Pool { kind, group: group.into(), features: features.iter().map(|s| (*s).to_owned()).collect(), total: free.max(1), free }
    }

    fn desk(pools: Vec<Pool>) -> Desk {
        Desk::new(Capacity { resources: pools }, Policy::default(), Method::Exact, 3).unwrap()
    }

    fn bed(urgency: u8, ward: &str) -> NewRequest {
        NewRequest { urgency, ward: Some(ward.into()), ..NewRequest::default() }
    }

    #[test]
    fn a_request_is_assigned_then_queued_then_served_by_a_release() {
        let mut d = desk(vec![pool(Kind::Bed, "medical", &[], 1)]);
        let first = d.submit(bed(3, "medical"), "note one".into(), Kind::Bed, 0.9, 100).unwrap();
        assert_eq!((first.status, first.resource.as_deref()), ("assigned", Some("bed:medical")));
        assert_eq!(d.capacity().resources[0].free, 0);
        let second = d.submit(bed(2, "medical"), "note two".into(), Kind::Bed, 0.9, 160).unwrap();
        assert_eq!((second.status, second.position), ("queued", Some(1)));
        d.release(Release::Request(first.id.clone()), 400).unwrap();
        let now = d.view(&second.id, 400).unwrap();
        assert_eq!((now.status, now.resource.as_deref(), now.waited_secs), ("assigned", Some("bed:medical"), 240));
        assert_eq!(d.view(&first.id, 400).unwrap().status, "closed");
        assert_eq!(d.release(Release::Request(first.id), 401), Err(DeskError::NotHeld("r-1".into())));
    }

    #[test]
    fn unsure_predictions_wait_for_review_and_a_correction_queues_them() {
        let mut d = desk(vec![pool(Kind::Device, "ventilator", &[], 1)]);
        let unsure = NewRequest { urgency: 1, device_type: Some("ventilator".into()), ..NewRequest::default() };
        let v = d.submit(unsure, "the note".into(), Kind::Bed, 0.4, 0).unwrap();
        assert_eq!(v.status, "review");
        assert_eq!(d.queue(0).review.len(), 1);
        let c = d.correct(&v.id, Kind::Device, 30).unwrap();
        assert_eq!(c.note.as_deref(), Some("the note"));
        assert_eq!((c.request.status, c.request.resource.as_deref()), ("assigned", Some("device:ventilator")));
        assert!(c.request.corrected);
    }

    #[test]
    fn a_wrong_kind_is_given_back_and_other_closes() {
        let mut d = desk(vec![pool(Kind::Bed, "medical", &[], 1), pool(Kind::Doctor, "cardiology", &[], 0)]);
        let req = NewRequest { urgency: 2, ward: Some("medical".into()), specialty: Some("cardiology".into()), ..NewRequest::default() };
        let v = d.submit(req, "n".into(), Kind::Bed, 0.95, 0).unwrap();
        assert_eq!(v.status, "assigned");
        let c = d.correct(&v.id, Kind::Doctor, 10).unwrap();
        assert_eq!((c.request.status, c.request.kind), ("queued", Kind::Doctor));
        assert_eq!(d.capacity().resources[0].free, 1, "the bed is free again");
        let o = d.submit(bed(4, "medical"), "n2".into(), Kind::Other, 0.99, 20).unwrap();
        assert_eq!(o.status, "closed");
        assert_eq!(d.capacity().resources[0].free, 1);
    }

    #[test]
    fn bad_requests_are_refused_and_ids_are_unique() {
        let mut d = desk(vec![]);
        assert!(matches!(d.submit(bed(0, "m"), "n".into(), Kind::Bed, 0.9, 0), Err(DeskError::Invalid(_))));
        assert!(matches!(d.submit(bed(3, "m:x"), "n".into(), Kind::Bed, 0.9, 0), Err(DeskError::Invalid(_))));
        let with_id = NewRequest { id: Some("ed-7".into()), ..bed(3, "m") };
        d.submit(with_id.clone(), "n".into(), Kind::Bed, 0.9, 0).unwrap();
        assert_eq!(d.submit(with_id, "n".into(), Kind::Bed, 0.9, 0).map(|v| v.id), Err(DeskError::Duplicate("ed-7".into())));
        assert!(matches!(d.correct("nope", Kind::Bed, 0), Err(DeskError::Unknown(_))));
    }

    #[test]
    fn closed_requests_and_their_notes_are_dropped_beyond_the_limit() {
        let mut d = desk(vec![]);
        for i in 0..6 {
            d.submit(bed(3, "m"), format!("n{i}"), Kind::Other, 0.99, i).unwrap();
        }
        assert_eq!(d.entries.len(), 3);
        assert!(d.view("r-1", 10).is_err());
        assert!(d.events().count() <= 3);
    }
}
