#!/usr/bin/env bash
# Benchmarks (not tests): release builds (cargo's bench profile), figures printed and
# written to bench-out/. Each bench lives beside what it measures (a crate's benches/).
#   scripts/bench.sh transfer   one 22.7M-parameter update over QUIC+mTLS vs raw TCP
#                               (coordinator/benches/transfer.rs; runs the real coordinator)
#   scripts/bench.sh scale      one round of 2, 8, 32 and 100 sites with a 22.7M-parameter
#                               model: the coordinator's peak memory against the model's
#                               bytes (coordinator/benches/scale.rs; --sites 8,100 to choose)
#   scripts/bench.sh fold       FedAvg's check+fold of one 22.7M-parameter update vs a memcpy
#                               of the same bytes in the same run (coordinator/benches/fold.rs)
#   scripts/bench.sh train      MiniLM training/inference samples/s (models/benches/train.rs;
#                               needs scripts/fetch-models.sh)
#   scripts/bench.sh allocate   the allocation engine: one epoch of 200 requests x 500 units,
#                               exact vs greedy (agent/examples/allocate_bench.rs). An example
#                               built with the dev profile, the engine compiled into it at
#                               opt-level 3: a release build of the agent's dependencies
#                               (candle, quinn) would take longer than everything it measures
#   scripts/bench.sh triage     POST /v1/requests of the triage service, one at a time, beside
#                               predict on the same notes (agent/benches/triage.rs; needs
#                               scripts/fetch-models.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench-out
out="$PWD/bench-out"
case "${1:-transfer}" in
  transfer)
    cargo bench --locked -p fedward-coordinator --bench transfer -- --out "$out/transfer.json"
    ;;
  scale)
    cargo bench --locked -p fedward-coordinator --bench scale -- --out "$out/scale.json" "${@:2}"
    ;;
  fold)
    cargo bench --locked -p fedward-coordinator --bench fold -- --out "$out/fold.json" "${@:2}"
    ;;
  train)
    scripts/fetch-models.sh
    cargo bench --locked -p fedward-models --bench train -- --out "$out/train.json"
    ;;
  allocate)
    cargo rustc --locked -p fedward-agent --example allocate_bench -- \
      -C opt-level=3 -C debug-assertions=off -C overflow-checks=off
    "${CARGO_TARGET_DIR:-target}/debug/examples/allocate_bench" --out "$out/allocate.json" "${@:2}"
    ;;
  triage)
    scripts/fetch-models.sh
    cargo bench --locked -p fedward-agent --bench triage -- --out "$out/triage.json"
    ;;
  *)
    echo "usage: scripts/bench.sh transfer|scale|fold|train|allocate|triage" >&2; exit 2 ;;
esac
