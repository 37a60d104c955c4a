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

void softmax_entry(py::handle x_obj, py::handle out_obj, int64_t axis, bool out_fresh) {
  const char* fn = "softmax";
  Tensor x = to_tensor(x_obj, fn, "x", false);
  Tensor out = to_tensor(out_obj, fn, "out", true);
  SoftmaxParams p;
  if (!softmax_params(x, out, axis, &p)) return;
  p.num_threads = resolve_num_threads();
  p.out_fresh = out_fresh;
  Status s;
  {
    py::gil_scoped_release release;
    s = cpu::active_kernels()->softmax(p);
  }
  check_status(s, fn);
}

}  // namespace

void bind_softmax(py::module_& m) {
  m.def("softmax", &softmax_entry, py::arg("x"), py::arg("out"), py::arg("axis"),
        py::arg("out_fresh") = false,
        "softmax(x, out, axis, out_fresh=False): writes softmax of x along axis into out "
        "(validated). out_fresh: out was just allocated, never written (a store-policy hint).");
}



}  // namespace attnkit
