// attnkit._cuda.attention (also behind attention_varlen and attention_with_kvcache), plus
// two helpers of the Python layer: to_host (small index arrays, for host-side checks) and
// dlpack_describe (reads a DLPack capsule without consuming it).
//
// The Python front end (_front.py, via _cuda_backend.py) hands canonical (B, H, S, D) device
// views and has already produced the user-facing error messages; this re-checks everything
// the kernels rely on for memory safety (attention_params, shared with the CPU binding;
// ARCHITECTURE.md rule 2), fills AttentionParams, plans and launches.
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
};

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
  ATTNKIT_REQUIRE(f.name, (t.dtype == DType::i32 || t.dtype == DType::i64) && t.ndim == ndim,
            std::string(name) + " must be a " + std::to_string(ndim) + "-D int32 or int64 array");
  return t;
}

// The longest cache length when cache_seqlens is a host array (the front end has checked its
// entries), else -1: device lengths are only known on the device. Split-KV sizes its chunks
// from it (the lengths, not the capacity; docs/ARCHITECTURE.md, "Decode").
int64_t max_host_seqlen(py::handle obj) {
  if (!py::isinstance<py::array>(obj)) return -1;
  py::array_t<int64_t, py::array::c_style | py::array::forcecast> a(
      py::reinterpret_borrow<py::object>(obj));
  int64_t longest = 0;
  for (py::ssize_t i = 0; i < a.size(); ++i) longest = std::max(longest, a.data()[i]);
  return longest;
}

// Host prefix sums (cu_seqlens_*): checked here as on the CPU, then uploaded as int64.
int64_t cu_arg(const Fn& f, py::handle obj, const char* name, int64_t batch, int64_t total,
               Upload& up, int device, cudaStream_t stream) {
  py::array_t<int64_t, py::array::c_style | py::array::forcecast> a(
      py::reinterpret_borrow<py::object>(obj));
  ATTNKIT_REQUIRE(f.name, a.ndim() == 1 && a.shape(0) == batch + 1,
            std::string(name) + " must have batch + 1 entries");
  const int64_t* c = a.data();
  ATTNKIT_REQUIRE(f.name, c[0] == 0, "cu_seqlens must start at 0");
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    ATTNKIT_REQUIRE(f.name, c[b] <= c[b + 1], std::string(name) + " must be non-decreasing from 0");
    longest = std::max(longest, c[b + 1] - c[b]);
  }
  ATTNKIT_REQUIRE(f.name, c[batch] == total, std::string(name) + "[-1] = " + std::to_string(c[batch]) +
                                   " but the array has " + std::to_string(total) + " tokens");
  upload(up, a, f.name.c_str(), name, stream, device);
  return longest;
}

// ALiBi slopes: a host numpy array is uploaded for the call (into up), a device array used.
Tensor alibi_arg(py::handle obj, const char* fn, Upload& up, cudaStream_t stream, int device) {
  if (py::isinstance<py::array>(obj)) {
    upload(up, obj, fn, "alibi_slopes", stream, device);
    return up.t;
  }
  return dev_tensor(obj, fn, "alibi_slopes", false, device);
}

cuda::AttentionPlan& last_plan() {
  static thread_local cuda::AttentionPlan plan;
  return plan;
}

