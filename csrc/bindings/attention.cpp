// attnkit._C.attention / attention_backward: the Python layer hands canonical (B, H, S, D)
// views (layouts, defaults and broadcasting are done there); this checks everything the
// kernels rely on for memory safety, fills AttentionParams and calls the kernel.
#include <cmath>
#include <string>
#include <vector>

#include "attnkit/params.h"
#include "attnkit/philox.h"
#include "cpu/kernels.h"
#include "cpu/threading.h"
#include "ops.h"
#include "params_from.h"
#include "tensor.h"

namespace attnkit {
namespace {

const char* kFn = "attention";

void require(bool ok, const std::string& msg) {
  if (!ok) throw_value(std::string(kFn) + ": " + msg);
}

bool is_float(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::f16 || t == DType::bf16;
}

void check_rows_contiguous(const Tensor& t, const char* name) {
  require(t.ndim == 4, std::string(name) + " must be 4-D here, got " + shape_str(t));
  require(t.shape[3] <= 1 || t.strides[3] == 1 || t.numel() == 0,
          std::string(name) + " must be contiguous along its last (head) dim");
}

// Int64 vector argument (None -> empty).
std::vector<int64_t> int_vector(py::handle obj, const char* name) {
  std::vector<int64_t> v;
  if (obj.is_none()) return v;
  Tensor t = to_tensor(obj, kFn, name, false);
  require(t.dtype == DType::i64 && t.ndim == 1, std::string(name) + " must be a 1-D int64 array");
  const int64_t* d = static_cast<const int64_t*>(t.data);
  v.reserve(size_t(t.shape[0]));
  for (int64_t i = 0; i < t.shape[0]; ++i) v.push_back(d[i * t.strides[0]]);
  return v;
}

struct Prepared {
  AttentionParams p;
  std::vector<int64_t> cu_q, cu_k, seqlens_k, block_table;
};

// q (B|1, H, Sq, D), k (B|P, Hkv, Sk, D), v (.., Dv), out (B|1, H, Sq, Dv), lse (B|1, H, Sq).
void prepare(Prepared& pr, py::handle q_o, py::handle k_o, py::handle v_o, py::handle out_o,
             py::handle lse_o, py::handle mask_o, py::handle alibi_o, py::handle cu_q_o,
             py::handle cu_k_o, py::handle seqlens_k_o, py::handle block_table_o, int64_t batch,
             double scale, double softcap, bool causal, bool bottom_right, int64_t window_left,
             int64_t window_right, double dropout_p, uint64_t seed, uint64_t offset,
             bool out_writeable) {
  Tensor q = to_tensor(q_o, kFn, "q", false), k = to_tensor(k_o, kFn, "k", false),
         v = to_tensor(v_o, kFn, "v", false), out = to_tensor(out_o, kFn, "out", out_writeable);
  check_rows_contiguous(q, "q");
  check_rows_contiguous(k, "k");
  check_rows_contiguous(v, "v");
  check_rows_contiguous(out, "out");
  if (!is_float(q.dtype))
    throw_type(std::string("attention: q has dtype ") + dtype_name(q.dtype) +
               "; expected float32, float64, float16 or bfloat16");
  if (k.dtype != v.dtype)
    throw_type(std::string("attention: k has dtype ") + dtype_name(k.dtype) + " but v has " +
               dtype_name(v.dtype));
  const bool kv_ok = k.dtype == q.dtype ||
                     (q.dtype == DType::f32 && (k.dtype == DType::f16 || k.dtype == DType::bf16));
  if (!kv_ok)
    throw_type(std::string("attention: q has dtype ") + dtype_name(q.dtype) + " but k/v have " +
               dtype_name(k.dtype) + "; k/v must match q, or be float16/bfloat16 with a float32 q");
  if (out.dtype != q.dtype)
    throw_type(std::string("attention: out has dtype ") + dtype_name(out.dtype) + " but q has " +
               dtype_name(q.dtype));
  AttentionParams& p = pr.p;
  pr.cu_q = int_vector(cu_q_o, "cu_seqlens_q");
  pr.cu_k = int_vector(cu_k_o, "cu_seqlens_k");
  pr.seqlens_k = int_vector(seqlens_k_o, "cache_seqlens");
  const bool varlen = !pr.cu_q.empty();
  const bool paged = !block_table_o.is_none();
  p.batch = batch;
  p.num_heads = q.shape[1];
  p.num_kv_heads = k.shape[1];
  p.seqlen_q = q.shape[2];
  p.seqlen_k = k.shape[2];
  p.head_dim = q.shape[3];
  p.head_dim_v = v.shape[3];
  require(batch >= 0, "negative batch");
  require(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0,
          "q has " + std::to_string(p.num_heads) + " heads, not a multiple of k's " +
              std::to_string(p.num_kv_heads));
  require(k.shape[3] == p.head_dim, "k has head_dim " + std::to_string(k.shape[3]) +
                                        " but q has " + std::to_string(p.head_dim));
  require(v.shape[1] == k.shape[1] && v.shape[2] == k.shape[2] && v.shape[0] == k.shape[0],
          "v has shape " + shape_str(v) + ", inconsistent with k " + shape_str(k));
  require(out.shape[0] == q.shape[0] && out.shape[1] == q.shape[1] && out.shape[2] == q.shape[2] &&
              out.shape[3] == p.head_dim_v,
          "out has shape " + shape_str(out) + " but the result is (" + std::to_string(q.shape[0]) +
              ", " + std::to_string(p.num_heads) + ", " + std::to_string(p.seqlen_q) + ", " +
              std::to_string(p.head_dim_v) + ")");
  require(p.head_dim >= 1 && p.head_dim_v >= 1, "head dims must be at least 1");
  if (!varlen) require(q.shape[0] == batch, "internal: batch mismatch");
  if (!paged && pr.cu_k.empty()) require(k.shape[0] == batch, "k and q have different batch sizes");

  // Sequence descriptions.
  if (varlen) {
    require(int64_t(pr.cu_q.size()) == batch + 1 && int64_t(pr.cu_k.size()) == batch + 1,
            "cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries");
    for (int64_t b = 0; b < batch; ++b) {
      require(pr.cu_q[b] >= 0 && pr.cu_q[b] <= pr.cu_q[b + 1], "cu_seqlens_q must be non-decreasing from 0");
      require(pr.cu_k[b] >= 0 && pr.cu_k[b] <= pr.cu_k[b + 1], "cu_seqlens_k must be non-decreasing from 0");
    }
    require(pr.cu_q[0] == 0 && pr.cu_k[0] == 0, "cu_seqlens must start at 0");
    require(pr.cu_q[batch] == q.shape[2], "cu_seqlens_q[-1] = " + std::to_string(pr.cu_q[batch]) +
                                               " but q has " + std::to_string(q.shape[2]) + " tokens");
    require(pr.cu_k[batch] == k.shape[2], "cu_seqlens_k[-1] = " + std::to_string(pr.cu_k[batch]) +
                                               " but k has " + std::to_string(k.shape[2]) + " tokens");
    int64_t mq = 0, mk = 0;
    for (int64_t b = 0; b < batch; ++b) {
      mq = std::max(mq, pr.cu_q[b + 1] - pr.cu_q[b]);
      mk = std::max(mk, pr.cu_k[b + 1] - pr.cu_k[b]);
    }
    p.seqlen_q = mq;
    p.seqlen_k = mk;
    p.cu_seqlens_q = pr.cu_q.data();
    p.cu_seqlens_k = pr.cu_k.data();
  }
  int64_t capacity = k.shape[2];
  if (paged) {
    Tensor bt = to_tensor(block_table_o, kFn, "block_table", false);
    require(bt.dtype == DType::i64 && bt.ndim == 2 && bt.shape[0] == batch,
            "block_table must be an int64 array of shape (batch, max_blocks)");
    const int64_t pages = k.shape[0];
    p.page_size = k.shape[2];
    p.block_table_stride = bt.shape[1];
    capacity = bt.shape[1] * p.page_size;
    pr.block_table.resize(size_t(batch * bt.shape[1]));
    const int64_t* d = static_cast<const int64_t*>(bt.data);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t j = 0; j < bt.shape[1]; ++j)
        pr.block_table[size_t(b * bt.shape[1] + j)] = d[b * bt.strides[0] + j * bt.strides[1]];
    p.block_table = pr.block_table.data();
    p.seqlen_k = capacity;
    // Entries that a sequence reads must name a real page (checked against seqlens below).
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t len = pr.seqlens_k.empty() ? capacity : pr.seqlens_k[size_t(b)];
      for (int64_t j = 0; j < (len + p.page_size - 1) / p.page_size && j < bt.shape[1]; ++j) {
        const int64_t e = pr.block_table[size_t(b * bt.shape[1] + j)];
        require(e >= 0 && e < pages, "block_table[" + std::to_string(b) + ", " + std::to_string(j) +
                                         "] = " + std::to_string(e) + " is not a page index in [0, " +
                                         std::to_string(pages) + ")");
      }
    }
  }
  if (!pr.seqlens_k.empty()) {
    require(int64_t(pr.seqlens_k.size()) == batch, "cache_seqlens must have batch entries");
    for (int64_t b = 0; b < batch; ++b)
      require(pr.seqlens_k[size_t(b)] >= 0 && pr.seqlens_k[size_t(b)] <= capacity,
              "cache_seqlens[" + std::to_string(b) + "] = " + std::to_string(pr.seqlens_k[size_t(b)]) +
                  " is outside [0, " + std::to_string(capacity) + "]");
    p.seqlens_k = pr.seqlens_k.data();
  }

