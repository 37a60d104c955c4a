#!/usr/bin/env bash
# Build attnkit with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option
# ATTNKIT_SANITIZE) in its own venv and build dir, then run the kernel test suite under it.
# Any ASan/UBSan report aborts the run (non-zero exit).
#
#   bash tools/sanitize.sh                  # the NumPy-API kernel tests
#   bash tools/sanitize.sh test_attention.py -k masks   # any pytest arguments (run in tests/)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ATTNKIT_SANITIZE_VENV:-.venv-sanitize}
[ -d "$VENV" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q torch==2.13.0
pip install -q numpy ml_dtypes pytest hypothesis psutil scikit-build-core pybind11 cmake ninja
ATTNKIT_SANITIZE="address;undefined" pip install -q --no-build-isolation \
  -Cbuild-dir=build/sanitize -Ccmake.build-type=RelWithDebInfo .

# Python is not built with ASan: preload the runtimes. Leak checking is off because CPython
# keeps interned objects alive at exit by design (the kernels' own scratch is RAII).
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:check_initialization_order=1:strict_string_checks=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export ATTNKIT_FUZZ_EXAMPLES=${ATTNKIT_FUZZ_EXAMPLES:-100}
cd tests  # import the installed package, not the source tree
if [ $# -eq 0 ]; then
  set -- test_softmax.py test_matmul.py test_attention.py test_decode.py test_backward.py \
         test_runtime.py fuzz/fuzz_api.py
fi
python -m pytest -q -p no:cacheprovider "$@"