void attention_entry(const std::string& fn_name, py::handle q_o, py::handle k_o, py::handle v_o,
                     py::handle out_o, py::handle lse_o, py::handle mask_o, py::handle alibi_o,
                     py::handle cu_q_o, py::handle cu_k_o, py::handle seqlens_o,
                     py::handle block_table_o, py::handle k_new_o, py::handle v_new_o,
                     int64_t batch, double scale, double softcap, bool causal, bool bottom_right,
                     int64_t window_left, int64_t window_right, int device, uintptr_t stream_id,
                     std::vector<uintptr_t> wait, py::handle k_scale_o, py::handle v_scale_o) {
  const Fn f{fn_name};
  const char* fn = f.name.c_str();
  DeviceGuard guard(device, fn);
  const cuda::DeviceInfo& dev = device_info(device, fn);
  const cudaStream_t stream = as_stream(stream_id);
  const bool appending = !k_new_o.is_none() || !v_new_o.is_none();
  const bool varlen = !cu_q_o.is_none();
  const bool paged = !block_table_o.is_none();
  const bool cached = !seqlens_o.is_none();
  AttentionTensors t;
  t.q = dev_tensor(q_o, fn, "q", false, device);
  t.k = dev_tensor(k_o, fn, appending ? "k_cache" : "k", appending, device);
  t.v = dev_tensor(v_o, fn, appending ? "v_cache" : "v", appending, device);
  t.out = dev_tensor(out_o, fn, "out", true, device);
  if (!lse_o.is_none()) t.lse = dev_tensor(lse_o, fn, "lse", true, device);
  if (!mask_o.is_none()) t.mask = dev_tensor(mask_o, fn, "mask", false, device);
  if (appending) {
    t.k_new = dev_tensor(k_new_o, fn, "k", false, device);
    t.v_new = dev_tensor(v_new_o, fn, "v", false, device);
  }
  if (!k_scale_o.is_none()) t.k_scale = dev_tensor(k_scale_o, fn, "k_scale", appending, device);
  if (!v_scale_o.is_none()) t.v_scale = dev_tensor(v_scale_o, fn, "v_scale", appending, device);
  Upload up_cu_q, up_cu_k, up_seqlens, up_table, up_alibi;
  if (!alibi_o.is_none()) t.alibi = alibi_arg(alibi_o, fn, up_alibi, stream, device);
  t.paged = paged;
  t.varlen = varlen;
  ATTNKIT_REQUIRE(f.name, !t.mask.data || (!varlen && !cached), "internal: no mask with varlen or a cache");
  const AttentionOptions opts{batch, scale, softcap, causal, bottom_right, window_left,
                              window_right, 0.0, 0, 0};
  AttentionParams p;
  attention_params(f.name, t, opts, &p);
  const Tensor &q = t.q, &k = t.k;

  cuda::KvCacheArgs kv;
  if (varlen) {
    ATTNKIT_REQUIRE(f.name, !paged && !cached, "internal: varlen layout");
    p.seqlen_q = cu_arg(f, cu_q_o, "cu_seqlens_q", batch, q.shape[2], up_cu_q, device, stream);
    p.seqlen_k = cu_arg(f, cu_k_o, "cu_seqlens_k", batch, k.shape[2], up_cu_k, device, stream);
    p.cu_seqlens_q = static_cast<const int64_t*>(up_cu_q.t.data);
    p.cu_seqlens_k = static_cast<const int64_t*>(up_cu_k.t.data);
    p.total_q = q.shape[2];
    p.total_k = k.shape[2];
  }
  if (paged) {
    ATTNKIT_REQUIRE(f.name, cached, "block_table needs cache_seqlens");
    Tensor bt = index_arg(f, block_table_o, "block_table", 2, up_table, device, stream);
    ATTNKIT_REQUIRE(f.name, bt.shape[0] == batch, "block_table must have shape (batch, max_blocks)");
    ATTNKIT_REQUIRE(f.name, k.shape[2] >= 1, "the page size must be at least 1");
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
    ATTNKIT_REQUIRE(f.name, cs.shape[0] == batch, "cache_seqlens must have batch entries");
    kv.active = true;
    kv.cache_seqlens = cs.data;
    kv.cache_seqlens_dtype = cs.dtype;
    kv.cache_seqlens_stride = cs.strides[0];
    kv.max_seqlen = max_host_seqlen(seqlens_o);
  }
  if (appending) {
    ATTNKIT_REQUIRE(f.name, cached, "k/v need cache_seqlens");
    kv.k_new = t.k_new.data;
    kv.v_new = t.v_new.data;
    kv.n_new = t.k_new.shape[2];
    for (int i = 0; i < 3; ++i) {
      kv.k_new_stride[i] = t.k_new.strides[i];
      kv.v_new_stride[i] = t.v_new.strides[i];
    }
    if (kv.max_seqlen >= 0) kv.max_seqlen += kv.n_new;
  }

  cuda::AttentionPlan plan;
  if (const char* err = cuda::attention_plan(p, kv, dev, &plan)) throw_value(f.name + ": " + err);
  last_plan() = plan;
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

// attnkit.attention_backward on device arrays: dq/dk/dv allocated by the Python layer, the
// same validation as the CPU binding (attention_params with backward = true), then the
// kernels' own limits (attention_bwd_plan) before anything is written.
void attention_backward_entry(py::handle dout_o, py::handle q_o, py::handle k_o, py::handle v_o,
                              py::handle out_o, py::handle lse_o, py::handle dq_o, py::handle dk_o,
                              py::handle dv_o, py::handle mask_o, py::handle alibi_o, int64_t batch,
                              double scale, double softcap, bool causal, bool bottom_right,
                              int64_t window_left, int64_t window_right, double dropout_p,
                              int device, uintptr_t stream_id, std::vector<uintptr_t> wait) {
  const Fn f{"attention_backward"};
  const char* fn = f.name.c_str();
  DeviceGuard guard(device, fn);
  const cuda::DeviceInfo& dev = device_info(device, fn);
  const cudaStream_t stream = as_stream(stream_id);
  AttentionTensors t;
  t.q = dev_tensor(q_o, fn, "q", false, device);
  t.k = dev_tensor(k_o, fn, "k", false, device);
  t.v = dev_tensor(v_o, fn, "v", false, device);
  t.out = dev_tensor(out_o, fn, "out", false, device);
  t.lse = dev_tensor(lse_o, fn, "lse", false, device);
  if (!mask_o.is_none()) t.mask = dev_tensor(mask_o, fn, "mask", false, device);
  Upload up_alibi;
  if (!alibi_o.is_none()) t.alibi = alibi_arg(alibi_o, fn, up_alibi, stream, device);
  t.backward = true;
  const AttentionOptions opts{batch, scale, softcap, causal, bottom_right, window_left,
                              window_right, dropout_p, 0, 0};
  AttentionBwdParams bp;
  attention_params(f.name, t, opts, &bp.fwd);
  const Tensor dout = dev_tensor(dout_o, fn, "dout", false, device);
  const Tensor dq = dev_tensor(dq_o, fn, "dq", true, device), dk = dev_tensor(dk_o, fn, "dk", true, device),
               dv = dev_tensor(dv_o, fn, "dv", true, device);
  backward_grad_params(f.name, t.q, t.k, t.v, t.out, dout, dq, dk, dv, &bp);
  size_t scratch_bytes = 0;
  if (const char* err = cuda::attention_bwd_plan(bp, dev, &scratch_bytes))
    throw py::value_error(f.name + ": " + err);
  DeviceBuffer scratch;
  scratch.alloc(scratch_bytes, stream, device, fn);
  wait_for(stream, wait, fn);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = cuda::attention_bwd(bp, scratch.get(), stream);
  }
  check_cuda(err, fn);
}

