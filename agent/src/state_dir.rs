//! The files of an agent's state directory that more than one part of the agent reads:
//! the daemon writes them, `status` and the triage service read them.

/// The site's privacy ledger.
pub const LEDGER: &str = "ledger.jsonl";
/// The latest global model, as received (the triage service serves it).
pub const MODEL_CACHE: &str = "global-model.safetensors";
/// What the daemon is doing (`status::StatusWriter`).
pub const STATUS_FILE: &str = "status.json";
