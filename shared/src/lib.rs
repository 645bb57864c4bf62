//! fedward's shared vocabulary: wire protocol, tensors, training plan, config, TLS/PKI,
//! differential-privacy math and the privacy ledger.
//!
//! This crate links no async runtime, no network stack and no ML framework: the agent,
//! the coordinator and the models crate all build on it, and it depends on none of them.

pub mod access;
pub mod audit;
pub mod checkpoint;
pub mod cli;
pub mod codec;
pub mod config;
pub mod dp;
pub mod failpoint;
pub mod fsutil;
pub mod history;
pub mod html;
pub mod ids;
pub mod ledger;
pub mod ledger_file;
pub mod ledger_key;
pub mod pki;
pub mod plan;
pub mod secagg;
pub mod tensor;
pub mod tls;
pub mod wire;
