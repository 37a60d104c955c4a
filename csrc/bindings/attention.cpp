// attnkit._C.attention / attention_backward: the Python layer hands canonical (B, H, S, D)
// views (layouts, defaults and broadcasting are done there); this checks everything the
// kernels rely on for memory safety, fills AttentionParams and calls the kernel.
#include <algorithm>
#include <cmath>
#include <cstring>
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

Tensor optional(py::handle obj, const std::string& fn, const char* name, bool writeable) {
  return to_tensor_or_none(obj, fn.c_str(), name, writeable);
}

// Int64 vector argument (None -> empty).
std::vector<int64_t> int_vector(py::handle obj, const std::string& fn, const char* name) {
  std::vector<int64_t> v;
  if (obj.is_none()) return v;
  Tensor t = to_tensor(obj, fn.c_str(), name, false);
  ATTNKIT_REQUIRE(fn, t.dtype == DType::i64 && t.ndim == 1, std::string(name) + " must be a 1-D int64 array");
  const int64_t* d = static_cast<const int64_t*>(t.data);
  v.reserve(size_t(t.shape[0]));
  for (int64_t i = 0; i < t.shape[0]; ++i) v.push_back(d[i * t.strides[0]]);
  return v;
}

struct Prepared {
  AttentionParams p;
  std::vector<int64_t> cu_q, cu_k, seqlens_k, block_table;
};

