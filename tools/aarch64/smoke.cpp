// A C++ smoke test of the portable (scalar) kernel variant, for cross-built targets such as
// aarch64 under qemu-user, where the Python package cannot be tested directly here. It runs
// softmax, GEMM, attention (prefill, decode, backward) against naive double loops.
// Build and run: bash tools/check_aarch64.sh
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/kernels.h"

using namespace attnkit;

static int failures = 0;
static void expect(bool ok, const char* what, double err) {
  std::printf("%-28s %s (max error %.2e)\n", what, ok ? "ok" : "FAILED", err);
  failures += !ok;
}

int main() {
  const cpu::KernelTable* t = cpu::scalar::kernel_table();
  std::mt19937 gen(0);
  std::normal_distribution<float> nd;
  auto randv = [&](size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = nd(gen);
    return v;
  };

  {  // softmax over rows, including a long (chunked) row
    for (int64_t n : {37, 10000}) {
      const int64_t rows = 3;
      auto x = randv(size_t(rows * n));
      std::vector<float> out(x.size());
      SoftmaxParams p;
      p.x = x.data();
      p.out = out.data();
      p.n = n;
      p.outer_ndim = 1;
      p.outer_shape[0] = rows;
      p.x_outer_strides[0] = p.out_outer_strides[0] = n;
      p.num_threads = 2;
      t->softmax(p);
      double err = 0;
      for (int64_t r = 0; r < rows; ++r) {
        double m = -1e30, s = 0;
        for (int64_t j = 0; j < n; ++j) m = std::max(m, double(x[r * n + j]));
        for (int64_t j = 0; j < n; ++j) s += std::exp(x[r * n + j] - m);
        for (int64_t j = 0; j < n; ++j)
          err = std::max(err, std::fabs(out[r * n + j] - std::exp(x[r * n + j] - m) / s));
      }
      expect(err < 1e-6, n < 100 ? "softmax 3x37" : "softmax 3x10000", err);
    }
  }
  {  // gemm with odd sizes
    const int64_t M = 13, K = 17, N = 19;
    auto a = randv(M * K), b = randv(K * N);
    std::vector<float> c(M * N);
    GemmParams p;
    p.a = a.data();
    p.b = b.data();
    p.c = c.data();
    p.m = M;
    p.n = N;
    p.k = K;
    p.rs_a = K, p.cs_a = 1, p.rs_b = N, p.cs_b = 1, p.rs_c = N, p.cs_c = 1;
    p.num_threads = 2;
    t->gemm(p);
    double err = 0;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0;
        for (int64_t k = 0; k < K; ++k) s += double(a[i * K + k]) * b[k * N + j];
        err = std::max(err, std::fabs(s - c[i * N + j]));
      }
    expect(err < 1e-4, "gemm 13x17x19", err);
  }
  for (int64_t Sq : {9, 1}) {  // attention: prefill (causal) and decode, GQA 2:1
    const int64_t H = 2, Hkv = 1, Sk = 33, D = 16;
    auto q = randv(H * Sq * D), k = randv(Hkv * Sk * D), v = randv(Hkv * Sk * D);
    std::vector<float> out(H * Sq * D), lse(H * Sq);
    AttentionParams p;
    p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data(), p.lse = lse.data();
    p.batch = 1, p.num_heads = H, p.num_kv_heads = Hkv, p.seqlen_q = Sq, p.seqlen_k = Sk;
    p.head_dim = p.head_dim_v = D;
    p.q_stride[0] = H * Sq * D, p.q_stride[1] = Sq * D, p.q_stride[2] = D;
    p.k_stride[0] = Hkv * Sk * D, p.k_stride[1] = Sk * D, p.k_stride[2] = D;
    for (int i = 0; i < 3; ++i) p.v_stride[i] = p.k_stride[i], p.out_stride[i] = p.q_stride[i];
    p.lse_stride[0] = H * Sq, p.lse_stride[1] = Sq, p.lse_stride[2] = 1;
    p.scale = 0.25;
    p.causal = true;
    p.bottom_right = true;
    p.num_threads = 2;
    t->attention_fwd(p);
    double err = 0;
    std::vector<double> ref(H * Sq * D);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Sq; ++i) {
        std::vector<double> s(Sk);
        double m = -1e300, l = 0;
        const int64_t last = i + Sk - Sq;
        for (int64_t j = 0; j <= last; ++j) {
          double d = 0;
          for (int64_t x = 0; x < D; ++x) d += double(q[(h * Sq + i) * D + x]) * k[j * D + x];
          s[j] = d * 0.25;
          m = std::max(m, s[j]);
        }
        for (int64_t j = 0; j <= last; ++j) l += std::exp(s[j] - m);
        for (int64_t x = 0; x < D; ++x) {
          double o = 0;
          for (int64_t j = 0; j <= last; ++j) o += std::exp(s[j] - m) / l * v[j * D + x];
          ref[(h * Sq + i) * D + x] = o;
          err = std::max(err, std::fabs(o - out[(h * Sq + i) * D + x]));
        }
      }
    expect(err < 1e-5, Sq > 1 ? "attention prefill causal" : "attention decode", err);
    if (Sq > 1) {  // backward runs and gives finite gradients of the right scale
      std::vector<float> dout(out.size(), 1.0f), dq(q.size()), dk(k.size()), dv(v.size());
      AttentionBwdParams bp;
      bp.fwd = p;
      bp.dout = dout.data(), bp.dq = dq.data(), bp.dk = dk.data(), bp.dv = dv.data();
      for (int i = 0; i < 3; ++i)
        bp.dout_stride[i] = p.out_stride[i], bp.dq_stride[i] = p.q_stride[i],
        bp.dk_stride[i] = p.k_stride[i], bp.dv_stride[i] = p.v_stride[i];
      t->attention_bwd(bp);
      // sum over keys of dV = sum over rows of sum(P) * 1 = H * Sq per column
      double colsum = 0;
      for (int64_t j = 0; j < Sk; ++j) colsum += dv[j * D];
      expect(std::fabs(colsum - double(H * Sq)) < 1e-4, "attention backward dV", std::fabs(colsum - H * Sq));
    }
  }
  std::printf(failures ? "FAILED\n" : "all ok\n");
  return failures ? 1 : 0;
}
