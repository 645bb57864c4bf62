#!/usr/bin/env bash
# Formatting and lints, as a reviewer runs them before merging: rustfmt (rustfmt.toml) and
# clippy on every target with warnings as errors. Needs the rustfmt and clippy components.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
