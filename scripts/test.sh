#!/usr/bin/env bash
# The README's test command: builds the workspace once and runs every test.
# Needs only the Rust toolchain; tests use a tiny random BERT and loopback networking.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"
