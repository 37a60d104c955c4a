#!/usr/bin/env bash
# Cross-compiles the portable kernel variant for aarch64 and runs tools/aarch64/smoke.cpp
# under qemu-user: the check that the baseline builds and computes correctly off x86.
# Needs Debian's g++-aarch64-linux-gnu and qemu-user (apt-get install them first).
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${CXX:-aarch64-linux-gnu-g++}
OUT=${TMPDIR:-/tmp}/attnkit-aarch64
mkdir -p "$OUT"
FLAGS="-std=c++17 -O2 -fopenmp -Icsrc/include -Icsrc/cpu -Icsrc"
KERNELS="csrc/cpu/softmax.cpp csrc/cpu/gemm/gemm.cpp csrc/cpu/attention_fwd.cpp
         csrc/cpu/attention_decode.cpp csrc/cpu/attention_bwd.cpp csrc/cpu/kernel_table.cpp"
$CXX $FLAGS -DATTNKIT_ISA_NS=scalar -DATTNKIT_ISA_SCALAR=1 $KERNELS \
     csrc/cpu/dispatch.cpp csrc/cpu/threading.cpp tools/aarch64/smoke.cpp -static -o "$OUT/smoke"
QEMU_LD_PREFIX=/usr/aarch64-linux-gnu qemu-aarch64 "$OUT/smoke"