  attention_operands(q, k, v, out, &p);
  if (!lse_o.is_none()) {
    Tensor lse = to_tensor(lse_o, kFn, "lse", out_writeable);
    require(lse.dtype == DType::f32 && lse.ndim == 3 && lse.shape[0] == q.shape[0] &&
                lse.shape[1] == q.shape[1] && lse.shape[2] == q.shape[2],
            "lse must be float32 of shape (batch, heads, seqlen_q)");
    p.lse = static_cast<float*>(lse.data);
    for (int i = 0; i < 3; ++i) p.lse_stride[i] = lse.strides[i];
    if (out_writeable) require(!may_overlap(lse, out), "lse overlaps out");
  }
  if (!mask_o.is_none()) {
    Tensor mk = to_tensor(mask_o, kFn, "mask", false);
    require(mk.ndim == 4 && mk.shape[0] == batch && mk.shape[1] == p.num_heads &&
                mk.shape[2] == p.seqlen_q && mk.shape[3] == p.seqlen_k,
            "internal: mask must be broadcast to (B, H, Sq, Sk)");
    require(mk.dtype == DType::boolean || is_float(mk.dtype), "mask must be bool or float");
    p.mask = mk.data;
    p.mask_dtype = mk.dtype;
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = mk.strides[i];
  }
  if (!alibi_o.is_none()) {
    Tensor al = to_tensor(alibi_o, kFn, "alibi_slopes", false);
    require(al.dtype == DType::f32 && al.ndim == 2 && al.shape[0] == batch && al.shape[1] == p.num_heads,
            "internal: alibi_slopes must be float32 (B, H)");
    p.alibi_slopes = static_cast<const float*>(al.data);
    p.alibi_stride[0] = al.strides[0];
    p.alibi_stride[1] = al.strides[1];
  }
  require(std::isfinite(scale), "scale must be finite");
  require(std::isfinite(softcap) && softcap >= 0, "softcap must be a finite number >= 0");
  require(window_left >= -1 && window_right >= -1, "window entries must be >= -1");
  p.scale = scale;
  p.softcap = softcap;
  p.causal = causal;
  p.bottom_right = bottom_right;
  p.window_left = window_left;
  p.window_right = window_right;
  require(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1)");
  p.dropout_p = float(dropout_p);
  p.dropout_seed = seed;
  p.dropout_offset = offset;
  if (out_writeable)
    for (const Tensor* t : {&q, &k, &v})
      require(!may_overlap(out, *t), "out overlaps an input (q, k or v); pass a separate array");
  p.num_threads = resolve_num_threads();
}

