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
#   scripts/bench.sh round      whole rounds with no training: the real coordinator process and
#                               C real agent processes (agent/examples/bench_agent.rs: the daemon
#                               with a trainer that returns a constant delta), per-round time
#                               from offer to sealed checkpoint, CPU-seconds and peak RSS of each
#                               side (coordinator/benches/round.rs). Options: --params 22.7M
#                               --sites 8 --rounds 5 --repeat 2, and --baseline flower: Flower's
#                               deployment engine (pinned in scripts/bench-round/requirements.txt,
#                               installed into bench-out/flower-venv) over the same tensor layout,
#                               interleaved with fedward, and the ratio (bench-out/round.json)
#   scripts/bench.sh triage     POST /v1/requests of the triage service, one at a time, beside
#                               predict on the same notes (agent/benches/triage.rs; needs
#                               scripts/fetch-models.sh)
#   scripts/bench.sh onnx       predict samples/s on CPU against ONNX Runtime on the same exported
#                               model and notes, same threads, interleaved (scripts/bench-onnx/:
#                               the ONNX graph built from the exported weights, checked against
#                               predict's probabilities; onnxruntime pinned in its requirements.txt,
#                               installed into bench-out/onnx-venv). Options: --notes 1000
#                               --threads 2 --rounds 2 (bench-out/onnx.json; needs
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
  round)
    params=22.7M sites=8 rounds=5 repeat=2 baseline=
    shift
    while [ $# -gt 0 ]; do
      case "$1" in
        --params) params=$2 ;;
        --sites) sites=$2 ;;
        --rounds) rounds=$2 ;;
        --repeat) repeat=$2 ;;
        --baseline) baseline=$2 ;;
        *) echo "usage: scripts/bench.sh round [--params P] [--sites C] [--rounds R] [--repeat N] [--baseline flower]" >&2; exit 2 ;;
      esac
      shift 2
    done
    cargo build --release --locked -p fedward-agent --example bench_agent
    cargo bench --locked -p fedward-coordinator --bench round --no-run
    target="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
    if [ "$baseline" = flower ]; then
      venv="$out/flower-venv"
      if [ ! -x "$venv/bin/flower-superlink" ]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q -r scripts/bench-round/requirements.txt
      fi
    elif [ -n "$baseline" ]; then
      echo "unknown baseline: $baseline (flower)" >&2; exit 2
    fi
    tag="round-$params-${sites}sites"
    rm -f "$out/$tag"-*.json
    runs=()
    # Interleaved, so that both systems see the same machine: fedward, Flower, fedward, ...
    for i in $(seq 1 "$repeat"); do
      cargo bench --locked -q -p fedward-coordinator --bench round -- --agent-bin "$target/release/examples/bench_agent" \
        --params "$params" --sites "$sites" --rounds "$rounds" --out "$out/$tag-fedward-$i.json" --layout "$out/$tag-layout.json"
      runs+=("$out/$tag-fedward-$i.json")
      if [ "$baseline" = flower ]; then
        "$venv/bin/python" scripts/bench-round/run_flower.py --layout "$out/$tag-layout.json" --sites "$sites" \
          --rounds "$rounds" --out "$out/$tag-flower-$i.json" --work "$out/flower-work"
        runs+=("$out/$tag-flower-$i.json")
      fi
    done
    python3 scripts/bench-round/report.py --out "$out/$tag.json" "${runs[@]}"
    cp "$out/$tag.json" "$out/round.json"
    ;;
  triage)
    scripts/fetch-models.sh
    cargo bench --locked -p fedward-agent --bench triage -- --out "$out/triage.json"
    ;;
  onnx)
    scripts/fetch-models.sh
    cargo build --release --locked -p fedward-agent
    venv="$out/onnx-venv"
    if [ ! -x "$venv/bin/python" ] || ! cmp -s scripts/bench-onnx/requirements.txt "$venv/requirements.txt"; then
      rm -rf "$venv"
      python3 -m venv "$venv"
      "$venv/bin/pip" install -q --disable-pip-version-check -r scripts/bench-onnx/requirements.txt
      cp scripts/bench-onnx/requirements.txt "$venv/requirements.txt"
    fi
    "$venv/bin/python" scripts/bench-onnx/bench.py run --agent "${CARGO_TARGET_DIR:-target}/release/fedward-agent" \
      --base models-data/all-MiniLM-L6-v2 --work "$out/onnx-work" --out "$out/onnx.json" "${@:2}"
    ;;
  *)
    echo "usage: scripts/bench.sh transfer|scale|fold|train|allocate|round|triage|onnx" >&2; exit 2 ;;
esac
