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
#                               interleaved with fedward, and the ratio (bench-out/round.json).
#                               --aggregation plain|secure|both: secure aggregation, or both
#                               interleaved (plain, secure, plain, ...) with the ratio secure/plain
#                               of round time, bytes at the coordinator and CPU; --sites 3,10,50
#                               runs each size in turn; --profile dev builds the dev profile with
#                               the workspace crates at opt-level 3 instead of a release build.
#                               Issue 23's figures: scripts/bench.sh round --params body:1
#                               --sites 3,10,50 --rounds 4 --repeat 2 --aggregation both --profile dev;
#                               --train-secs S makes each agent wait S seconds where it would
#                               train (a stand-in for local training on the site's own machine)
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
    params=22.7M sites=8 rounds=5 repeat=2 baseline= aggregation=plain profile=release
    shift
    while [ $# -gt 0 ]; do
      case "$1" in
        --params) params=$2 ;;
        --sites) sites=$2 ;;
        --rounds) rounds=$2 ;;
        --repeat) repeat=$2 ;;
        --baseline) baseline=$2 ;;
        --aggregation) aggregation=$2 ;;
        --profile) profile=$2 ;;
        --train-secs) export FEDWARD_BENCH_TRAIN_SECS=$2 ;;
        *) echo "usage: scripts/bench.sh round [--params P] [--sites C[,C...]] [--rounds R] [--repeat N] [--baseline flower]" \
             "[--aggregation plain|secure|both] [--profile release|dev] [--train-secs S]" >&2; exit 2 ;;
      esac
      shift 2
    done
    case "$aggregation" in
      plain|secure) aggs=("$aggregation") ;;
      both) aggs=(plain secure) ;;
      *) echo "unknown aggregation: $aggregation (plain, secure, both)" >&2; exit 2 ;;
    esac
    target="${CARGO_TARGET_DIR:-target}"
    case "$profile" in
      release)
        cargo build --release --locked -p fedward-agent --example bench_agent
        bench=(cargo bench --locked -q -p fedward-coordinator --bench round)
        agent_bin="$target/release/examples/bench_agent"
        ;;
      dev)
        # The dev profile with the workspace's crates at opt-level 3 too (its dependencies
        # already are): no second build of every dependency, which a release build is.
        export CARGO_PROFILE_DEV_OPT_LEVEL=3
        cargo build --locked -p fedward-agent --example bench_agent
        bench=(cargo bench --profile dev --locked -q -p fedward-coordinator --bench round)
        agent_bin="$target/debug/examples/bench_agent"
        ;;
      *) echo "unknown profile: $profile (release, dev)" >&2; exit 2 ;;
    esac
    "${bench[@]}" --no-run
    agent_bin="$(cd "$(dirname "$agent_bin")" && pwd)/$(basename "$agent_bin")"
    if [ "$baseline" = flower ]; then
      venv="$out/flower-venv"
      if [ ! -x "$venv/bin/flower-superlink" ]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q -r scripts/bench-round/requirements.txt
      fi
    elif [ -n "$baseline" ]; then
      echo "unknown baseline: $baseline (flower)" >&2; exit 2
    fi
    for n in ${sites//,/ }; do
      tag="round-${params//:/}-${n}sites"
      rm -f "$out/$tag"-*.json
      runs=()
      # Interleaved, so that every configuration sees the same machine: fedward plain,
      # fedward secure, Flower, then again.
      for i in $(seq 1 "$repeat"); do
        for agg in "${aggs[@]}"; do
          "${bench[@]}" -- --agent-bin "$agent_bin" --params "$params" --sites "$n" --rounds "$rounds" \
            --aggregation "$agg" --out "$out/$tag-fedward-$agg-$i.json" --layout "$out/$tag-layout.json"
          runs+=("$out/$tag-fedward-$agg-$i.json")
        done
        if [ "$baseline" = flower ]; then
          "$venv/bin/python" scripts/bench-round/run_flower.py --layout "$out/$tag-layout.json" --sites "$n" \
            --rounds "$rounds" --out "$out/$tag-flower-$i.json" --work "$out/flower-work"
          runs+=("$out/$tag-flower-$i.json")
        fi
      done
      python3 scripts/bench-round/report.py --out "$out/$tag.json" "${runs[@]}"
      cp "$out/$tag.json" "$out/round.json"
    done
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
