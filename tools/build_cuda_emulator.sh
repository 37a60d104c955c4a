#!/usr/bin/env bash
# Builds attnkit's CUDA kernels and binding for the CPU emulator (csrc/cuda/emulate/): the
# module `_cuda_emu`, which runs the real kernel sources on the host with numpy buffers as
# "device" memory. Needs only a C++17 compiler, pybind11 and the CUDA headers (nvcc's
# include/ dir; no GPU, no driver). tests/test_cuda_emulated.py uses it.
#
#   tools/build_cuda_emulator.sh [OUT_DIR]      (default build/cuda-emu; JOBS=2 parallel)
# Prints the module path. Incremental: objects newer than their sources are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/cuda-emu}
JOBS=${JOBS:-2}
PY=${PYTHON:-python3}
CXX=${CXX:-g++}
CUDA_INC=${CUDA_INC:-}
if [ -z "$CUDA_INC" ]; then
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [ -n "$d" ] && [ -f "$d/include/cuda_fp16.h" ]; then CUDA_INC=$d/include; break; fi
  done
fi
if [ -z "$CUDA_INC" ] || [ ! -f "$CUDA_INC/cuda_fp16.h" ]; then
  echo "build_cuda_emulator: CUDA headers not found (set CUDA_INC)" >&2
  exit 2
fi
mkdir -p "$OUT/obj"
if ! PYINC=$($PY -m pybind11 --includes 2>/dev/null); then
  echo "build_cuda_emulator: pybind11 is not importable by $PY (pip install pybind11)" >&2
  exit 2
fi
EXT=$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
# -O1: the emulator spends its time in fiber switches, not in the kernels' arithmetic.
FLAGS="-std=c++17 -O1 -g0 -fPIC -U_FORTIFY_SOURCE -fvisibility=hidden -DATTNKIT_CUDA_EMULATE=1 \
  -DATTNKIT_HAVE_SM90_ATTENTION=1 -DATTNKIT_CUDA_MODULE_NAME=_cuda_emu -DATTNKIT_CUDA_ARCHS=\"emulated\" \
  -include csrc/cuda/emulate/emulate.h -Icsrc/include -Icsrc -I$CUDA_INC $PYINC \
  -Wno-attributes -Wno-unknown-pragmas"
SRCS="csrc/cuda/emulate/emulate.cpp csrc/cuda/emulate/emu_runtime.cpp csrc/cuda/module.cpp
  csrc/cuda/binding_util.cpp csrc/cuda/attention_binding.cpp csrc/bindings/tensor.cpp
  csrc/bindings/params_from.cpp
  csrc/cuda/softmax.cu csrc/cuda/gemm.cu csrc/cuda/attention_simt.cu csrc/cuda/attention_launch.cu
  csrc/cuda/attention_bwd.cu csrc/cuda/attention_hopper.cu csrc/cuda/attention_hopper_d64.cu
  csrc/cuda/attention_hopper_d96.cu csrc/cuda/attention_hopper_d128.cu csrc/cuda/attention_hopper_d192.cu
  csrc/cuda/attention_hopper_d256.cu
  csrc/cuda/attention_fwd_d64.cu csrc/cuda/attention_fwd_d96.cu csrc/cuda/attention_fwd_d128.cu
  csrc/cuda/attention_fwd_d192.cu csrc/cuda/attention_fwd_d256.cu"
HEADERS=$(ls csrc/cuda/*.h csrc/cuda/*.cuh csrc/cuda/emulate/*.h csrc/include/attnkit/*.h csrc/bindings/tensor.h)
newest_header=$(ls -t $HEADERS | head -1)
export FLAGS CXX OUT newest_header
build_one() {
  src=$1
  obj="$OUT/obj/$(echo "$src" | tr '/.' '__').o"
  if [ -f "$obj" ] && [ "$obj" -nt "$src" ] && [ "$obj" -nt "$newest_header" ]; then exit 0; fi
  $CXX $FLAGS -x c++ -c "$src" -o "$obj"
}
export -f build_one
echo $SRCS | tr ' ' '\n' | grep . | xargs -P "$JOBS" -I{} bash -c 'build_one {}'
$CXX -shared -o "$OUT/_cuda_emu$EXT" "$OUT"/obj/*.o
echo "$OUT/_cuda_emu$EXT"