void attention_entry(py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse,
                     py::handle mask, py::handle alibi, py::handle cu_q, py::handle cu_k,
                     py::handle seqlens_k, py::handle block_table, int64_t batch, double scale,
                     double softcap, bool causal, bool bottom_right, int64_t window_left,
                     int64_t window_right, double dropout_p, uint64_t seed, uint64_t offset,
                     int num_threads) {
  Prepared pr;
  prepare(pr, q, k, v, out, lse, mask, alibi, cu_q, cu_k, seqlens_k, block_table, batch, scale,
          softcap, causal, bottom_right, window_left, window_right, dropout_p, seed, offset, true);
  if (num_threads > 0 && num_threads_override() == 0 && !in_forked_child())
    pr.p.num_threads = num_threads;
  Status s;
  {
    py::gil_scoped_release release;
    s = cpu::active_kernels()->attention_fwd(pr.p);
  }
  check_status(s, kFn);
}

// Gradients. dq/dk/dv are written in place with q/k/v's shapes; out/lse are the forward's.
void attention_backward_entry(py::handle dout_o, py::handle q, py::handle k, py::handle v,
                              py::handle out, py::handle lse, py::handle dq_o, py::handle dk_o,
                              py::handle dv_o, py::handle mask, py::handle alibi, py::handle cu_q,
                              py::handle cu_k, int64_t batch, double scale, double softcap,
                              bool causal, bool bottom_right, int64_t window_left,
                              int64_t window_right, double dropout_p, uint64_t seed,
                              uint64_t offset, int num_threads) {
  Prepared pr;
  require(!lse.is_none(), "lse (from the forward with return_lse=True) is required");
  prepare(pr, q, k, v, out, lse, mask, alibi, cu_q, cu_k, py::none(), py::none(), batch, scale,
          softcap, causal, bottom_right, window_left, window_right, dropout_p, seed, offset, false);
  if (num_threads > 0 && num_threads_override() == 0 && !in_forked_child())
    pr.p.num_threads = num_threads;
  AttentionBwdParams bp;
  bp.fwd = pr.p;
  Tensor qt = to_tensor(q, kFn, "q", false), kt = to_tensor(k, kFn, "k", false),
         vt = to_tensor(v, kFn, "v", false), ot = to_tensor(out, kFn, "out", false);
  Tensor dout = to_tensor(dout_o, kFn, "dout", false);
  Tensor dq = to_tensor(dq_o, kFn, "dq", true), dk = to_tensor(dk_o, kFn, "dk", true),
         dv = to_tensor(dv_o, kFn, "dv", true);
  if (kt.dtype != qt.dtype)
    throw_type("attention_backward: k/v must have q's dtype (mixed-precision k/v are forward-only)");
  auto same = [](const Tensor& a, const Tensor& b) {
    if (a.ndim != b.ndim || a.dtype != b.dtype) return false;
    for (int d = 0; d < a.ndim; ++d)
      if (a.shape[d] != b.shape[d]) return false;
    return true;
  };
  require(same(dout, ot), "dout must have out's shape and dtype " + shape_str(ot));
  require(same(dq, qt) && same(dk, kt) && same(dv, vt), "dq/dk/dv must have the shapes of q/k/v");
  for (const Tensor* t : {&dout, &dq, &dk, &dv})
    require(t->ndim == 4 && (t->shape[3] <= 1 || t->strides[3] == 1 || t->numel() == 0),
            "gradients must be contiguous along the head dim");
  for (const Tensor* g : {&dq, &dk, &dv}) {
    for (const Tensor* t : {&qt, &kt, &vt, &ot, &dout})
      require(!may_overlap(*g, *t), "a gradient output overlaps an input");
  }
  require(!may_overlap(dq, dk) && !may_overlap(dq, dv) && !may_overlap(dk, dv),
          "dq, dk and dv must not overlap");
  bp.dout = dout.data;
  bp.dq = dq.data;
  bp.dk = dk.data;
  bp.dv = dv.data;
  for (int i = 0; i < 3; ++i) {
    bp.dout_stride[i] = dout.strides[i];
    bp.dq_stride[i] = dq.strides[i];
    bp.dk_stride[i] = dk.strides[i];
    bp.dv_stride[i] = dv.strides[i];
  }
  Status st;
  {
    py::gil_scoped_release release;
    st = cpu::active_kernels()->attention_bwd(bp);
  }
  check_status(st, "attention_backward");
}

