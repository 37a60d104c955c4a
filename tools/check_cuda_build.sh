#!/usr/bin/env bash
# CI check that the CUDA sources still compile (no GPU needed): configures a throwaway build
# dir with ATTNKIT_CUDA=ON for ONE architecture and builds only the attnkit._cuda target
# (kernels + binding). Exits non-zero on any compile or link error. Also reports ptxas
# register spills (a performance regression, not an error). About 1.5 minutes on 2 cores.
#
#   tools/check_cuda_build.sh            # sm_90
#   CUDA_ARCH=80 JOBS=4 tools/check_cuda_build.sh
# Needs nvcc (PATH, CUDA_HOME or /usr/local/cuda), cmake, and pybind11 importable by $PYTHON
# (pip install pybind11 cmake ninja).
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${CUDA_ARCH:-90}
JOBS=${JOBS:-2}
PY=${PYTHON:-python3}
BUILD=${BUILD_DIR:-build/check-cuda-sm$ARCH}

NVCC=${CUDACXX:-$(command -v nvcc || true)}
for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if [ -z "$NVCC" ] && [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then NVCC=$d/bin/nvcc; fi
done
if [ -z "$NVCC" ]; then
  echo "check_cuda_build: nvcc not found (set CUDACXX or CUDA_HOME)" >&2
  exit 2
fi
if ! PYBIND11_DIR=$($PY -m pybind11 --cmakedir 2>/dev/null); then
  echo "check_cuda_build: pybind11 is not importable by $PY (pip install pybind11)" >&2
  exit 2
fi
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi

rm -rf "$BUILD"
start=$(date +%s)
cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DATTNKIT_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DCMAKE_CUDA_COMPILER="$NVCC" -DATTNKIT_CUDA_VERBOSE_PTXAS=ON \
  -Dpybind11_DIR="$PYBIND11_DIR" -DPython_EXECUTABLE="$(command -v "$PY")" > "$BUILD.configure.log" 2>&1 || {
  cat "$BUILD.configure.log" >&2
  echo "check_cuda_build: configure failed" >&2
  exit 1
}
if ! cmake --build "$BUILD" --target _cuda -j "$JOBS" > "$BUILD.build.log" 2>&1; then
  grep -E "error|Error|FAILED" -A3 "$BUILD.build.log" | head -80 >&2
  echo "check_cuda_build: the CUDA build FAILED (full log: $BUILD.build.log)" >&2
  exit 1
fi
spills=$(grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$BUILD.build.log" | sort | uniq -c || true)
if [ -n "$spills" ]; then
  echo "check_cuda_build: warning: ptxas reports register spills on sm_$ARCH:"
  echo "$spills"
fi
grep -h "attnkit: .*CUTLASS" "$BUILD.configure.log" || true  # whether gemm_sm90.cu was built
echo "check_cuda_build: OK (sm_$ARCH, $(( $(date +%s) - start )) s): $(ls "$BUILD"/csrc/cuda/_cuda*.so)"
rm -rf "$BUILD" "$BUILD.configure.log" "$BUILD.build.log"
