// attnkit._C: the thin binding (ARCHITECTURE.md rule 2). Each entry point checks dtype, shape, strides
// and aliasing, fills one params struct, releases the GIL and calls one kernel. No maths here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>

#include "attnkit/params.h"
#include "cpu/debug.h"
#include "cpu/kernels.h"
#include "cpu/threading.h"
#include "ops.h"
#include "tensor.h"

#ifndef ATTNKIT_VERSION
#define ATTNKIT_VERSION "0.0.0+unknown"
#endif

namespace py = pybind11;
using namespace attnkit;

namespace {

py::list isa_list_py() {
  py::list out;
  const cpu::IsaInfo* list = cpu::isa_list();
  for (int i = 0; i < cpu::kNumIsas; ++i) {
    py::dict d;
    d["name"] = list[i].name;
    d["compiled"] = list[i].compiled;
    d["supported"] = list[i].supported;
    d["verified"] = list[i].verified;
    d["assumed"] = list[i].assumed;  // supported only through $ATTNKIT_CPU_ASSUME
    d["auto_skip"] = list[i].auto_skip ? py::object(py::str(list[i].auto_skip)) : py::none();
    d["unsupported"] = list[i].compiled && list[i].unsupported
                           ? py::object(py::str(list[i].unsupported))
                           : py::none();
    // The kernels this variant compiles itself: for a variant on top of another (avx512_vnni),
    // the table entries that differ from the variant it builds on; tests run the others once.
    py::list own;
    const cpu::KernelTable* t = cpu::variant_table(i);
    const cpu::KernelTable* below = list[i].base >= 0 ? cpu::variant_table(list[i].base) : nullptr;
    if (t) {
      const std::pair<const char*, bool> entries[] = {
          {"softmax", !below || t->softmax != below->softmax},
          {"gemm", !below || t->gemm != below->gemm},
          {"attention_fwd", !below || t->attention_fwd != below->attention_fwd},
          {"attention_bwd", !below || t->attention_bwd != below->attention_bwd},
          {"quantize_kv", !below || t->quantize_kv != below->quantize_kv},
          {"merge_attention_states",
           !below || t->merge_attention_states != below->merge_attention_states}};
      for (const auto& e : entries)
        if (e.second) own.append(e.first);
    }
    d["kernels"] = own;
    out.append(d);
  }
  return out;
}

py::dict last_attention_plan_py() {
  const cpu::AttentionPlanRecord r = cpu::debug_last_attention_plan();
  static const char* const kKernels[] = {"none", "prefill", "decode"};
  py::dict d;
  d["kernel"] = kKernels[r.kernel >= 0 && r.kernel <= 2 ? r.kernel : 0];
  d["split"] = bool(r.split);
  d["num_chunks"] = r.num_chunks;
  d["chunk_keys"] = r.chunk_keys;
  d["items"] = r.items;
  d["threads"] = r.threads;
  d["pack_slots"] = r.pack_slots;
  d["shared_pack"] = bool(r.shared_pack);
  d["address_order"] = bool(r.address_order);
  return d;
}

py::dict last_softmax_plan_py() {
  const cpu::SoftmaxPlanRecord r = cpu::debug_last_softmax_plan();
  static const char* names[] = {"none", "short_rows", "whole_rows", "chunk_items", "lanes", "f64"};
  py::dict d;
  d["path"] = names[static_cast<int>(r.path)];
  d["streamed"] = r.streamed;
  return d;
}

py::dict last_gemm_plan_py() {
  const cpu::GemmPlanRecord r = cpu::debug_last_gemm_plan();
  py::dict d;
  d["mr"] = r.mr;
  d["nr"] = r.nr;
  d["kc"] = r.kc;
  d["kc_max"] = r.kc_max;
  d["mc"] = r.mc;
  d["nc"] = r.nc;
  d["l1d"] = r.l1d;
  d["l2"] = r.l2;
  d["elem_bytes"] = r.elem_bytes;
  d["nb"] = r.nb;
  d["shared_a"] = r.shared_a;
  d["b_in_place"] = r.b_in_place;
  d["split_columns"] = r.split_columns;
  d["grid"] = py::make_tuple(r.grid_rows, r.grid_cols);
  return d;
}

void select_isa_py(const std::string& name) {
  const char* err = cpu::select_isa(name.c_str());
  if (err[0] != '\0') throw py::value_error("ATTNKIT_CPU=" + name + ": " + err);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "attnkit native kernels (internal; use the attnkit package API)";
  m.attr("__version__") = ATTNKIT_VERSION;

  m.def("_isa_list", &isa_list_py, "Compiled ISA variants with support/verification flags.");
  m.def("_select_isa", &select_isa_py, py::arg("name"),
        "Select the CPU kernel variant ('auto', 'scalar', 'avx2', 'avx512', 'avx512_vnni', "
        "'avx512_bf16', 'amx', 'amx_emulated').");
  m.def("_active_isa", [] { return std::string(cpu::active_kernels()->isa); });
  m.def("_openmp", &openmp_enabled);
  m.def("_in_forked_child", &in_forked_child);
  m.def("_set_num_threads", &set_num_threads_override, py::arg("n"));
  m.def("_num_threads_override", &num_threads_override);
  m.def("_resolve_num_threads", &resolve_num_threads);

  m.def("_register_torch", &register_torch, py::arg("tensor_type"), py::arg("strided"),
        py::arg("dtypes"),
        "Let every entry point read torch.Tensor arguments directly (CPU tensors only): "
        "torch.Tensor, torch.strided and {torch dtype: dtype name}. Called by attnkit.torch.");
  m.def("_describe", &describe_numpy, py::arg("array"),
        "(ptr, shape, strides in elements or None, dtype name, writeable) of a numpy array.");
  // Test hooks (csrc/cpu/debug.h).
  m.def("_debug_fail_allocation_after", &cpu::debug_fail_allocation_after, py::arg("n"),
        "Make the n-th kernel scratch allocation from now fail (n <= 0: disarm). Tests only.");
  m.def("_last_attention_plan", &last_attention_plan_py,
        "How the last CPU attention call ran: kernel, split-KV, chunks, items, threads.");
  m.def("_last_softmax_plan", &last_softmax_plan_py,
        "How the last CPU softmax ran: path (short_rows, whole_rows, chunk_items, lanes, f64) "
        "and whether it streamed its output (non-temporal stores).");
  m.def("_debug_set_llc_bytes", &cpu::debug_set_llc_bytes, py::arg("bytes"),
        "Make softmax's store policy assume this last-level cache size (0: the CPU's). Tests only.");
  m.def(
      "_take_tile_items",
      [] {
        py::dict d;
        d["forward"] = cpu::debug_take_tile_items(cpu::TileKernel::forward);
        d["backward"] = cpu::debug_take_tile_items(cpu::TileKernel::backward);
        return d;
      },
      "AMX tile work items of the attention forward and backward since the last call (tests).");
  m.def("_last_gemm_plan", &last_gemm_plan_py,
        "The blocking of the last CPU matmul: mr, nr, kc (used), kc_max, mc, nc, nb, l1d, l2, "
        "shared_a (the shared-A loop order: A and B packed), b_in_place (B not packed), "
        "split_columns (threads shared columns, not rows), grid (thread rows, thread columns).");

  bind_softmax(m);
  bind_matmul(m);
  bind_attention(m);
}
