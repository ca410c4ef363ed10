#!/usr/bin/env bash
# The CUDA 13.0 libraries that `prompt-radar --features cuda` links, from PyPI wheels, for a GPU
# node (or the CUDA image, see Dockerfile) that has the NVIDIA driver but no CUDA toolkit:
#   libcublas.so.13, libcublasLt.so.13, libcurand.so.10 (the binary's NEEDED entries besides the
#   driver's libcuda.so.1, which comes with the driver, not from here) and libcudart.so.13
#   (~480 MB download, ~700 MB installed; cuBLASLt is most of it).
# The versions are CUDA 13.0's, which run on driver 580 or newer.
# Installs into PREFIX (default .cuda/runtime, git-ignored) and writes PREFIX/env.sh, which puts
# the libraries on LD_LIBRARY_PATH. Idempotent: an existing install of the same versions is kept.
#
# usage: scripts/cuda-runtime.sh [PREFIX]     then: source PREFIX/env.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${1:-$here/.cuda/runtime}
PY=${PYTHON:-python3}
PKGS="nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-runtime==13.0.96"
LIB="$PREFIX/site/nvidia/cu13/lib"
SONAMES="libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13"
present() { for so in $SONAMES; do [ -f "$LIB/$so" ] || return 1; done; }
if [ -f "$PREFIX/.version" ] && [ "$(cat "$PREFIX/.version")" = "$PKGS" ] && present; then
  echo "cuda runtime: $LIB (present)"
  exit 0
fi
command -v "$PY" >/dev/null || { echo "cuda runtime: $PY is required" >&2; exit 1; }
echo "cuda runtime: installing CUDA 13.0 libraries from PyPI into $PREFIX ..."
mkdir -p "$PREFIX"
"$PY" -m pip install -q --no-deps --only-binary=:all: --upgrade --target "$PREFIX/site" $PKGS
present || { echo "cuda runtime: a library is missing from $LIB after the install" >&2; exit 1; }
# Not loaded by anything here: a BLAS shim for C programs, static libraries.
rm -f "$LIB"/libnvblas.so.* "$LIB"/*.a
cat > "$PREFIX/env.sh" <<ENV
export LD_LIBRARY_PATH=$LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
ENV
echo "$PKGS" > "$PREFIX/.version"
echo "cuda runtime: ok ($LIB; source $PREFIX/env.sh)"
