#!/usr/bin/env bash
# Installs what `cargo build --features cuda` needs (nvcc, the CUDA headers, cudart, cuBLAS,
# cuRAND, NVRTC) from PyPI into a throwaway directory, never system-wide and never at run
# time, and prints the environment to build with:
#
#   eval "$(scripts/cuda-toolkit.sh)"
#   cargo build --release --features cuda -p fedward-agent
#
# Progress goes to stderr, only `export` lines to stdout. Idempotent: a second run checks
# the layout and prints the same lines. Settings (environment):
#   FEDWARD_CUDA_DIR   where to install (default ${TMPDIR:-/tmp}/fedward-cuda-13.0; about 1.2 GB)
#   CUDA_COMPUTE_CAP   the GPU architecture to compile candle's kernels for (default 90, an
#                      H100; 80 for an A100, 89 for an L4/L40S). It must be given: without a
#                      GPU the build cannot ask one, and candle-kernels' build script fails.
#
# Why CUDA 13.0 from PyPI: the `nvidia-cuda-nvcc-cu12` wheels (12.0-12.9) ship only ptxas
# and libnvvm, not nvcc; the CUDA 13 wheels (`nvidia-cuda-nvcc` and siblings) ship nvcc,
# cicc and the headers and unpack as one CUDA root (nvidia/cu13/{bin,include,lib,nvvm}).
# 13.0 is the oldest 13.x: candle loads its kernels as PTX, which a driver can JIT only if
# it is at least as new as the nvcc that wrote it, so the oldest 13.x needs the least new
# driver (R580 or later). cudarc 0.19 (candle 0.11's) knows CUDA up to 13.4.
#
# The PyPI wheels hold no libcuda.so (the driver library comes with the GPU's driver), so
# for linking only this script builds a stub libcuda.so (soname libcuda.so.1) exporting the
# driver functions cudarc declares; the binary then loads the real driver at run time.
# At run time the binary also needs libcublas.so.13, libcublasLt.so.13, libcurand.so.10 and
# libnvrtc.so.13: from this directory (LD_LIBRARY_PATH, printed below) or the GPU machine's.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${FEDWARD_CUDA_DIR:-${TMPDIR:-/tmp}/fedward-cuda-13.0}
cap=${CUDA_COMPUTE_CAP:-90}
root="$dir/site/nvidia/cu13"

# Pinned wheels and their sha256 (pip checks them: --require-hashes).
requirements() {
  cat <<'EOF'
nvidia-cuda-nvcc==13.0.88 --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-cuda-crt==13.0.88 --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-nvvm==13.0.88 --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
nvidia-cuda-nvrtc==13.0.88 --hash=sha256:ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
nvidia-cublas==13.0.2.14 --hash=sha256:0cf238ffdbe46c00cb9aa98e7bca745c223a5ca5a53e686ac8b3e5a08fe80d6c
nvidia-curand==10.4.0.35 --hash=sha256:1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc
EOF
}

installed() {
  [ -x "$root/bin/nvcc" ] && [ -x "$root/nvvm/bin/cicc" ] && [ -f "$root/include/cuda.h" ] &&
    [ -f "$root/include/cublas_v2.h" ] && [ -f "$root/include/curand.h" ] && [ -f "$root/include/nvrtc.h" ] &&
    [ -f "$root/lib/libcublas.so.13" ] && [ -f "$root/lib/libcurand.so.10" ] && [ -f "$root/lib/libnvrtc.so.13" ] &&
    [ -f "$root/lib/libcudart.so.13" ] && [ -f "$dir/.installed" ] && cmp -s "$dir/.installed" <(requirements)
}

if installed; then
  echo "CUDA 13.0 toolkit present: $root" >&2
else
  echo "installing the CUDA 13.0 toolkit from PyPI into $dir (about 650 MB of wheels)..." >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  requirements >"$dir/requirements.txt"
  python3 -m pip install --no-deps --require-hashes --disable-pip-version-check --quiet \
    --target "$dir/site" -r "$dir/requirements.txt" >&2
  requirements >"$dir/.installed"
fi

# The layout build scripts expect of a CUDA root: lib64 beside lib (cudaforge), unversioned
# library names for the linker (cudarc and candle-kernels link -lcublas, -lcudart, ...).
ln -sfn lib "$root/lib64"
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  ln -sfn "$lib" "$root/lib/${lib%.so.*}.so"
done

# The driver stub, for linking only: one function per driver entry point cudarc declares
# (read from the cudarc source this workspace locks), each returning CUDA_ERROR_NO_DEVICE
# (100). Never on LD_LIBRARY_PATH in use; put first, it makes a machine without a GPU look
# like one whose driver finds no device (how the check's no-device path was tried here).
stub="$root/lib/stubs/libcuda.so"
if ! grep -qs 'return 100' "$root/lib/stubs/libcuda-stub.c"; then
  cudarc=$(cargo metadata --locked --format-version 1 --features fedward-models/cuda |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
  src="$(dirname "$cudarc")/src/driver/sys/mod.rs"
  mkdir -p "$root/lib/stubs"
  grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$src" | awk '{print $4}' | sort -u |
    awk '{print "int " $1 "(void) { return 100; }"}' >"$root/lib/stubs/libcuda-stub.c"
  [ -s "$root/lib/stubs/libcuda-stub.c" ] || { echo "no driver functions found in $src" >&2; exit 1; }
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$root/lib/stubs/libcuda-stub.c"
  echo "built the link-time driver stub $stub ($(wc -l <"$root/lib/stubs/libcuda-stub.c") functions)" >&2
fi

"$root/bin/nvcc" --version | tail -2 >&2
echo "compute capability for the kernels: $cap (set CUDA_COMPUTE_CAP to change)" >&2

cat <<EOF
export CUDA_ROOT='$root'
export CUDA_HOME='$root'
export CUDA_PATH='$root'
export NVCC='$root/bin/nvcc'
export PATH='$root/bin':"\$PATH"
export CUDA_COMPUTE_CAP='$cap'
export CUDARC_CUDA_VERSION=13000
export LD_LIBRARY_PATH='$root/lib'"\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