// attnkit.quantize_kv on device arrays: codes and scales allocated by the Python layer.
void quantize_entry(py::handle x_o, py::handle q_o, py::handle scale_o, int device,
                    uintptr_t stream_id, std::vector<uintptr_t> wait) {
  const char* fn = "quantize_kv";
  DeviceGuard guard(device, fn);
  const cudaStream_t stream = as_stream(stream_id);
  const Tensor x = dev_tensor(x_o, fn, "x", false, device);
  const Tensor q = dev_tensor(q_o, fn, "codes", true, device);
  const Tensor sc = dev_tensor(scale_o, fn, "scale", true, device);
  QuantizeParams p;
  if (!quantize_params(fn, x, q, sc, &p)) return;
  wait_for(stream, wait, fn);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = cuda::quantize_kv(p, stream);
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
    if (code == 0 && bits == 8) dtype = "int8";
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
        py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(),
        "Attention forward on canonical (B, H, S, D) device views (validated); 8-bit caches "
        "take k_scale/v_scale (float32, (B|pages, Hkv, S)).");
  m.def("_last_attention_plan", [] {
    const cuda::AttentionPlan& pl = last_plan();
    py::dict d;
    d["kernel"] = pl.decode_kernel ? "decode" : pl.hopper ? "hopper" : pl.tensor_cores ? "mma" : "simt";
    d["head_dim_bucket"] = pl.head_dim_bucket;
    d["block_m"] = pl.block_m;
    d["block_n"] = pl.block_n;
    d["pack"] = pl.pack;
    d["num_splits"] = pl.num_splits;
    d["split_keys"] = pl.split_keys;
    return d;
  }, "The plan of this thread's last attention call (kernel, tile, GQA pack, key splits).");
  m.def("_set_decode_kernel", &cuda::set_decode_kernel_enabled, py::arg("on"),
        "Let the planner choose the decode kernel (unverified on GPUs; default from "
        "ATTNKIT_CUDA_DECODE=1).");
  m.def("decode_kernel_enabled", &cuda::decode_kernel_enabled,
        "Whether the planner may choose the decode kernel (ATTNKIT_CUDA_DECODE=1).");
  m.def("_set_hopper_kernel", &cuda::set_hopper_kernel_enabled, py::arg("on"),
        "Let the planner choose the Hopper attention forward on sm_90 devices (unverified on "
        "GPUs; default from ATTNKIT_CUDA_HOPPER=1).");
  m.def("hopper_kernel_enabled", &cuda::hopper_kernel_enabled,
        "Whether the planner may choose the Hopper attention forward (ATTNKIT_CUDA_HOPPER=1).");
  m.def("hopper_kernel_built", &cuda::hopper_kernel_built,
        "Whether this build has the Hopper attention forward (sm_90 and the CUTLASS headers at "
        "build time).");
  m.def("attention_backward", &attention_backward_entry, py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("mask"), py::arg("alibi"), py::arg("batch"), py::arg("scale"), py::arg("softcap"),
        py::arg("causal"), py::arg("bottom_right"), py::arg("window_left"), py::arg("window_right"),
        py::arg("dropout_p"), py::arg("device"), py::arg("stream"), py::arg("wait_streams"),
        "Gradients (dq, dk, dv) into device arrays (validated; ATTNKIT_CUDA_BACKWARD=1).");
  m.def("_set_backward_kernel", &cuda::set_backward_kernel_enabled, py::arg("on"),
        "Let attention_backward run on CUDA devices (unverified on GPUs; default from "
        "ATTNKIT_CUDA_BACKWARD=1).");
  m.def("backward_kernel_enabled", &cuda::backward_kernel_enabled,
        "Whether attention_backward runs on CUDA devices (ATTNKIT_CUDA_BACKWARD=1).");
  m.def("_set_cutlass_gemm", &cuda::set_cutlass_gemm_enabled, py::arg("on"),
        "Let fp16/bf16 matmul on sm_90 devices use the CUTLASS sm90 kernel (unverified on GPUs; "
        "default from ATTNKIT_CUDA_CUTLASS_GEMM=1).");
  m.def("cutlass_gemm_enabled", &cuda::cutlass_gemm_enabled,
        "Whether matmul may use the CUTLASS sm90 kernel (ATTNKIT_CUDA_CUTLASS_GEMM=1).");
  m.def("_last_gemm_kernel", &cuda::last_gemm_kernel,
        "The kernel of the last CUDA matmul: sm90 (CUTLASS), mma or simt (tests).");
  m.def("cutlass_gemm_built", &cuda::cutlass_gemm_built,
        "Whether this build has the CUTLASS sm90 matmul (CUTLASS headers and sm_90 at build time).");
  m.def("quantize_kv", &quantize_entry, py::arg("x"), py::arg("q"), py::arg("scale"),
        py::arg("device"), py::arg("stream"), py::arg("wait_streams"),
        "Quantize the rows of device array x into codes q and float32 scales (validated).");
  m.def("to_host", &to_host, py::arg("array"), py::arg("device"), py::arg("stream"),
        "Copy a small device array to a new numpy array (synchronizes the stream).");
  m.def("dlpack_describe", &dlpack_describe, py::arg("capsule"),
        "Describe a DLPack capsule without consuming it.");
}

}  // namespace cuda_binding
}  // namespace attnkit
