#!/usr/bin/env bash
# On a GPU host: build attnkit with CUDA, run the GPU tests, the host CPU's amx variant (tests
# and bf16 matmul / attention / backward rows, when the CPU has AMX), then the GPU benchmark
# against torch, printing the benchmark table last. Typically 6-8 minutes on an H100/H200 host
# with 16 cores; the stage limits below add up to 20 minutes at most. Offline: uses the Python,
# torch, CMake, ninja, pybind11, scikit-build-core and nvcc already installed (pip is told
# --no-index --no-deps --no-build-isolation).
#
#   bench/gpu_check.sh                    # sm_90 (H100/H200); CUDA_ARCHS="80;90" to change
# Stage time limits: build 300 s, Hopper kernel tests 120 s and two sanitizer runs of 90 s (on
# an sm_90 GPU), GPU tests 200 s, amx tests 90 s, amx bench 120 s, GPU benchmark 200 s (each
# stage is cut, reported and the script goes on, so one slow stage still leaves the others'
# results).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARCHS=${CUDA_ARCHS:-90}
JOBS=${JOBS:-$(nproc)}
status=0
t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }

stamp "python: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

mkdir -p build
# The CUTLASS headers for gemm_sm90.cu: $CUTLASS_INCLUDE, else a copy carried to build/cutlass-include
# (a host without network cannot pip install nvidia-cutlass), else the Python package (CMake).
CUTLASS_DEF=()
CUTLASS_INCLUDE=${CUTLASS_INCLUDE:-}
if [ -z "$CUTLASS_INCLUDE" ] && [ -f build/cutlass-include/cutlass/cutlass.h ]; then CUTLASS_INCLUDE=$PWD/build/cutlass-include; fi
if [ -n "$CUTLASS_INCLUDE" ]; then CUTLASS_DEF=(-Ccmake.define.ATTNKIT_CUTLASS_INCLUDE="$CUTLASS_INCLUDE"); fi
stamp "build: attnkit with ATTNKIT_CUDA=ON, CUDA architectures $ARCHS, $JOBS jobs, CUTLASS ${CUTLASS_INCLUDE:-from the nvidia-cutlass package if installed}"
export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS
if ! timeout 300 $PY -m pip install -v --no-index --no-deps --no-build-isolation -e . \
      -Ccmake.define.ATTNKIT_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCHS" ${CUTLASS_DEF[@]+"${CUTLASS_DEF[@]}"} \
      -Cbuild-dir=build/gpu-check > build/gpu-check.log 2>&1; then
  tail -40 build/gpu-check.log
  stamp "build FAILED (log: build/gpu-check.log)"
  exit 1
fi
$PY -c "import attnkit; i = attnkit.info(); print({k: i.get(k) for k in ('version', 'isa', 'cuda_built', 'cuda_available', 'cuda_devices', 'cuda_unverified')})" || status=1
grep -h "attnkit: .*CUTLASS" build/gpu-check.log || true

# The Hopper attention kernel (attention_hopper.cuh) has run only on the CPU emulator: its own
# tests first (a quick verdict), then one call under compute-sanitizer (synccheck: barrier
# misuse; memcheck: out-of-bounds shared / global accesses) -- both report and go on.
if $PY -c "import sys, torch; from attnkit import _cuda_backend as cb; m = cb._module(); sys.exit(0 if m.hopper_kernel_built() and torch.cuda.get_device_capability() == (9, 0) else 1)" 2>/dev/null; then
  stamp "hopper: the Hopper attention kernel's tests (tests/test_cuda.py -k hopper) and compute-sanitizer"
  timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -k hopper -rs > build/gpu-hopper.log 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" build/gpu-hopper.log | head -20
  tail -2 build/gpu-hopper.log
  [ "$rc" = 0 ] || { stamp "hopper tests FAILED or timed out (rc=$rc)"; status=1; }
  if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in synccheck memcheck; do
      timeout 90 compute-sanitizer --tool $tool --error-exitcode 3 $PY -c "
import torch, attnkit
from attnkit import _cuda_backend as cb
m = cb._module(); m._set_hopper_kernel(True)
q, k, v = (torch.randn(1, 2, 200, 128, device='cuda', dtype=torch.bfloat16) for _ in range(3))
o = attnkit.attention(q, k, v, causal=True)
assert m._last_attention_plan()['kernel'] == 'hopper'
ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
print('hopper under $tool: max |err|', (o.float() - ref).abs().max().item())
" > build/gpu-hopper-$tool.log 2>&1
      rc=$?
      tail -4 build/gpu-hopper-$tool.log
      [ "$rc" = 0 ] || { stamp "hopper under compute-sanitizer $tool FAILED (rc=$rc, build/gpu-hopper-$tool.log)"; status=1; }
    done
  fi
fi

stamp "tests: GPU suite (tests/test_cuda.py, which also forces on the unverified decode kernel, backward and Hopper kernel in their own tests) and the device-array unit tests"
if $PY -c "import pytest" 2>/dev/null; then
  # No -x: one failing path must not hide the others; the whole log stays in build/.
  timeout 200 $PY -m pytest -q --maxfail=40 -p no:cacheprovider tests/test_cuda.py tests/test_cuda_api.py -rs \
    > build/gpu-tests.log 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" build/gpu-tests.log | head -40
  tail -3 build/gpu-tests.log
  [ "$rc" = 0 ] || { stamp "tests FAILED or timed out (rc=$rc)"; status=1; }
else
  stamp "pytest is not installed here: GPU tests SKIPPED (the benchmark still checks each result against torch)"
  status=1
fi

# The host CPU beside the GPU has AMX (issue 13): the amx variant's tests and its bf16 rows
# against torch's, in the same run. Unverified until this passes on an AMX CPU.
stamp "host CPU: the amx variant (bf16 matmul, attention forward and backward on AMX tiles)"
if $PY -c "import attnkit, sys; v = {i['name']: i for i in attnkit.info()['isas']}['amx']; print('amx:', v['supported'] or v['unsupported']); sys.exit(0 if v['supported'] else 1)"; then
  timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_matmul.py tests/test_attention.py \
    tests/test_backward.py tests/test_runtime.py -k "amx or info or env" -rs \
    > build/amx-tests.log 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" build/amx-tests.log | head -20
  tail -2 build/amx-tests.log
  [ "$rc" = 0 ] || { stamp "amx tests FAILED or timed out (rc=$rc)"; status=1; }
  # bf16 matmul, attention (MHA, causal, GQA) and backward rows against torch, at 2 threads
  # (the issue's targets) and 16 (the scaling), in one pass.
  ATTNKIT_CPU=amx timeout 120 $PY bench/run.py --suite matmul --suite attention --suite backward \
    --dtype bf16 --threads 2,16 --rounds 2 || { stamp "amx bench FAILED or timed out"; status=1; }
fi

stamp "benchmark: attnkit vs torch (table last)"
timeout 200 $PY bench/gpu_bench.py --json build/gpu-bench.json || { stamp "benchmark FAILED or timed out"; status=1; }
stamp "done (status $status)"
exit $status
