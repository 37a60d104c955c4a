// attnkit._cuda.attention (also behind attention_varlen and attention_with_kvcache), plus
// two helpers of the Python layer: to_host (small index arrays, for host-side checks) and
// dlpack_describe (reads a DLPack capsule without consuming it).
//
// The Python layer (_cuda_api.py) hands canonical (B, H, S, D) device views and has already
// produced the user-facing error messages; this re-checks everything the kernels rely on for
// memory safety (DESIGN rule 2), fills AttentionParams, plans and launches.
#include <cuda_runtime_api.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "bindings/params_from.h"
#include "bindings/tensor.h"
#include "cuda/binding_util.h"
#include "cuda/kernels.h"

namespace attnkit {
namespace cuda_binding {
namespace {

struct Fn {
  std::string name;
  void require(bool ok, const std::string& msg) const {
    if (!ok) throw_value(name + ": " + msg);
  }
};

void check_rows(const Fn& f, const Tensor& t, const char* name) {
  f.require(t.ndim == 4, std::string(name) + " must be 4-D here, got " + shape_str(t));
  f.require(t.shape[3] <= 1 || t.strides[3] == 1 || t.numel() == 0,
            std::string(name) + " must be contiguous along its last (head) dim");
}

// Index array (cache_seqlens, block_table): a device descriptor, int32 or int64, or a host
// numpy int64 array (validated by the Python layer) uploaded for the call.
Tensor index_arg(const Fn& f, py::handle obj, const char* name, int ndim, Upload& up,
                 int device, cudaStream_t stream) {
  Tensor t;
  if (py::isinstance<py::array>(obj)) {
    upload(up, obj, f.name.c_str(), name, stream, device);
    t = up.t;
  } else {
    t = dev_tensor(obj, f.name.c_str(), name, false, device);
  }
  f.require((t.dtype == DType::i32 || t.dtype == DType::i64) && t.ndim == ndim,
            std::string(name) + " must be a " + std::to_string(ndim) + "-D int32 or int64 array");
  return t;
}

// Host prefix sums (cu_seqlens_*): checked here as on the CPU, then uploaded as int64.
int64_t cu_arg(const Fn& f, py::handle obj, const char* name, int64_t batch, int64_t total,
               Upload& up, int device, cudaStream_t stream) {
  py::array_t<int64_t, py::array::c_style | py::array::forcecast> a(
      py::reinterpret_borrow<py::object>(obj));
  f.require(a.ndim() == 1 && a.shape(0) == batch + 1,
            std::string(name) + " must have batch + 1 entries");
  const int64_t* c = a.data();
  f.require(c[0] == 0, "cu_seqlens must start at 0");
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    f.require(c[b] <= c[b + 1], std::string(name) + " must be non-decreasing from 0");
    longest = std::max(longest, c[b + 1] - c[b]);
  }
  f.require(c[batch] == total, std::string(name) + "[-1] = " + std::to_string(c[batch]) +
                                   " but the array has " + std::to_string(total) + " tokens");
  upload(up, a, f.name.c_str(), name, stream, device);
  return longest;
}

void attention_entry(const std::string& fn_name, py::handle q_o, py::handle k_o, py::handle v_o,
                     py::handle out_o, py::handle lse_o, py::handle mask_o, py::handle alibi_o,
                     py::handle cu_q_o, py::handle cu_k_o, py::handle seqlens_o,
                     py::handle block_table_o, py::handle k_new_o, py::handle v_new_o,
                     int64_t batch, double scale, double softcap, bool causal, bool bottom_right,
                     int64_t window_left, int64_t window_right, int device, uintptr_t stream_id,
                     std::vector<uintptr_t> wait) {
  const Fn f{fn_name};
  const char* fn = f.name.c_str();
  DeviceGuard guard(device, fn);
  const cuda::DeviceInfo& dev = device_info(device, fn);
  const cudaStream_t stream = as_stream(stream_id);
  const bool appending = !k_new_o.is_none();
  Tensor q = dev_tensor(q_o, fn, "q", false, device);
  Tensor k = dev_tensor(k_o, fn, appending ? "k_cache" : "k", appending, device);
  Tensor v = dev_tensor(v_o, fn, appending ? "v_cache" : "v", appending, device);
  Tensor out = dev_tensor(out_o, fn, "out", true, device);
  check_rows(f, q, "q");
  check_rows(f, k, "k");
  check_rows(f, v, "v");
  check_rows(f, out, "out");
  if (!is_float(q.dtype))
    throw_type(f.name + ": q has dtype " + dtype_name(q.dtype) +
               "; expected float32, float64, float16 or bfloat16");
  if (k.dtype != v.dtype)
    throw_type(f.name + ": k has dtype " + dtype_name(k.dtype) + " but v has " + dtype_name(v.dtype));
  const bool kv_ok = k.dtype == q.dtype ||
                     (q.dtype == DType::f32 && (k.dtype == DType::f16 || k.dtype == DType::bf16));
  if (!kv_ok)
    throw_type(f.name + ": q has dtype " + dtype_name(q.dtype) + " but k/v have " +
               dtype_name(k.dtype) + "; k/v must match q, or be float16/bfloat16 with a float32 q");
  if (out.dtype != q.dtype)
    throw_type(f.name + ": out has dtype " + dtype_name(out.dtype) + " but q has " + dtype_name(q.dtype));

  AttentionParams p;
  cuda::KvCacheArgs kv;
  p.batch = batch;
  p.num_heads = q.shape[1];
  p.num_kv_heads = k.shape[1];
  p.seqlen_q = q.shape[2];
  p.seqlen_k = k.shape[2];
  p.head_dim = q.shape[3];
  p.head_dim_v = v.shape[3];
  f.require(batch >= 0, "negative batch");
  f.require(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0,
            "q has " + std::to_string(p.num_heads) + " heads, not a multiple of k's " +
                std::to_string(p.num_kv_heads));
  f.require(k.shape[3] == p.head_dim, "k has head_dim " + std::to_string(k.shape[3]) +
                                          " but q has " + std::to_string(p.head_dim));
  f.require(v.shape[0] == k.shape[0] && v.shape[1] == k.shape[1] && v.shape[2] == k.shape[2],
            "v has shape " + shape_str(v) + ", inconsistent with k " + shape_str(k));
  f.require(out.shape[0] == q.shape[0] && out.shape[1] == q.shape[1] &&
                out.shape[2] == q.shape[2] && out.shape[3] == p.head_dim_v,
            "out has shape " + shape_str(out) + " but the result has head_dim " +
                std::to_string(p.head_dim_v) + " and q's other dims");
  f.require(p.head_dim >= 1 && p.head_dim_v >= 1, "head dims must be at least 1");

  const bool varlen = !cu_q_o.is_none();
  const bool paged = !block_table_o.is_none();
  const bool cached = !seqlens_o.is_none();
  Upload up_cu_q, up_cu_k, up_seqlens, up_table, up_alibi;
  if (varlen) {
    f.require(q.shape[0] == 1 && k.shape[0] == 1 && !paged && !cached, "internal: varlen layout");
    p.seqlen_q = cu_arg(f, cu_q_o, "cu_seqlens_q", batch, q.shape[2], up_cu_q, device, stream);
    p.seqlen_k = cu_arg(f, cu_k_o, "cu_seqlens_k", batch, k.shape[2], up_cu_k, device, stream);
    p.cu_seqlens_q = static_cast<const int64_t*>(up_cu_q.t.data);
    p.cu_seqlens_k = static_cast<const int64_t*>(up_cu_k.t.data);
  } else {
    f.require(q.shape[0] == batch, "internal: batch mismatch");
    if (!paged) f.require(k.shape[0] == batch, "k and q have different batch sizes");
  }
  if (paged) {
    f.require(cached, "block_table needs cache_seqlens");
    Tensor bt = index_arg(f, block_table_o, "block_table", 2, up_table, device, stream);
    f.require(bt.shape[0] == batch, "block_table must have shape (batch, max_blocks)");
    f.require(k.shape[2] >= 1, "the page size must be at least 1");
    p.page_size = k.shape[2];
    p.block_table_stride = bt.shape[1];
    p.seqlen_k = bt.shape[1] * p.page_size;  // capacity of a sequence
    kv.block_table = bt.data;
    kv.block_table_dtype = bt.dtype;
    kv.block_table_strides[0] = bt.strides[0];
    kv.block_table_strides[1] = bt.strides[1];
    kv.num_pages = k.shape[0];
  }
  if (cached) {
    Tensor cs = index_arg(f, seqlens_o, "cache_seqlens", 1, up_seqlens, device, stream);
    f.require(cs.shape[0] == batch, "cache_seqlens must have batch entries");
    kv.active = true;
    kv.cache_seqlens = cs.data;
    kv.cache_seqlens_dtype = cs.dtype;
    kv.cache_seqlens_stride = cs.strides[0];
  }
  Tensor k_new, v_new;
  if (appending) {
    f.require(cached, "k/v need cache_seqlens");
    k_new = dev_tensor(k_new_o, fn, "k", false, device);
    v_new = dev_tensor(v_new_o, fn, "v", false, device);
    check_rows(f, k_new, "k");
    check_rows(f, v_new, "v");
    f.require(k_new.dtype == k.dtype && v_new.dtype == k.dtype,
              "k and v must have the caches' dtype " + std::string(dtype_name(k.dtype)));
    f.require(k_new.shape[0] == batch && k_new.shape[1] == p.num_kv_heads &&
                  k_new.shape[3] == p.head_dim && v_new.shape[0] == batch &&
                  v_new.shape[1] == p.num_kv_heads && v_new.shape[2] == k_new.shape[2] &&
                  v_new.shape[3] == p.head_dim_v,
              "k/v have shapes " + shape_str(k_new) + " / " + shape_str(v_new) +
                  ", inconsistent with the caches");
    for (const Tensor* t : {&k_new, &v_new})
      for (const Tensor* c : {&k, &v})
        f.require(!may_overlap(*t, *c), "k/v overlap the caches they are appended to");
    kv.k_new = k_new.data;
    kv.v_new = v_new.data;
    kv.n_new = k_new.shape[2];
    for (int i = 0; i < 3; ++i) {
      kv.k_new_stride[i] = k_new.strides[i];
      kv.v_new_stride[i] = v_new.strides[i];
    }
  }

  attention_operands(q, k, v, out, &p);
  Tensor lse;
  if (!lse_o.is_none()) {
    lse = dev_tensor(lse_o, fn, "lse", true, device);
    f.require(lse.dtype == DType::f32 && lse.ndim == 3 && lse.shape[0] == q.shape[0] &&
                  lse.shape[1] == q.shape[1] && lse.shape[2] == q.shape[2],
              "lse must be float32 of shape (batch, heads, seqlen_q)");
    f.require(!may_overlap(lse, out), "lse overlaps out");
    p.lse = static_cast<float*>(lse.data);
    for (int i = 0; i < 3; ++i) p.lse_stride[i] = lse.strides[i];
  }
  if (!mask_o.is_none()) {
    Tensor mk = dev_tensor(mask_o, fn, "mask", false, device);
    f.require(!varlen && !cached, "internal: no mask with varlen or a cache");
    f.require(mk.ndim == 4 && mk.shape[0] == batch && mk.shape[1] == p.num_heads &&
                  mk.shape[2] == p.seqlen_q && mk.shape[3] == p.seqlen_k,
              "internal: mask must be broadcast to (B, H, Sq, Sk)");
    f.require(mk.dtype == DType::boolean || is_float(mk.dtype), "mask must be bool or float");
    p.mask = mk.data;
    p.mask_dtype = mk.dtype;
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = mk.strides[i];
  }
  if (!alibi_o.is_none()) {
    Tensor al;
    if (py::isinstance<py::array>(alibi_o)) {
      upload(up_alibi, alibi_o, fn, "alibi_slopes", stream, device);
      al = up_alibi.t;
    } else {
      al = dev_tensor(alibi_o, fn, "alibi_slopes", false, device);
    }
    f.require(al.dtype == DType::f32 && al.ndim == 2 && al.shape[0] == batch &&
                  al.shape[1] == p.num_heads,
              "internal: alibi_slopes must be float32 (B, H)");
    p.alibi_slopes = static_cast<const float*>(al.data);
    p.alibi_stride[0] = al.strides[0];
    p.alibi_stride[1] = al.strides[1];
  }
  f.require(std::isfinite(scale), "scale must be finite");
  f.require(std::isfinite(softcap) && softcap >= 0, "softcap must be a finite number >= 0");
  f.require(window_left >= -1 && window_right >= -1, "window entries must be >= -1");
  p.scale = float(scale);
  p.softcap = float(softcap);
  p.causal = causal;
  p.bottom_right = bottom_right;
  p.window_left = window_left;
  p.window_right = window_right;
  for (const Tensor* t : {&q, &k, &v, &k_new, &v_new, &lse}) {
    if (t->ndim <= 0 || t == &lse) continue;
    f.require(!may_overlap(out, *t), "out overlaps an input (q, k or v); pass a separate array");
  }
  if (p.lse)
    for (const Tensor* t : {&q, &k, &v})
      f.require(!may_overlap(lse, *t), "lse overlaps an input (q, k or v)");

  cuda::AttentionPlan plan;
  if (const char* err = cuda::attention_plan(p, kv, dev, &plan)) throw_value(f.name + ": " + err);
  DeviceBuffer scratch;
  scratch.alloc(plan.scratch_bytes, stream, device, fn);
  wait_for(stream, wait, fn);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = cuda::attention_fwd(p, kv, plan, scratch.get(), stream);
  }
  check_cuda(err, fn);
}

// Copies a (small) device array to a new numpy array; synchronizes the stream.
py::array to_host(py::handle desc, int device, uintptr_t stream_id) {
  const char* fn = "to_host";
  DeviceGuard guard(device, fn);
  Tensor t = dev_tensor(desc, fn, "array", false, device);
  uintptr_t lo, hi;
  t.byte_extent(&lo, &hi);
  std::vector<char> host(hi - lo);
  const cudaStream_t stream = as_stream(stream_id);
  if (hi > lo) {
    check_cuda(cudaMemcpyAsync(host.data(), reinterpret_cast<void*>(lo), hi - lo,
                               cudaMemcpyDeviceToHost, stream), fn);
    check_cuda(cudaStreamSynchronize(stream), fn);
  }
  std::vector<py::ssize_t> shape(size_t(t.ndim)), strides(size_t(t.ndim));
  for (int d = 0; d < t.ndim; ++d) {
    shape[size_t(d)] = t.shape[d];
    strides[size_t(d)] = t.strides[d] * itemsize(t.dtype);
  }
  const char* base = host.data() + (reinterpret_cast<uintptr_t>(t.data) - lo);
  py::array view(py::dtype(t.dtype == DType::boolean ? "bool" : dtype_name(t.dtype)), shape,
                 strides, hi > lo ? base : nullptr);
  return view.attr("copy")();  // owns its memory; `host` dies here
}

// ---- DLPack (the stable C ABI, v0.x "dltensor" and v1 "dltensor_versioned" capsules) ----
struct DLDevice {
  int32_t device_type;
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
struct DLManagedTensorVersioned {
  uint32_t version_major, version_minor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned*);
  uint64_t flags;  // bit 0: read-only
  DLTensor dl_tensor;
};

// (data_ptr, shape, strides_in_elements, dtype, writeable, device_type, device_id). The
// capsule is only read: its producer still owns the memory, so the caller keeps the capsule
// alive for the duration of the call.
py::tuple dlpack_describe(py::capsule cap) {
  const DLTensor* t = nullptr;
  bool writeable = true;
  PyObject* obj = cap.ptr();
  if (PyCapsule_IsValid(obj, "dltensor_versioned")) {
    auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(obj, "dltensor_versioned"));
    t = &m->dl_tensor;
    writeable = (m->flags & 1) == 0;
  } else if (PyCapsule_IsValid(obj, "dltensor")) {
    t = &static_cast<DLManagedTensor*>(PyCapsule_GetPointer(obj, "dltensor"))->dl_tensor;
  } else {
    throw py::type_error("DLPack: not an unconsumed DLPack capsule");
  }
  const char* dtype = nullptr;
  const int code = t->dtype.code, bits = t->dtype.bits;
  if (t->dtype.lanes == 1) {
    if (code == 2 && bits == 16) dtype = "float16";
    if (code == 2 && bits == 32) dtype = "float32";
    if (code == 2 && bits == 64) dtype = "float64";
    if (code == 4 && bits == 16) dtype = "bfloat16";
    if (code == 0 && bits == 32) dtype = "int32";
    if (code == 0 && bits == 64) dtype = "int64";
    if (code == 6 && bits == 8) dtype = "bool";
  }
  if (!dtype)
    throw py::type_error("DLPack: unsupported dtype (code " + std::to_string(code) + ", bits " +
                         std::to_string(bits) + ", lanes " + std::to_string(t->dtype.lanes) + ")");
  py::tuple shape(size_t(t->ndim)), strides(size_t(t->ndim));
  int64_t contiguous = 1;
  for (int d = t->ndim - 1; d >= 0; --d) {
    shape[size_t(d)] = t->shape[d];
    strides[size_t(d)] = t->strides ? t->strides[d] : contiguous;
    contiguous *= t->shape[d];
  }
  const uintptr_t ptr = reinterpret_cast<uintptr_t>(t->data) + uintptr_t(t->byte_offset);
  return py::make_tuple(ptr, shape, strides, dtype, writeable, t->device.device_type,
                        t->device.device_id);
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("attention", &attention_entry, py::arg("fn"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("mask"), py::arg("alibi"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("cache_seqlens"), py::arg("block_table"),
        py::arg("k_new"), py::arg("v_new"), py::arg("batch"), py::arg("scale"),
        py::arg("softcap"), py::arg("causal"), py::arg("bottom_right"), py::arg("window_left"),
        py::arg("window_right"), py::arg("device"), py::arg("stream"), py::arg("wait_streams"),
        "Attention forward on canonical (B, H, S, D) device views (validated).");
  m.def("to_host", &to_host, py::arg("array"), py::arg("device"), py::arg("stream"),
        "Copy a small device array to a new numpy array (synchronizes the stream).");
  m.def("dlpack_describe", &dlpack_describe, py::arg("capsule"),
        "Describe a DLPack capsule without consuming it.");
}

}  // namespace cuda_binding
}  // namespace attnkit
