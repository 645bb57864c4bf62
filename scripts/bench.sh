#!/usr/bin/env bash
# Benchmarks (not tests): release builds, figures printed and written to bench-out/.
#   scripts/bench.sh transfer   one 22.7M-parameter update over QUIC+mTLS vs raw TCP
#   scripts/bench.sh train      MiniLM training/inference samples/s (needs scripts/fetch-models.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench-out
case "${1:-transfer}" in
  transfer)
    cargo build --release --locked -p fedward-coordinator -p fedward-tests --bin fedward-coordinator --bin bench_transfer
    ./target/release/bench_transfer --out bench-out/transfer.json
    ;;
  train)
    scripts/fetch-models.sh
    cargo build --release --locked -p fedward-models --example bench_train
    ./target/release/examples/bench_train --out bench-out/train.json
    ;;
  *)
    echo "usage: scripts/bench.sh transfer|train" >&2; exit 2 ;;
esac