// The dropout keep-mask (B, H, Sq, Sk) the kernels draw for (seed, offset): a debug/test aid.
void dropout_mask_entry(py::handle out_o, double p, uint64_t seed, uint64_t offset, int64_t num_heads) {
  Tensor out = to_tensor(out_o, "dropout_mask", "out", true);
  require(out.dtype == DType::boolean && out.ndim == 4, "out must be a 4-D bool array");
  uint8_t* o = static_cast<uint8_t*>(out.data);
  for (int64_t b = 0; b < out.shape[0]; ++b)
    for (int64_t h = 0; h < out.shape[1]; ++h)
      for (int64_t i = 0; i < out.shape[2]; ++i) {
        const DropoutRow dr = dropout_row(seed, offset, b, h, num_heads, i, float(p));
        uint8_t* row = o + b * out.strides[0] + h * out.strides[1] + i * out.strides[2];
        std::vector<uint8_t> keep(size_t(out.shape[3]));
        dropout_keep(dr, 0, out.shape[3], keep.data());
        for (int64_t j = 0; j < out.shape[3]; ++j) row[j * out.strides[3]] = keep[size_t(j)];
      }
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("attention", &attention_entry, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("mask"), py::arg("alibi"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("seqlens_k"), py::arg("block_table"), py::arg("batch"),
        py::arg("scale"), py::arg("softcap"), py::arg("causal"), py::arg("bottom_right"),
        py::arg("window_left"), py::arg("window_right"), py::arg("dropout_p") = 0.0,
        py::arg("seed") = 0, py::arg("offset") = 0, py::arg("num_threads") = 0,
        "Attention forward on canonical (B, H, S, D) views (validated). num_threads > 0 is the "
        "caller's count (attnkit.torch passes torch's), used unless set_num_threads overrides.");
  m.def("attention_backward", &attention_backward_entry, py::arg("dout"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"),
        py::arg("dv"), py::arg("mask"), py::arg("alibi"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("batch"), py::arg("scale"), py::arg("softcap"),
        py::arg("causal"), py::arg("bottom_right"), py::arg("window_left"),
        py::arg("window_right"), py::arg("dropout_p") = 0.0, py::arg("seed") = 0,
        py::arg("offset") = 0, py::arg("num_threads") = 0,
        "Attention backward on canonical views (validated).");
  m.def("dropout_mask", &dropout_mask_entry, py::arg("out"), py::arg("p"), py::arg("seed"),
        py::arg("offset"), py::arg("num_heads"), "Fill a bool (B,H,Sq,Sk) array with the keep mask.");
}

}  // namespace attnkit
