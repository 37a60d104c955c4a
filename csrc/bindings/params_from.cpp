#include "params_from.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <string>
#include <utility>

namespace attnkit {

bool is_float_dtype(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::f16 || t == DType::bf16;
}

bool is_code_dtype(DType t) { return t == DType::i8 || t == DType::f8e4m3; }

bool quantize_params(const std::string& fn, const Tensor& x, const Tensor& q, const Tensor& scale,
                     QuantizeParams* p) {
  if (!(x.dtype == DType::f32 || x.dtype == DType::f16 || x.dtype == DType::bf16))
    throw_type(fn + ": x has dtype " + dtype_name(x.dtype) +
               "; expected float32, float16 or bfloat16");
  if (!is_code_dtype(q.dtype))
    throw_type(fn + ": internal: codes must be int8 or float8_e4m3fn, got " + dtype_name(q.dtype));
  if (scale.dtype != DType::f32) throw_type(fn + ": internal: scale must be float32");
  if (x.ndim < 1) throw_value(fn + ": x must have at least one dimension");
  const int nd = x.ndim;
  bool same = q.ndim == nd && scale.ndim == nd - 1;
  for (int d = 0; same && d < nd; ++d) same = q.shape[d] == x.shape[d] && (d == nd - 1 || scale.shape[d] == x.shape[d]);
  if (!same)
    throw_value(fn + ": internal: codes " + shape_str(q) + " / scale " + shape_str(scale) +
                " do not match x " + shape_str(x));
  const int64_t n = x.shape[nd - 1];
  if (n > 1 && x.numel() > 0 && (x.strides[nd - 1] != 1 || q.strides[nd - 1] != 1))
    throw_value(fn + ": x must be contiguous along its last dim");
  if (!q.writeable || !scale.writeable) throw_value(fn + ": internal: outputs are read-only");
  if (may_overlap(q, x) || may_overlap(scale, x) || may_overlap(q, scale))
    throw_value(fn + ": internal: the outputs overlap x or each other");
  if (x.numel() == 0) return false;
  p->x = x.data;
  p->x_dtype = x.dtype;
  p->q = q.data;
  p->q_dtype = q.dtype;
  p->scale = static_cast<float*>(scale.data);
  p->n = n;
  int k = 0;
  for (int d = 0; d < nd - 1; ++d) {
    if (x.shape[d] == 1) continue;
    if (scale.strides[d] == 0 || q.strides[d] == 0)
      throw_value(fn + ": internal: an output has a stride-0 dimension");
    p->outer_shape[k] = x.shape[d];
    p->x_outer_strides[k] = x.strides[d];
    p->q_outer_strides[k] = q.strides[d];
    p->scale_outer_strides[k] = scale.strides[d];
    ++k;
  }
  p->outer_ndim = k;
  return true;
}

namespace {

// part n of a stacked (N, ...) tensor as its own view
Tensor part_view(const Tensor& t, int64_t n) {
  Tensor v;
  v.data = static_cast<char*>(t.data) + n * t.strides[0] * itemsize(t.dtype);
  v.dtype = t.dtype;
  v.ndim = t.ndim - 1;
  v.writeable = t.writeable;
  for (int d = 1; d < t.ndim; ++d) {
    v.shape[d - 1] = t.shape[d];
    v.strides[d - 1] = t.strides[d];
  }
  return v;
}

// out may be exactly part 0 of the stacked input (then the parts must not overlap each other,
// so writing a row of out touches no other part), or must not overlap it at all.
void check_merge_alias(const std::string& fn, const Tensor& in, const Tensor& out, const char* in_name,
                       const char* out_name) {
  if (!may_overlap(in, out)) return;
  const Tensor p0 = part_view(in, 0);
  const bool parts_disjoint = in.shape[0] < 2 || !may_overlap(p0, part_view(in, 1));
  if (same_view(p0, out) && parts_disjoint) return;
  throw_value(fn + ": " + out_name + " overlaps " + in_name + "; pass a separate array, or exactly " +
              in_name + "[0] (a merge in place)");
}

}  // namespace

bool merge_params(const std::string& fn, const Tensor& outs, const Tensor& lses, const Tensor& out,
                  const Tensor& lse, MergeParams* p) {
  if (!is_float_dtype(outs.dtype))
    throw_type(fn + ": outs has dtype " + dtype_name(outs.dtype) +
               "; expected float32, float64, float16 or bfloat16");
  if (lses.dtype != DType::f32 && lses.dtype != DType::f64)
    throw_type(fn + ": lses has dtype " + dtype_name(lses.dtype) + "; expected float32 or float64");
  if (out.dtype != outs.dtype)
    throw_type(fn + ": out has dtype " + dtype_name(out.dtype) + " but outs has " +
               dtype_name(outs.dtype));
  if (lse.dtype != lses.dtype) throw_type(fn + ": internal: lse must have lses' dtype");
  const int nd = outs.ndim;
  if (nd < 3 || nd - 2 > kMaxDims)
    throw_value(fn + ": outs must be (N, ..., Sq, Dv) with at most " + std::to_string(kMaxDims) +
                " dims between N and Dv, got " + shape_str(outs));
  bool ok = lses.ndim == nd - 1 && out.ndim == nd - 1 && lse.ndim == nd - 2;
  for (int d = 0; ok && d < nd - 1; ++d) ok = lses.shape[d] == outs.shape[d];
  for (int d = 1; ok && d < nd; ++d) ok = out.shape[d - 1] == outs.shape[d];
  for (int d = 1; ok && d < nd - 1; ++d) ok = lse.shape[d - 1] == outs.shape[d];
  if (!ok)
    throw_value(fn + ": outs " + shape_str(outs) + ", lses " + shape_str(lses) + ", out " +
                shape_str(out) + " and lse " + shape_str(lse) +
                " do not agree: expected (N, ..., Sq, Dv), (N, ..., Sq), (..., Sq, Dv), (..., Sq)");
  if (outs.shape[0] < 1) throw_value(fn + ": outs must hold at least one part (N >= 1)");
  const int64_t dv = outs.shape[nd - 1];
  if (dv > 1 && ((outs.numel() > 0 && outs.strides[nd - 1] != 1) ||
                 (out.numel() > 0 && out.strides[nd - 2] != 1)))
    throw_value(fn + ": outs and out must be contiguous along their last dim");
  if (!out.writeable) throw_value(fn + ": out is read-only");
  if (!lse.writeable) throw_value(fn + ": internal: lse is read-only");
  check_merge_alias(fn, outs, out, "outs", "out");
  check_merge_alias(fn, lses, lse, "lses", "lse");
  if (may_overlap(out, lses) || may_overlap(lse, outs) || may_overlap(out, lse))
    throw_value(fn + ": out/lse overlap each other or the other input");
  if (lse.numel() == 0) return false;  // no rows (Dv = 0 still has lse values to compute)
  p->outs = outs.data;
  p->out_dtype = outs.dtype;
  p->lses = lses.data;
  p->lse_dtype = lses.dtype;
  p->out = out.data;
  p->lse_out = lse.data;
  p->parts = outs.shape[0];
  p->dv = dv;
  p->outs_part_stride = outs.strides[0];
  p->lses_part_stride = lses.strides[0];
  int k = 0;
  for (int d = 1; d < nd - 1; ++d) {  // the (..., Sq) row dims
    if (outs.shape[d] == 1) continue;
    if ((dv > 0 && out.strides[d - 1] == 0) || lse.strides[d - 1] == 0)
      throw_value(fn + ": out and lse must not have stride-0 (broadcast) dims");
    p->outer_shape[k] = outs.shape[d];
    p->outs_outer_strides[k] = outs.strides[d];
    p->lses_outer_strides[k] = lses.strides[d];
    p->out_outer_strides[k] = out.strides[d - 1];
    p->lse_out_outer_strides[k] = lse.strides[d - 1];
    ++k;
  }
  p->outer_ndim = k;
  return true;
}

bool softmax_params(const Tensor& x, const Tensor& out, int64_t axis, SoftmaxParams* p) {
  if (!is_float_dtype(x.dtype))
    throw_type(std::string("softmax: x has dtype ") + dtype_name(x.dtype) +
               "; expected float32, float64, float16 or bfloat16");
  if (out.dtype != x.dtype)
    throw_type(std::string("softmax: out has dtype ") + dtype_name(out.dtype) + " but x has " +
               dtype_name(x.dtype));
  if (out.ndim != x.ndim || !std::equal(x.shape, x.shape + x.ndim, out.shape))
    throw_value("softmax: out has shape " + shape_str(out) + " but x has " + shape_str(x));
  const int nd = std::max(x.ndim, 1);
  if (axis < -nd || axis >= nd)
    throw_value("softmax: axis " + std::to_string(axis) + " is out of range for x with " +
                std::to_string(x.ndim) + " dimension(s)");
  if (!same_view(x, out) && may_overlap(x, out))
    throw_value("softmax: out overlaps x; pass out=x (the very same array) for in place, or "
                "a separate array");
  if (x.numel() == 0) return false;
  if (self_overlapping(out))
    throw_value("softmax: out has overlapping elements (a stride-0 or self-overlapping view)");
  p->x = x.data;
  p->out = out.data;
  p->dtype = x.dtype;
  if (x.ndim == 0) {
    p->n = 1;
  } else {
    const int a = int(axis < 0 ? axis + x.ndim : axis);
    p->n = x.shape[a];
    p->x_stride = x.strides[a];
    p->out_stride = out.strides[a];
    // Outer dims, largest x stride first so a contiguous neighbour ends up last (the kernel
    // vectorizes across it), merged where both x and out allow.
    int dims[kMaxTensorDims], nd_outer = 0;
    for (int d = 0; d < x.ndim; ++d)
      if (d != a && x.shape[d] > 1) dims[nd_outer++] = d;
    std::stable_sort(dims, dims + nd_outer, [&](int i, int j) {
      return std::llabs(x.strides[i]) > std::llabs(x.strides[j]);
    });
    int64_t shp[kMaxTensorDims], xs[kMaxTensorDims], os[kMaxTensorDims];
    int k = 0;
    for (int i = 0; i < nd_outer; ++i) {
      const int d = dims[i];
      if (k > 0 && xs[k - 1] == x.strides[d] * x.shape[d] &&
          os[k - 1] == out.strides[d] * x.shape[d]) {
        shp[k - 1] *= x.shape[d];
        xs[k - 1] = x.strides[d];
        os[k - 1] = out.strides[d];
        continue;
      }
      shp[k] = x.shape[d];
      xs[k] = x.strides[d];
      os[k] = out.strides[d];
      ++k;
    }
    if (k > kMaxDims)
      throw_value("softmax: x has too many non-mergeable dimensions (" + std::to_string(k + 1) +
                  "); at most " + std::to_string(kMaxDims + 1) + " are supported");
    p->outer_ndim = k;
    std::copy(shp, shp + k, p->outer_shape);
    std::copy(xs, xs + k, p->x_outer_strides);
    std::copy(os, os + k, p->out_outer_strides);
  }
  return true;
}

bool gemm_params(const Tensor& a, const Tensor& b, const Tensor& out, GemmParams* p) {
  if (!is_float_dtype(a.dtype))
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
  if (out.numel() == 0) return false;
  if (self_overlapping(out))
    throw_value("matmul: out has overlapping elements (a stride-0 or self-overlapping view)");
  if (may_overlap(out, a) || may_overlap(out, b))
    throw_value("matmul: out overlaps an input (a or b); pass a separate array");

  p->a = a.data;
  p->b = b.data;
  p->c = out.data;
  p->dtype = a.dtype;
  p->m = m;
  p->n = n;
  p->k = k;
  p->rs_a = a.strides[nd - 2];
  p->cs_a = a.strides[nd - 1];
  p->rs_b = b.strides[nd - 2];
  p->cs_b = b.strides[nd - 1];
  p->rs_c = out.strides[nd - 2];
  p->cs_c = out.strides[nd - 1];
  // Size-1 dims: any stride is as good as a unit one (lets (M,1) and (1,N) views run in place).
  if (m == 1) p->rs_a = k, p->rs_c = n * p->cs_c;
  if (k == 1) p->cs_a = 1, p->rs_b = n * p->cs_b;
  if (n == 1) p->cs_b = 1, p->cs_c = 1;
  int bd = 0;
  for (int d = 0; d < nd - 2; ++d) {
    if (a.shape[d] == 1) continue;
    if (bd >= kMaxDims) throw_value("matmul: too many batch dimensions");
    p->batch_shape[bd] = a.shape[d];
    p->a_batch_strides[bd] = a.strides[d];
    p->b_batch_strides[bd] = b.strides[d];
    p->c_batch_strides[bd] = out.strides[d];
    ++bd;
  }
  p->batch_ndim = bd;
  return true;
}

namespace {

struct Checker {
  const std::string& fn;
  void rows(const Tensor& t, const char* name) const {
    ATTNKIT_REQUIRE(fn, t.ndim == 4, std::string(name) + " must be 4-D here, got " + shape_str(t));
    ATTNKIT_REQUIRE(fn, t.shape[3] <= 1 || t.strides[3] == 1 || t.numel() == 0,
                    std::string(name) + " must be contiguous along its last (head) dim");
  }
};

bool present(const Tensor& t) { return t.ndim >= 0; }

}  // namespace

void attention_params(const std::string& fn, const AttentionTensors& t,
                      const AttentionOptions& o, AttentionParams* p) {
  const Checker c{fn};
  const Tensor &q = t.q, &k = t.k, &v = t.v, &out = t.out;
  c.rows(q, "q");
  c.rows(k, t.k_new.ndim >= 0 ? "k_cache" : "k");
  c.rows(v, t.k_new.ndim >= 0 ? "v_cache" : "v");
  c.rows(out, "out");
  if (!is_float_dtype(q.dtype))
    throw_type(fn + ": q has dtype " + dtype_name(q.dtype) +
               "; expected float32, float64, float16 or bfloat16");
  if (k.dtype != v.dtype)
    throw_type(fn + ": k has dtype " + dtype_name(k.dtype) + " but v has " + dtype_name(v.dtype));
  const bool codes = is_code_dtype(k.dtype);
  const bool kv_ok = k.dtype == q.dtype ||
                     (q.dtype == DType::f32 && (k.dtype == DType::f16 || k.dtype == DType::bf16)) ||
                     (codes && q.dtype != DType::f64);
  if (!kv_ok)
    throw_type(fn + ": q has dtype " + dtype_name(q.dtype) + " but k/v have " +
               dtype_name(k.dtype) + (codes ? "; 8-bit caches need a float32, float16 or bfloat16 q"
                                            : "; k/v must match q, or be float16/bfloat16 with a "
                                              "float32 q"));
  if (out.dtype != q.dtype)
    throw_type(fn + ": out has dtype " + dtype_name(out.dtype) + " but q has " + dtype_name(q.dtype));
  if (!t.backward && !out.writeable) throw_value(fn + ": out is read-only");

  p->batch = o.batch;
  p->num_heads = q.shape[1];
  p->num_kv_heads = k.shape[1];
  p->seqlen_q = q.shape[2];
  p->seqlen_k = k.shape[2];
  p->head_dim = q.shape[3];
  p->head_dim_v = v.shape[3];
  ATTNKIT_REQUIRE(c.fn, o.batch >= 0, "negative batch");
  ATTNKIT_REQUIRE(c.fn, p->num_kv_heads > 0 && p->num_heads % p->num_kv_heads == 0,
            "q has " + std::to_string(p->num_heads) + " heads, not a multiple of k's " +
                std::to_string(p->num_kv_heads));
  ATTNKIT_REQUIRE(c.fn, k.shape[3] == p->head_dim, "k has head_dim " + std::to_string(k.shape[3]) +
                                           " but q has " + std::to_string(p->head_dim));
  ATTNKIT_REQUIRE(c.fn, v.shape[0] == k.shape[0] && v.shape[1] == k.shape[1] && v.shape[2] == k.shape[2],
            "v has shape " + shape_str(v) + ", inconsistent with k " + shape_str(k));
  ATTNKIT_REQUIRE(c.fn, out.shape[0] == q.shape[0] && out.shape[1] == q.shape[1] &&
                out.shape[2] == q.shape[2] && out.shape[3] == p->head_dim_v,
            "out has shape " + shape_str(out) + " but the result is (" +
                std::to_string(q.shape[0]) + ", " + std::to_string(p->num_heads) + ", " +
                std::to_string(p->seqlen_q) + ", " + std::to_string(p->head_dim_v) + ")");
  ATTNKIT_REQUIRE(c.fn, p->head_dim >= 1 && p->head_dim_v >= 1, "head dims must be at least 1");
  if (t.varlen) {
    ATTNKIT_REQUIRE(c.fn, q.shape[0] == 1 && k.shape[0] == 1, "internal: varlen operands must be (1, H, T, D)");
  } else {
    ATTNKIT_REQUIRE(c.fn, q.shape[0] == o.batch, "internal: batch mismatch");
    if (!t.paged) ATTNKIT_REQUIRE(c.fn, k.shape[0] == o.batch, "k and q have different batch sizes");
  }

  p->q = q.data;
  p->k = k.data;
  p->v = v.data;
  p->out = out.data;
  p->q_dtype = q.dtype;
  p->kv_dtype = k.dtype;
  for (int i = 0; i < 3; ++i) {
    p->q_stride[i] = q.strides[i];
    p->k_stride[i] = k.strides[i];
    p->v_stride[i] = v.strides[i];
    p->out_stride[i] = out.strides[i];
  }

  if (present(t.lse)) {
    const Tensor& lse = t.lse;
    ATTNKIT_REQUIRE(c.fn, lse.dtype == DType::f32 && lse.ndim == 3 && lse.shape[0] == q.shape[0] &&
                  lse.shape[1] == q.shape[1] && lse.shape[2] == q.shape[2],
              "lse must be float32 of shape (batch, heads, seqlen_q)");
    p->lse = static_cast<float*>(lse.data);
    for (int i = 0; i < 3; ++i) p->lse_stride[i] = lse.strides[i];
  }
  if (present(t.mask)) {
    const Tensor& mk = t.mask;
    ATTNKIT_REQUIRE(c.fn, !t.varlen && !t.paged, "internal: no mask with varlen or paged caches");
    ATTNKIT_REQUIRE(c.fn, mk.ndim == 4 && mk.shape[0] == o.batch && mk.shape[1] == p->num_heads &&
                  mk.shape[2] == p->seqlen_q && mk.shape[3] == p->seqlen_k,
              "internal: mask must be broadcast to (B, H, Sq, Sk)");
    ATTNKIT_REQUIRE(c.fn, mk.dtype == DType::boolean || is_float_dtype(mk.dtype), "mask must be bool or float");
    p->mask = mk.data;
    p->mask_dtype = mk.dtype;
    for (int i = 0; i < 4; ++i) p->mask_stride[i] = mk.strides[i];
  }
  if (present(t.alibi)) {
    const Tensor& al = t.alibi;
    ATTNKIT_REQUIRE(c.fn, al.dtype == DType::f32 && al.ndim == 2 && al.shape[0] == o.batch &&
                  al.shape[1] == p->num_heads,
              "internal: alibi_slopes must be float32 (B, H)");
    p->alibi_slopes = static_cast<const float*>(al.data);
    p->alibi_stride[0] = al.strides[0];
    p->alibi_stride[1] = al.strides[1];
  }
  const bool appending = present(t.k_new) || present(t.v_new);
  if (codes) {
    // One float32 scale per row of each 8-bit cache, shaped like the rows; written on append.
    const char* kname = appending ? "k_cache" : "k";
    ATTNKIT_REQUIRE(c.fn, present(t.k_scale) && present(t.v_scale),
              std::string(kname) + " is " + dtype_name(k.dtype) +
                  ": k_scale and v_scale (float32, one per cache row) are required");
    for (const auto& sc : {std::make_pair(&t.k_scale, "k_scale"), std::make_pair(&t.v_scale, "v_scale")}) {
      const Tensor& st = *sc.first;
      if (st.dtype != DType::f32)
        throw_type(fn + ": " + sc.second + " has dtype " + dtype_name(st.dtype) + "; expected float32");
      ATTNKIT_REQUIRE(c.fn, st.ndim == 3 && st.shape[0] == k.shape[0] && st.shape[1] == k.shape[1] &&
                    st.shape[2] == k.shape[2],
                std::string(sc.second) + " must have one entry per cache row, shape (" +
                    std::to_string(k.shape[0]) + ", " + std::to_string(k.shape[2]) + ", " +
                    std::to_string(k.shape[1]) + ") in the caches' order");
      ATTNKIT_REQUIRE(c.fn, !appending || st.writeable,
                std::string(sc.second) + " is read-only but k/v were given to append");
      for (const Tensor* cache : {&k, &v})
        ATTNKIT_REQUIRE(c.fn, !may_overlap(st, *cache), std::string(sc.second) + " overlaps the caches");
    }
    ATTNKIT_REQUIRE(c.fn, !appending || !may_overlap(t.k_scale, t.v_scale), "k_scale and v_scale overlap");
    p->k_scale = static_cast<const float*>(t.k_scale.data);
    p->v_scale = static_cast<const float*>(t.v_scale.data);
    for (int i = 0; i < 3; ++i) {
      p->k_scale_stride[i] = t.k_scale.strides[i];
      p->v_scale_stride[i] = t.v_scale.strides[i];
    }
  } else {
    ATTNKIT_REQUIRE(c.fn, !present(t.k_scale) && !present(t.v_scale),
              std::string("k_scale/v_scale go with int8 or float8_e4m3fn caches, but the caches "
                          "are ") + dtype_name(k.dtype));
  }
  if (appending) {
    ATTNKIT_REQUIRE(c.fn, present(t.k_new) && present(t.v_new), "pass both k and v to append, or neither");
    const Tensor &kn = t.k_new, &vn = t.v_new;
    c.rows(kn, "k");
    c.rows(vn, "v");
    if (codes) {
      if (!(kn.dtype == DType::f32 || kn.dtype == DType::f16 || kn.dtype == DType::bf16) ||
          vn.dtype != kn.dtype)
        throw_type(fn + ": k and v have dtypes " + dtype_name(kn.dtype) + " / " +
                   dtype_name(vn.dtype) + "; rows appended to an 8-bit cache must be float32, "
                   "float16 or bfloat16 (one dtype), quantized on append");
    } else {
      ATTNKIT_REQUIRE(c.fn, kn.dtype == k.dtype && vn.dtype == k.dtype,
                std::string("k and v must have the caches' dtype ") + dtype_name(k.dtype));
    }
    p->new_dtype = kn.dtype;
    ATTNKIT_REQUIRE(c.fn, kn.shape[0] == o.batch && kn.shape[1] == p->num_kv_heads &&
                  kn.shape[3] == p->head_dim && vn.shape[0] == o.batch &&
                  vn.shape[1] == p->num_kv_heads && vn.shape[2] == kn.shape[2] &&
                  vn.shape[3] == p->head_dim_v,
              "k/v have shapes " + shape_str(kn) + " / " + shape_str(vn) +
                  ", inconsistent with the caches");
    ATTNKIT_REQUIRE(c.fn, k.writeable && v.writeable, "the caches are read-only but k/v were given to append");
    for (const Tensor* n : {&kn, &vn})
      for (const Tensor* cache : {&k, &v})
        ATTNKIT_REQUIRE(c.fn, !may_overlap(*n, *cache), "k/v overlap the caches they are appended to");
    ATTNKIT_REQUIRE(c.fn, !may_overlap(k, v), "k_cache and v_cache overlap; appending would write one into the other");
    ATTNKIT_REQUIRE(c.fn, !self_overlapping(k) && !self_overlapping(v),
                    "k_cache/v_cache have overlapping elements (a stride-0 or self-overlapping view); appending would write one row over another");
    if (codes)
      ATTNKIT_REQUIRE(c.fn, !self_overlapping(t.k_scale) && !self_overlapping(t.v_scale),
                      "k_scale/v_scale have overlapping elements (a stride-0 or self-overlapping view)");
    if (codes)
      for (const Tensor* n : {&kn, &vn})
        for (const Tensor* sc : {&t.k_scale, &t.v_scale})
          ATTNKIT_REQUIRE(c.fn, !may_overlap(*n, *sc), "k/v overlap the scales they are appended to");
    p->k_new = kn.data;
    p->v_new = vn.data;
    p->n_new = kn.shape[2];
    for (int i = 0; i < 3; ++i) {
      p->k_new_stride[i] = kn.strides[i];
      p->v_new_stride[i] = vn.strides[i];
    }
  }
  ATTNKIT_REQUIRE(c.fn, std::isfinite(o.scale), "scale must be finite");
  ATTNKIT_REQUIRE(c.fn, std::isfinite(o.softcap) && o.softcap >= 0, "softcap must be a finite number >= 0");
  // Every dtype but float64 computes in float32: a larger scale or softcap would become inf.
  if (q.dtype != DType::f64) {
    ATTNKIT_REQUIRE(c.fn, std::fabs(o.scale) <= double(FLT_MAX),
                    std::string("scale is beyond float32's range (3.4e38), the compute type of ") + dtype_name(q.dtype) + " inputs");
    ATTNKIT_REQUIRE(c.fn, o.softcap <= double(FLT_MAX),
                    std::string("softcap is beyond float32's range (3.4e38), the compute type of ") + dtype_name(q.dtype) + " inputs");
  }
  ATTNKIT_REQUIRE(c.fn, o.window_left >= -1 && o.window_right >= -1, "window entries must be >= -1");
  ATTNKIT_REQUIRE(c.fn, o.dropout_p >= 0.0 && o.dropout_p < 1.0, "dropout_p must be in [0, 1)");
  p->scale = o.scale;
  p->softcap = o.softcap;
  p->causal = o.causal;
  p->bottom_right = o.bottom_right;
  // A window entry past any sequence the memory can hold bounds nothing: -1 (unbounded), so
  // the kernels' i + offset + right cannot overflow (window=(-1, sys.maxsize) wrapped around
  // and masked whole rows).
  constexpr int64_t kUnboundedWindow = int64_t(1) << 40;
  p->window_left = o.window_left > kUnboundedWindow ? -1 : o.window_left;
  p->window_right = o.window_right > kUnboundedWindow ? -1 : o.window_right;
  p->dropout_p = o.dropout_p;
  p->dropout_seed = o.seed;
  p->dropout_offset = o.offset;

  // Outputs never alias inputs (nor each other): the kernels read inputs after writing rows.
  // (The backward's outputs are dq/dk/dv, checked by its binding.)
  if (t.backward) return;
  ATTNKIT_REQUIRE(c.fn, !self_overlapping(out), "out has overlapping elements (a stride-0 or self-overlapping view)");
  if (present(t.lse))
    ATTNKIT_REQUIRE(c.fn, !self_overlapping(t.lse), "lse has overlapping elements (a stride-0 or self-overlapping view)");
  for (const Tensor* in : {&q, &k, &v, &t.k_new, &t.v_new, &t.mask, &t.alibi, &t.k_scale, &t.v_scale}) {
    if (!present(*in)) continue;
    ATTNKIT_REQUIRE(c.fn, !may_overlap(out, *in), "out overlaps an input; pass a separate array");
    if (present(t.lse)) ATTNKIT_REQUIRE(c.fn, !may_overlap(t.lse, *in), "lse overlaps an input");
  }
  if (present(t.lse)) ATTNKIT_REQUIRE(c.fn, !may_overlap(t.lse, out), "lse overlaps out");
}

void backward_grad_params(const std::string& fn, const Tensor& qt, const Tensor& kt, const Tensor& vt,
                          const Tensor& ot, const Tensor& dout, const Tensor& dq, const Tensor& dk,
                          const Tensor& dv, AttentionBwdParams* bp) {
  if (kt.dtype != qt.dtype)
    throw_type(fn + ": k/v must have q's dtype (mixed-precision k/v are forward-only)");
  auto same = [](const Tensor& a, const Tensor& b) {
    if (a.ndim != b.ndim || a.dtype != b.dtype) return false;
    for (int d = 0; d < a.ndim; ++d)
      if (a.shape[d] != b.shape[d]) return false;
    return true;
  };
  ATTNKIT_REQUIRE(fn, same(dout, ot), "dout must have out's shape and dtype " + shape_str(ot));
  ATTNKIT_REQUIRE(fn, same(dq, qt) && same(dk, kt) && same(dv, vt), "dq/dk/dv must have the shapes of q/k/v");
  for (const Tensor* t : {&dout, &dq, &dk, &dv})
    ATTNKIT_REQUIRE(fn, t->ndim == 4 && (t->shape[3] <= 1 || t->strides[3] == 1 || t->numel() == 0),
            "gradients must be contiguous along the head dim");
  for (const Tensor* g : {&dq, &dk, &dv}) {
    ATTNKIT_REQUIRE(fn, !self_overlapping(*g), "dq/dk/dv have overlapping elements (a stride-0 or self-overlapping view)");
    for (const Tensor* t : {&qt, &kt, &vt, &ot, &dout})
      ATTNKIT_REQUIRE(fn, !may_overlap(*g, *t), "a gradient output overlaps an input");
  }
  ATTNKIT_REQUIRE(fn, !may_overlap(dq, dk) && !may_overlap(dq, dv) && !may_overlap(dk, dv),
          "dq, dk and dv must not overlap");
  bp->dout = dout.data;
  bp->dq = dq.data;
  bp->dk = dk.data;
  bp->dv = dv.data;
  for (int i = 0; i < 3; ++i) {
    bp->dout_stride[i] = dout.strides[i];
    bp->dq_stride[i] = dq.strides[i];
    bp->dk_stride[i] = dk.strides[i];
    bp->dv_stride[i] = dv.strides[i];
  }
}

}  // namespace attnkit
