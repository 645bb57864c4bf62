#!/usr/bin/env bash
# The GPU check (a check to run by hand on a machine with a CUDA device, not a test): builds
# the classifier with `--features cuda` and runs models/examples/gpu_check.rs, which trains
# a few steps on cuda:0 and on the CPU from the same weights, batches and dropout masks,
# prints each step's loss on both and the max abs difference of the logits on a fixed batch
# (before and after training), checks them against its tolerances (loss 1e-3 relative,
# logits 1e-3 absolute before training and 1e-2 after), then times one epoch of the demo's
# site (1,750 notes, body:1, batch 32, seq 128) on both and prints samples/s and the ratio.
#
#   scripts/gpu-check.sh                 build, then run (arguments after -- go to the check)
#   scripts/gpu-check.sh --build-only    build only: what a machine without a GPU can do
#   scripts/gpu-check.sh --run-only      run the binary built before (on the GPU machine)
#   scripts/gpu-check.sh -- --steps 10 --tf32
#
# Exit status: the check's (0 passed, 1 a difference over its tolerance or an error, 2 no
# CUDA device), or the build's. Output is also written to bench-out/gpu-check.txt and
# bench-out/gpu-check.json.
#
# The build needs scripts/cuda-toolkit.sh (nvcc and CUDA 13.0's headers and libraries from
# PyPI into a throwaway directory; kernels compiled for CUDA_COMPUTE_CAP, default 90 = H100)
# and uses its own target directory (CARGO_TARGET_DIR, default target/cuda): the cuda
# feature rebuilds candle, which would otherwise invalidate the CPU build. Running needs an
# NVIDIA driver R580 or later (CUDA 13) and the libraries cuBLAS/cuBLASLt 13, cuRAND 10 and
# NVRTC 13, from the toolkit directory when it is on this machine, else the system's.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=all
case "${1:-}" in
  --build-only) mode=build; shift ;;
  --run-only) mode=run; shift ;;
esac
[ "${1:-}" = "--" ] && shift

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}
bin="$CARGO_TARGET_DIR/release/examples/gpu_check"
mkdir -p bench-out

if [ "$mode" != run ]; then
  scripts/fetch-models.sh || echo "gpu-check: no MiniLM weights (fetch failed): the check will use the tiny test model" >&2
  eval "$(scripts/cuda-toolkit.sh)"
  echo "building the GPU check (release, --features cuda, sm_$CUDA_COMPUTE_CAP) into $CARGO_TARGET_DIR..." >&2
  start=$(date +%s)
  cargo build --locked --release --features cuda -p fedward-models --example gpu_check
  echo "built in $(($(date +%s) - start)) s: $bin" >&2
  [ "$mode" = build ] && exit 0
fi

[ -x "$bin" ] || { echo "gpu-check: $bin is not built (run scripts/gpu-check.sh --build-only first)" >&2; exit 1; }
# The toolkit's libraries when they are here (never its link-time libcuda stub: the driver's
# libcuda.so.1 must come from the system).
if [ -z "${CUDA_ROOT:-}" ]; then
  root="${FEDWARD_CUDA_DIR:-${TMPDIR:-/tmp}/fedward-cuda-13.0}/site/nvidia/cu13"
  [ -d "$root/lib" ] && export LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /' || true
else
  echo "gpu: nvidia-smi not found" >&2
fi
missing=$(ldd "$bin" | awk '/not found/ {print $1}' | tr '\n' ' ')
if [ -n "$missing" ]; then
  echo "gpu-check: FAILED: libraries not found: $missing(a GPU machine needs its NVIDIA driver, R580+, for libcuda.so.1, and CUDA 13's cuBLAS, cuRAND and NVRTC: scripts/cuda-toolkit.sh installs those)" >&2
  exit 2
fi
set +e
"$bin" --out bench-out/gpu-check.json "$@" 2>&1 | tee bench-out/gpu-check.txt
status=${PIPESTATUS[0]}
set -e
exit "$status"