// Sequence description of the CPU kernels (host vectors): varlen offsets, cache lengths and
// pages, all checked against the shapes before anything is written.
void sequences(Prepared& pr, const std::string& fn, const Tensor& q, const Tensor& k,
               py::handle cu_q_o, py::handle cu_k_o, py::handle seqlens_o,
               py::handle block_table_o) {
  AttentionParams& p = pr.p;
  const int64_t batch = p.batch;
  pr.cu_q = int_vector(cu_q_o, fn, "cu_seqlens_q");
  pr.cu_k = int_vector(cu_k_o, fn, "cu_seqlens_k");
  std::vector<int64_t> lens = int_vector(seqlens_o, fn, "cache_seqlens");
  if (!pr.cu_q.empty()) {
    ATTNKIT_REQUIRE(fn, int64_t(pr.cu_q.size()) == batch + 1 && int64_t(pr.cu_k.size()) == batch + 1,
            "cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries");
    for (int64_t b = 0; b < batch; ++b) {
      ATTNKIT_REQUIRE(fn, pr.cu_q[b] >= 0 && pr.cu_q[b] <= pr.cu_q[b + 1], "cu_seqlens_q must be non-decreasing from 0");
      ATTNKIT_REQUIRE(fn, pr.cu_k[b] >= 0 && pr.cu_k[b] <= pr.cu_k[b + 1], "cu_seqlens_k must be non-decreasing from 0");
    }
    ATTNKIT_REQUIRE(fn, pr.cu_q[0] == 0 && pr.cu_k[0] == 0, "cu_seqlens must start at 0");
    ATTNKIT_REQUIRE(fn, pr.cu_q[batch] == q.shape[2], "cu_seqlens_q[-1] = " + std::to_string(pr.cu_q[batch]) +
                                                  " but q has " + std::to_string(q.shape[2]) + " tokens");
    ATTNKIT_REQUIRE(fn, pr.cu_k[batch] == k.shape[2], "cu_seqlens_k[-1] = " + std::to_string(pr.cu_k[batch]) +
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
  const int64_t n_new = pr.p.n_new;
  // (given but empty for batch 0: then nothing is appended)
  ATTNKIT_REQUIRE(fn, n_new == 0 || !seqlens_o.is_none(), "k/v need cache_seqlens");
  int64_t capacity = k.shape[2];
  int64_t pages = 0;
  if (!block_table_o.is_none()) {
    ATTNKIT_REQUIRE(fn, !seqlens_o.is_none(), "block_table needs cache_seqlens");
    Tensor bt = to_tensor(block_table_o, fn.c_str(), "block_table", false);
    ATTNKIT_REQUIRE(fn, bt.dtype == DType::i64 && bt.ndim == 2 && bt.shape[0] == batch,
            "block_table must be an int64 array of shape (batch, max_blocks)");
    ATTNKIT_REQUIRE(fn, k.shape[2] >= 1, "the page size must be at least 1");
    pages = k.shape[0];
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
  }
  if (!lens.empty()) {
    ATTNKIT_REQUIRE(fn, int64_t(lens.size()) == batch, "cache_seqlens must have batch entries");
    pr.seqlens_k.resize(size_t(batch));
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t len = lens[size_t(b)], total = len + n_new;
      ATTNKIT_REQUIRE(fn, len >= 0 && total <= capacity,
              "cache_seqlens[" + std::to_string(b) + "] = " + std::to_string(len) + " plus " +
                  std::to_string(n_new) + " new tokens does not fit the cache capacity " +
                  std::to_string(capacity));
      pr.seqlens_k[size_t(b)] = total;
      // Every page a sequence reads or appends to must be a real page.
      for (int64_t j = 0; p.block_table && j < (total + p.page_size - 1) / p.page_size; ++j) {
        const int64_t e = pr.block_table[size_t(b * p.block_table_stride + j)];
        ATTNKIT_REQUIRE(fn, e >= 0 && e < pages,
                "block_table[" + std::to_string(b) + ", " + std::to_string(j) + "] = " +
                    std::to_string(e) + " is not a page index in [0, " + std::to_string(pages) + ")");
      }
    }
    p.seqlens_k = pr.seqlens_k.data();
  }
}

// q (B|1, H, Sq, D), k (B|P, Hkv, Sk, D), v (.., Dv), out (B|1, H, Sq, Dv), lse (B|1, H, Sq).
void prepare(Prepared& pr, const std::string& fn, py::handle q_o, py::handle k_o, py::handle v_o,
             py::handle out_o, py::handle lse_o, py::handle mask_o, py::handle alibi_o,
             py::handle cu_q_o, py::handle cu_k_o, py::handle seqlens_k_o,
             py::handle block_table_o, py::handle k_new_o, py::handle v_new_o,
             const AttentionOptions& opts, bool backward, py::handle k_scale_o = py::none(),
             py::handle v_scale_o = py::none()) {
  const char* f = fn.c_str();
  const bool appending = !k_new_o.is_none() || !v_new_o.is_none();
  AttentionTensors t;
  t.q = to_tensor(q_o, f, "q", false);
  t.k = to_tensor(k_o, f, appending ? "k_cache" : "k", appending);
  t.v = to_tensor(v_o, f, appending ? "v_cache" : "v", appending);
  t.out = to_tensor(out_o, f, "out", !backward);
  t.lse = optional(lse_o, fn, "lse", !backward);
  t.mask = optional(mask_o, fn, "mask", false);
  t.alibi = optional(alibi_o, fn, "alibi_slopes", false);
  t.k_new = optional(k_new_o, fn, "k", false);
  t.v_new = optional(v_new_o, fn, "v", false);
  t.k_scale = optional(k_scale_o, fn, "k_scale", appending);
  t.v_scale = optional(v_scale_o, fn, "v_scale", appending);
  t.paged = !block_table_o.is_none();
  t.varlen = !cu_q_o.is_none();
  t.backward = backward;
  attention_params(fn, t, opts, &pr.p);
  sequences(pr, fn, t.q, t.k, cu_q_o, cu_k_o, seqlens_k_o, block_table_o);
  pr.p.num_threads = resolve_num_threads();
}

void attention_entry(py::handle q, py::handle k, py::handle v, py::handle out, py::handle lse,
                     py::handle mask, py::handle alibi, py::handle cu_q, py::handle cu_k,
                     py::handle seqlens_k, py::handle block_table, int64_t batch, double scale,
                     double softcap, bool causal, bool bottom_right, int64_t window_left,
                     int64_t window_right, double dropout_p, uint64_t seed, uint64_t offset,
                     int num_threads, py::handle k_new, py::handle v_new, const std::string& fn,
                     py::handle k_scale, py::handle v_scale) {
  Prepared pr;
  const AttentionOptions opts{batch, scale, softcap, causal, bottom_right, window_left,
                              window_right, dropout_p, seed, offset};
  prepare(pr, fn, q, k, v, out, lse, mask, alibi, cu_q, cu_k, seqlens_k, block_table, k_new,
          v_new, opts, false, k_scale, v_scale);
  if (num_threads > 0 && num_threads_override() == 0 && !in_forked_child())
    pr.p.num_threads = num_threads;
  Status s;
  {
    py::gil_scoped_release release;
    s = cpu::active_kernels()->attention_fwd(pr.p);
  }
  check_status(s, fn.c_str());
}

// Gradients. dq/dk/dv are written in place with q/k/v's shapes; out/lse are the forward's.
void attention_backward_entry(py::handle dout_o, py::handle q, py::handle k, py::handle v,
                              py::handle out, py::handle lse, py::handle dq_o, py::handle dk_o,
                              py::handle dv_o, py::handle mask, py::handle alibi, py::handle cu_q,
                              py::handle cu_k, int64_t batch, double scale, double softcap,
                              bool causal, bool bottom_right, int64_t window_left,
                              int64_t window_right, double dropout_p, uint64_t seed,
                              uint64_t offset, int num_threads) {
  const std::string fn = "attention_backward";
  Prepared pr;
  ATTNKIT_REQUIRE(fn, !lse.is_none(), "lse (from the forward with return_lse=True) is required");
  const AttentionOptions opts{batch, scale, softcap, causal, bottom_right, window_left,
                              window_right, dropout_p, seed, offset};
  prepare(pr, fn, q, k, v, out, lse, mask, alibi, cu_q, cu_k, py::none(), py::none(), py::none(),
          py::none(), opts, true);
  if (num_threads > 0 && num_threads_override() == 0 && !in_forked_child())
    pr.p.num_threads = num_threads;
  AttentionBwdParams bp;
  bp.fwd = pr.p;
  const char* f = fn.c_str();
  Tensor qt = to_tensor(q, f, "q", false), kt = to_tensor(k, f, "k", false),
         vt = to_tensor(v, f, "v", false), ot = to_tensor(out, f, "out", false);
  Tensor dout = to_tensor(dout_o, f, "dout", false);
  Tensor dq = to_tensor(dq_o, f, "dq", true), dk = to_tensor(dk_o, f, "dk", true),
         dv = to_tensor(dv_o, f, "dv", true);
  backward_grad_params(fn, qt, kt, vt, ot, dout, dq, dk, dv, &bp);
  Status st;
  {
    py::gil_scoped_release release;
    st = cpu::active_kernels()->attention_bwd(bp);
  }
  check_status(st, "attention_backward");
}

void quantize_entry(py::handle x_o, py::handle q_o, py::handle scale_o, const std::string& fn) {
  const char* f = fn.c_str();
  const Tensor x = to_tensor(x_o, f, "x", false);
  const Tensor q = to_tensor(q_o, f, "codes", true);
  const Tensor sc = to_tensor(scale_o, f, "scale", true);
  QuantizeParams p;
  if (!quantize_params(fn, x, q, sc, &p)) return;
  p.num_threads = resolve_num_threads();
  Status s;
  {
    py::gil_scoped_release release;
    s = cpu::active_kernels()->quantize_kv(p);
  }
  check_status(s, f);
}

void merge_entry(py::handle outs_o, py::handle lses_o, py::handle out_o, py::handle lse_o,
                 int num_threads, const std::string& fn) {
  const char* f = fn.c_str();
  const Tensor outs = to_tensor(outs_o, f, "outs", false);
  const Tensor lses = to_tensor(lses_o, f, "lses", false);
  const Tensor out = to_tensor(out_o, f, "out", true);
  const Tensor lse = to_tensor(lse_o, f, "lse", true);
  MergeParams p;
  if (!merge_params(fn, outs, lses, out, lse, &p)) return;
  p.num_threads = resolve_num_threads();
  if (num_threads > 0 && num_threads_override() == 0 && !in_forked_child()) p.num_threads = num_threads;
  Status s;
  {
    py::gil_scoped_release release;
    s = cpu::active_kernels()->merge_attention_states(p);
  }
  check_status(s, f);
}

// The dropout keep-mask (B, H, Sq, Sk) the kernels draw for (seed, offset): a debug/test aid.
void dropout_mask_entry(py::handle out_o, double p, uint64_t seed, uint64_t offset, int64_t num_heads) {
  Tensor out = to_tensor(out_o, "dropout_mask", "out", true);
  ATTNKIT_REQUIRE("dropout_mask", out.dtype == DType::boolean && out.ndim == 4, "out must be a 4-D bool array");
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
        py::arg("cu_seqlens_k"), py::arg("cache_seqlens"), py::arg("block_table"), py::arg("batch"),
        py::arg("scale"), py::arg("softcap"), py::arg("causal"), py::arg("bottom_right"),
        py::arg("window_left"), py::arg("window_right"), py::arg("dropout_p") = 0.0,
        py::arg("seed") = 0, py::arg("offset") = 0, py::arg("num_threads") = 0,
        py::arg("k_new") = py::none(), py::arg("v_new") = py::none(),
        py::arg("fn") = std::string("attention"), py::arg("k_scale") = py::none(),
        py::arg("v_scale") = py::none(),
        "Attention forward on canonical (B, H, S, D) views (validated). num_threads > 0 is the "
        "caller's count (attnkit.torch passes torch's), used unless set_num_threads overrides. "
        "k_new/v_new (B, Hkv, n, D) are appended to the caches k/v at cache_seqlens[b] after "
        "every check has passed; fn names the public function in messages. 8-bit (int8 / "
        "float8_e4m3fn) k/v take k_scale/v_scale, float32 (B|pages, Hkv, S) views; appended "
        "rows (float32/float16/bfloat16) are quantized into them.");
  m.def("quantize_kv", &quantize_entry, py::arg("x"), py::arg("q"), py::arg("scale"),
        py::arg("fn") = std::string("quantize_kv"),
        "Quantize the rows (last dim) of x into the codes q (int8 / float8_e4m3fn, x's shape) and "
        "float32 scale (x's shape without the last dim); outputs allocated by the caller.");
  m.def("merge_attention_states", &merge_entry, py::arg("outs"), py::arg("lses"), py::arg("out"),
        py::arg("lse"), py::arg("num_threads") = 0,
        py::arg("fn") = std::string("merge_attention_states"),
        "Merge N partial attention states (outs (N, ..., Sq, Dv), lses (N, ..., Sq)) into out and "
        "lse (allocated by the caller; out may be outs[0] and lse lses[0]: in place). "
        "num_threads > 0 is the caller's count, used unless set_num_threads overrides.");
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
