//! Crash points for the chaos suite (`scripts/chaos.sh`, `tests/chaos`).
//!
//! A crash point names a place where a crash matters: right after a ledger append, in
//! the middle of a checkpoint write, between an upload's header and its bytes. Built with
//! the `failpoints` feature, a process started with `FAILPOINTS=<name>=return` (the
//! [fail](https://docs.rs/fail) crate's syntax: `2*off->return` fires the third time)
//! kills itself there with SIGKILL, leaving its files exactly as a power cut or an OOM
//! kill would. Without the feature every call compiles to nothing, and the environment is
//! never read: a release build has no way to be crashed on purpose.

/// Every crash point, for the chaos suite to choose from.
pub const CRASH_POINTS: &[&str] = &[
    AGENT_DOWNLOAD,
    AGENT_AFTER_LEDGER_APPEND,
    AGENT_UPLOAD,
    AGENT_AFTER_ACK,
    COORDINATOR_DOWNLOAD,
    COORDINATOR_UPLOAD,
    COORDINATOR_AFTER_ACCEPTED,
    COORDINATOR_CHECKPOINT_WRITE,
    COORDINATOR_AFTER_CHECKPOINT,
    COORDINATOR_BEFORE_SEAL,
    LEDGER_APPEND_TORN,
];

/// The agent has asked for the global model and not yet read it.
pub const AGENT_DOWNLOAD: &str = "agent-download";
/// The release is in the site's ledger (fsynced) and has not been sent.
pub const AGENT_AFTER_LEDGER_APPEND: &str = "agent-after-ledger-append";
/// The coordinator said proceed; the update's bytes have not been sent.
pub const AGENT_UPLOAD: &str = "agent-upload";
/// The coordinator acknowledged the update.
pub const AGENT_AFTER_ACK: &str = "agent-after-ack";
/// A model download's header is sent, its tensors are not.
pub const COORDINATOR_DOWNLOAD: &str = "coordinator-download";
/// An update's header is admitted; its bytes have not arrived.
pub const COORDINATOR_UPLOAD: &str = "coordinator-upload";
/// An update is in the coordinator's ledger and not yet acknowledged.
pub const COORDINATOR_AFTER_ACCEPTED: &str = "coordinator-after-accepted";
/// A checkpoint's temporary file is half written.
pub const COORDINATOR_CHECKPOINT_WRITE: &str = "coordinator-checkpoint-write";
/// A checkpoint is in place; the state that points to it is not.
pub const COORDINATOR_AFTER_CHECKPOINT: &str = "coordinator-after-checkpoint";
/// A round is checkpointed and in `state.json`, not yet sealed in the ledger.
pub const COORDINATOR_BEFORE_SEAL: &str = "coordinator-before-seal";

/// Half of a ledger line is written (either daemon's ledger): a torn append.
pub const LEDGER_APPEND_TORN: &str = "ledger-append-torn";

/// Reads `FAILPOINTS` once, at start (with the `failpoints` feature; else nothing).
pub fn setup() {
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
}

/// Whether this build has crash points (`--version` says so).
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Dies here, as SIGKILL leaves a process, when the chaos suite armed `name`.
#[inline]
pub fn crash_point(name: &'static str) {
    #[cfg(feature = "failpoints")]
    if fail::eval(name, |_| ()).is_some() {
        eprintln!("fedward: crash point {name} reached: killing this process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    let _ = name;
}

/// The directory the chaos suite keeps released updates in (`FEDWARD_CHAOS_ARCHIVE`).
pub const ARCHIVE_ENV: &str = "FEDWARD_CHAOS_ARCHIVE";

/// With the `failpoints` feature and [`ARCHIVE_ENV`] set, keeps a copy of `bytes` as
/// `<dir>/<name>`: the chaos suite keeps every update a site releases, to recompute the
/// global model from them. Otherwise nothing (and never in a release build).
pub fn keep_copy(name: &str, bytes: &[u8]) {
    #[cfg(feature = "failpoints")]
    if let Some(dir) = std::env::var_os(ARCHIVE_ENV) {
        let dir = std::path::Path::new(&dir);
        if let Err(e) = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(dir.join(name), bytes)) {
            eprintln!("fedward: cannot keep a copy for the chaos suite in {}: {e}", dir.display());
        }
    }
    let _ = (name, bytes);
}
