//! fedward's hospital agent: a daemon that trains the shared model on local data and
//! sends differentially private updates to the coordinator.
//!
//! `session` and `privacy` are the pure core (what to do with an offer, what may leave the
//! site); `daemon` is the network shell around them, over `fedward-net`.

pub mod allocation;
pub mod baseline;
pub mod daemon;
pub mod endpoint;
pub mod metrics;
pub mod outbox;
pub mod privacy;
pub mod renew;
pub mod service;
pub mod session;
pub mod simulate;
pub mod state_dir;
pub mod status;
pub mod trainer;
