//! fedward's hospital agent: a daemon that trains the shared model on local data and
//! sends differentially private updates to the coordinator.
//!
//! `session` is the pure core (what to do with an offer); `daemon` and `net` are the
//! network shell around it.

pub mod baseline;
pub mod daemon;
pub mod net;
pub mod outbox;
pub mod privacy;
pub mod session;
pub mod trainer;
