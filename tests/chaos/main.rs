//! The chaos suite (issue 18): the real `fedward-coordinator` and `fedward-agent` binaries
//! as processes on 127.0.0.1, under record-level DP, killed with SIGKILL at random points
//! (the crash points of `fedward_shared::failpoint`: a download, an upload, right after a
//! ledger append, a torn ledger line, after an ack, in a checkpoint write, before a seal;
//! and at random moments, the coordinator and an agent together), with lost and cut-short
//! files (`state.json`, the ledgers' tails, a site's whole ledger), restarted, and at the
//! end held to what must not break: every planned round completed exactly once, the final
//! model is what the recorded accepted updates imply, every ledger verifies and
//! reconciles, no site spent beyond its budget or counted a release twice, no process
//! wedged, no temporary file left.
//!
//! The test here is the short run of the README's test command. `scripts/chaos.sh` runs
//! the long one (`FEDWARD_CHAOS_KILLS`, `FEDWARD_CHAOS_ROUNDS`, `FEDWARD_CHAOS_SEED`,
//! `FEDWARD_CHAOS_REPORT` for its figures as JSON, `FEDWARD_CHAOS_DIR` to keep the run).

mod harness;

#[test]
fn a_short_chaos_run_loses_nothing_and_counts_nothing_twice() {
    let settings = harness::Settings::from_env(harness::Settings { seed: 1, rounds: 8, kills: 8, ..harness::Settings::default() });
    let report = harness::run(&settings).unwrap_or_else(|e| panic!("chaos run (seed {}): {e:#}", settings.seed));
    println!("{}", report.summary());
    if let Some(path) = &settings.report {
        std::fs::write(path, serde_json::to_string_pretty(&report.json()).unwrap() + "\n").unwrap();
    }
    let broken = report.broken();
    assert!(broken.is_empty(), "seed {}: {}\nrun kept in {}", settings.seed, broken.join("\n"), report.dir.display());
}
