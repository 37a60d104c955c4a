#include <algorithm>
#include <string>

#include "attnkit/params.h"
#include "cpu/kernels.h"
#include "cpu/threading.h"
#include "ops.h"
#include "params_from.h"
#include "tensor.h"

namespace attnkit {
namespace {

// a (..., M, K) @ b (..., K, N) -> out (..., M, N); the batch dims are already broadcast to
// the same shape by the Python layer (stride 0 where an operand is broadcast).
void matmul_entry(py::handle a_obj, py::handle b_obj, py::handle out_obj) {
  const char* fn = "matmul";
  Tensor a = to_tensor(a_obj, fn, "a", false);
  Tensor b = to_tensor(b_obj, fn, "b", false);
  Tensor out = to_tensor(out_obj, fn, "out", true);
  GemmParams p;
  if (!gemm_params(a, b, out, &p)) return;
  p.num_threads = resolve_num_threads();
  Status s;
  {
    py::gil_scoped_release release;
    s = cpu::active_kernels()->gemm(p);
  }
  check_status(s, fn);
}

}  // namespace

void bind_matmul(py::module_& m) {
  m.def("matmul", &matmul_entry, py::arg("a"), py::arg("b"), py::arg("out"),
        "matmul(a, b, out): out[...] = a @ b for batch-broadcast operands (validated).");
}

}  // namespace attnkit
