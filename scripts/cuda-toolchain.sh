#!/usr/bin/env bash
# The CUDA 13.0 build toolchain for `--features cuda`, on a machine without a GPU or a system CUDA
# toolkit, from PyPI wheels only (the verified recipe of ../shared/gpu/README.md, kept here so the
# project builds on its own). Installs into PREFIX (default .cuda/toolchain, git-ignored):
#   nvcc, nvvm, crt, cudart and cccl 13.0 wheels (~105 MB download), and link-time stub libraries
#   for libcuda / libcublas / libcublasLt / libcurand / libnvrtc with the real sonames (candle makes
#   cudarc link them dynamically; the real libraries are found on the GPU machine at run time),
# and writes PREFIX/env.sh (CUDA_HOME, PATH, CUDA_COMPUTE_CAP=90, CUDARC_CUDA_VERSION=13000).
# Idempotent: an existing toolchain of the right version is kept.
#
# usage: scripts/cuda-toolchain.sh [PREFIX]     then: source PREFIX/env.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${1:-$here/.cuda/toolchain}
PY=${PYTHON:-python3}
# nvcc must stay at 13.0.x: the GPU machine's driver (580, CUDA 13.0) cannot JIT newer PTX.
NVCC_VERSION=13.0.88
PKGS="nvidia-cuda-nvcc==$NVCC_VERSION nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85"
R="$PREFIX/site/nvidia/cu13"
if [ -f "$PREFIX/env.sh" ] && [ -f "$PREFIX/.version" ] && [ "$(cat "$PREFIX/.version")" = "$PKGS" ] &&
   [ -x "$R/bin/nvcc" ] && [ -f "$R/lib/stubs/libcuda.so" ]; then
  echo "cuda toolchain: $PREFIX (present, nvcc $NVCC_VERSION)"
  exit 0
fi
for tool in gcc "$PY"; do command -v "$tool" >/dev/null || { echo "cuda toolchain: $tool is required" >&2; exit 1; }; done
echo "cuda toolchain: installing CUDA 13.0 compiler wheels from PyPI into $PREFIX ..."
mkdir -p "$PREFIX"
"$PY" -m pip install -q --no-deps --only-binary=:all: --upgrade --target "$PREFIX/site" $PKGS
mkdir -p "$R/lib/stubs"
ln -sfn lib "$R/lib64"                       # cudaforge derives CUDA_ROOT/lib64
ln -sf libcudart.so.13 "$R/lib/libcudart.so" # candle-kernels links -lcudart
# Stubs export every function name cudarc declares; cudarc's sources come from the cargo registry.
(cd "$here" && cargo fetch --quiet)
CUDARC_SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | sort -V | tail -1)
[ -n "$CUDARC_SRC" ] || { echo "cuda toolchain: cudarc sources not found after cargo fetch" >&2; exit 1; }
mkstub() { # name soname rs-file
  grep -oP '^\s*fn \K\w+(?=\()' "$3" | sort -u | awk '{print "void " $1 "(void){}"}' > "$R/lib/stubs/$1.c"
  gcc -shared -fPIC -o "$R/lib/stubs/lib$1.so" -Wl,-soname,"$2" "$R/lib/stubs/$1.c"
}
mkstub cuda     libcuda.so.1      "$CUDARC_SRC/src/driver/sys/mod.rs"
mkstub cublas   libcublas.so.13   "$CUDARC_SRC/src/cublas/sys/mod.rs"
mkstub cublasLt libcublasLt.so.13 "$CUDARC_SRC/src/cublaslt/sys/mod.rs"
mkstub curand   libcurand.so.10   "$CUDARC_SRC/src/curand/sys/mod.rs"
mkstub nvrtc    libnvrtc.so.13    "$CUDARC_SRC/src/nvrtc/sys/mod.rs"
cat > "$PREFIX/env.sh" <<ENV
export CUDA_HOME=$R
export PATH=$R/bin:\$PATH
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
ENV
echo "$PKGS" > "$PREFIX/.version"
"$R/bin/nvcc" --version | tail -1
echo "cuda toolchain: ok (source $PREFIX/env.sh)"
