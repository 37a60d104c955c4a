// Errors that cross from kernels to the binding. Kernels report problems they can only find
// while running (for example a bad block_table entry) through a status code, never by throwing
// across an OpenMP region. The binding turns a non-ok status into a Python exception.
#pragma once
#include <cstdint>

namespace attnkit {

enum class Status : int32_t {
  ok = 0,
  out_of_memory = 1,   // scratch allocation failed
  invalid_argument = 2,
  not_implemented = 3,
};

}  // namespace attnkit
