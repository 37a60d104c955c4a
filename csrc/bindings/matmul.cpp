#include <algorithm>
#include <string>

#include "attnkit/params.h"
#include "cpu/kernels.h"
#include "cpu/threading.h"
#include "ops.h"
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
  auto is_float = [](DType t) {
    return t == DType::f32 || t == DType::f64 || t == DType::f16 || t == DType::bf16;
  };
  if (!is_float(a.dtype))
    throw_type(std::string("matmul: a has dtype ") + dtype_name(a.dtype) +
               "; expected float32, float64, float16 or bfloat16");
  if (b.dtype != a.dtype)
    throw_type(std::string("matmul: a has dtype ") + dtype_name(a.dtype) + " but b has " +
               dtype_name(b.dtype) + "; convert one of them (mixed dtypes are not computed)");
  if (out.dtype != a.dtype)
    throw_type(std::string("matmul: out has dtype ") + dtype_name(out.dtype) +
               " but the operands have " + dtype_name(a.dtype));
  if (a.ndim < 2 || b.ndim != a.ndim || out.ndim != a.ndim)
    throw_value("matmul: internal shape error (a " + shape_str(a) + ", b " + shape_str(b) +
                ", out " + shape_str(out) + ")");
  const int nd = a.ndim;
  const int64_t m = a.shape[nd - 2], k = a.shape[nd - 1], n = b.shape[nd - 1];
  if (b.shape[nd - 2] != k)
    throw_value("matmul: shapes " + shape_str(a) + " and " + shape_str(b) +
                " are not aligned: a has K=" + std::to_string(k) + " but b has K=" +
                std::to_string(b.shape[nd - 2]));
  for (int d = 0; d < nd - 2; ++d)
    if (a.shape[d] != b.shape[d] || out.shape[d] != a.shape[d])
      throw_value("matmul: batch dims of " + shape_str(a) + ", " + shape_str(b) + " and out " +
                  shape_str(out) + " differ");
  if (out.shape[nd - 2] != m || out.shape[nd - 1] != n)
    throw_value("matmul: out has shape " + shape_str(out) + " but the result has (..., " +
                std::to_string(m) + ", " + std::to_string(n) + ")");
  if (out.numel() == 0) return;
  for (int d = 0; d < nd; ++d)
    if (out.shape[d] > 1 && out.strides[d] == 0)
      throw_value("matmul: out has overlapping elements (a stride-0 dimension)");
  if (may_overlap(out, a) || may_overlap(out, b))
    throw_value("matmul: out overlaps an input (a or b); pass a separate array");

  GemmParams p;
  p.a = a.data;
  p.b = b.data;
  p.c = out.data;
  p.dtype = a.dtype;
  p.m = m;
  p.n = n;
  p.k = k;
  p.rs_a = a.strides[nd - 2];
  p.cs_a = a.strides[nd - 1];
  p.rs_b = b.strides[nd - 2];
  p.cs_b = b.strides[nd - 1];
  p.rs_c = out.strides[nd - 2];
  p.cs_c = out.strides[nd - 1];
  // Size-1 dims: any stride is as good as a unit one (lets (M,1) and (1,N) views run in place).
  if (m == 1) p.rs_a = k, p.rs_c = n * p.cs_c;
  if (k == 1) p.cs_a = 1, p.rs_b = n * p.cs_b;
  if (n == 1) p.cs_b = 1, p.cs_c = 1;
  int bd = 0;
  for (int d = 0; d < nd - 2; ++d) {
    if (a.shape[d] == 1) continue;
    if (bd >= kMaxDims) throw_value("matmul: too many batch dimensions");
    p.batch_shape[bd] = a.shape[d];
    p.a_batch_strides[bd] = a.strides[d];
    p.b_batch_strides[bd] = b.strides[d];
    p.c_batch_strides[bd] = out.strides[d];
    ++bd;
  }
  p.batch_ndim = bd;
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
