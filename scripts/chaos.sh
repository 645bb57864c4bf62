#!/usr/bin/env bash
# The long chaos run (issue 18): the real coordinator and agent binaries, built with their
# crash points, under record-level DP on 127.0.0.1, killed with SIGKILL at chosen points and
# at random moments, their state and ledger files lost or cut, restarted, and checked at the
# end (every round completed exactly once, the final model is what the accepted updates
# imply, every ledger verifies and reconciles, nothing counted twice, no budget exceeded).
# The README's test command runs a short one; this runs as many kills as you ask for.
#
#   scripts/chaos.sh [--kills N] [--rounds R] [--seed S] [--sites C] [--out DIR]
#
# Figures go to DIR/report.json (and the summary line to stdout); the run's files and logs
# (logs/chaos.log tells what was done when) stay in DIR/run.
set -euo pipefail
cd "$(dirname "$0")/.."

kills=60 rounds=100 seed=7 sites=3 out=target/chaos
while [ $# -gt 0 ]; do
    case "$1" in
        --kills) kills=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --sites) sites=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

rm -rf "$out/run"
mkdir -p "$out"
# The workspace test build is the one whose binaries carry the crash points (tests/Cargo.toml
# turns on their `failpoints` feature), so build exactly what scripts/test.sh builds.
cargo test --workspace --locked --no-run
FEDWARD_CHAOS_KILLS=$kills FEDWARD_CHAOS_ROUNDS=$rounds FEDWARD_CHAOS_SEED=$seed FEDWARD_CHAOS_SITES=$sites \
FEDWARD_CHAOS_DIR="$out/run" FEDWARD_CHAOS_REPORT="$out/report.json" \
    cargo test --locked -p fedward-tests --test chaos -- --nocapture --test-threads 1
echo "figures: $out/report.json; the run: $out/run (logs/chaos.log)"
