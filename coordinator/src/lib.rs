//! fedward's coordinator: enrolment, federated rounds, FedAvg, checkpoints, dashboard.
//!
//! `round`, `aggregate` and `server_opt` are the pure core; `server`, `store`, `ledger` and `admin` are
//! the I/O shells around them.

pub mod admin;
pub mod admin_client;
pub mod aggregate;
pub mod control;
pub mod dashboard;
pub mod gate;
pub mod ledger;
pub mod metrics;
pub mod renewal;
pub mod round;
pub mod server;
pub mod server_opt;
pub mod startup;
pub mod store;
