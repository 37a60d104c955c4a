// Batched matrix multiply on the GPU (GemmParams, the same struct as the CPU GEMM):
// c[batch] = a[batch] @ b[batch], any strides, batch dims broadcast through stride 0.
//
// fp16/bf16: tensor cores (mma.sync m16n8k16, fp32 accumulation). Block tile 128 x 128 x 32,
// 8 warps of 64 x 32, A and B double-buffered in shared memory with cp.async when rows are
// contiguous and 16-byte aligned (else element loads, still coalesced along the contiguous
// axis). B is kept in smem in whichever orientation its memory has, [k][n] (row-major b, read
// with ldmatrix.trans) or [n][k] (b = w.T views, read with ldmatrix), so both common layouts
// load with vector copies. Rows padded by 16 bytes keep ldmatrix free of bank conflicts.
// On sm_90, with the CUTLASS headers at build time and ATTNKIT_CUDA_CUTLASS_GEMM=1, fp16/bf16
// products of the layouts gemm_sm90.cu covers run there instead (TMA + wgmma).
// fp32/fp64: FMA kernel, 64 x 64 x 16 tiles, 4 x 4 outputs per thread (TF32 would miss the
// fp32 tolerance). Each output is one thread's fixed-order sum: bit-identical run to run.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common.cuh"
#include "kernels.h"

namespace attnkit {
namespace cuda {
namespace {

__device__ __forceinline__ void batch_offsets(const GemmParams& p, int64_t z, int64_t& ao,
                                              int64_t& bo, int64_t& co) {
  ao = bo = co = 0;
  for (int d = p.batch_ndim - 1; d >= 0; --d) {
    const int64_t idx = z % p.batch_shape[d];
    z /= p.batch_shape[d];
    ao += idx * p.a_batch_strides[d];
    bo += idx * p.b_batch_strides[d];
    co += idx * p.c_batch_strides[d];
  }
}

// ---- tensor-core GEMM ----
constexpr int kBM = 128, kBN = 128, kBK = 32;
constexpr int kTcThreads = 256;

// Copies a (kRows x kCols) tile, smem row stride kCols + 8, element (r, c) from
// src[r * rs + c * cs]; zero outside (rows, cols). vec: cs == 1 and rows 16-byte aligned.
template <class T, int kRows, int kCols>
__device__ __forceinline__ void load_tile(T* s, const T* src, int64_t rs, int64_t cs, int64_t rows,
                                          int64_t cols, bool vec) {
  constexpr int kChunks = kCols / 8;
  if (vec) {
    for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kTcThreads) {
      const int r = idx / kChunks, c = idx % kChunks;
      const int64_t valid = r < rows ? min(int64_t(8), max(int64_t(0), cols - c * 8)) : 0;
      cp_async_16(s + r * (kCols + 8) + c * 8, valid > 0 ? src + r * rs + c * 8 : src,
                  int(valid) * 2);
    }
  } else {
    // Element loads; consecutive threads walk the axis with the smaller stride (coalescing).
    const bool col_fast = cs <= rs;
    for (int idx = threadIdx.x; idx < kRows * kCols; idx += kTcThreads) {
      const int r = col_fast ? idx / kCols : idx % kRows;
      const int c = col_fast ? idx % kCols : idx / kRows;
      s[r * (kCols + 8) + c] = (r < rows && c < cols) ? src[r * rs + c * cs] : store_as<T>(0.0f);
    }
  }
}

template <class T, bool kBKMajor>
__global__ void __launch_bounds__(kTcThreads) gemm_tc_kernel(const GemmParams p, int64_t batch,
                                                             bool a_vec, bool b_vec, bool c_vec) {
  constexpr int kAStride = kBK + 8;
  constexpr int kBStride = kBKMajor ? kBK + 8 : kBN + 8;
  constexpr int kASize = kBM * kAStride;
  constexpr int kBSize = kBKMajor ? kBN * kBStride : kBK * kBStride;
  __shared__ __align__(16) T smem[2 * (kASize + kBSize)];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;  // 2 x 4 warps of 64 x 32
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int nk = int((p.k + kBK - 1) / kBK);

  for (int64_t z = blockIdx.z; z < batch; z += gridDim.z) {
    int64_t ao, bo, co;
    batch_offsets(p, z, ao, bo, co);
    const T* A = static_cast<const T*>(p.a) + ao + m0 * p.rs_a;
    const T* B = static_cast<const T*>(p.b) + bo + n0 * p.cs_b;
    auto load = [&](int kt, int buf) {
      T* sA = smem + buf * (kASize + kBSize);
      T* sB = sA + kASize;
      const int64_t k0 = int64_t(kt) * kBK;
      load_tile<T, kBM, kBK>(sA, A + k0 * p.cs_a, p.rs_a, p.cs_a, p.m - m0, p.k - k0, a_vec);
      if (kBKMajor)
        load_tile<T, kBN, kBK>(sB, B + k0 * p.rs_b, p.cs_b, p.rs_b, p.n - n0, p.k - k0, b_vec);
      else
        load_tile<T, kBK, kBN>(sB, B + k0 * p.rs_b, p.rs_b, p.cs_b, p.k - k0, p.n - n0, b_vec);
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    load(0, 0);
    cp_async_commit();
    for (int kt = 0; kt < nk; ++kt) {
      const int buf = kt & 1;
      if (kt + 1 < nk) load(kt + 1, buf ^ 1);
      cp_async_commit();     // (possibly empty group: keeps the wait count uniform)
      cp_async_wait_one();   // tile kt has landed
      __syncthreads();
      const T* sA = smem + buf * (kASize + kBSize);
      const T* sB = sA + kASize;
#pragma unroll
      for (int ks = 0; ks < kBK / 16; ++ks) {
        uint32_t a[4][4];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
          ldmatrix_x4(a[mt], sA + (wm * 64 + mt * 16 + (lane & 15)) * kAStride + ks * 16 +
                                 (lane >> 4) * 8);
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          uint32_t b[4];
          if (kBKMajor)  // smem [n][k], as K in attention
            ldmatrix_x4(b, sB + (wn * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8) * kBStride +
                               ks * 16 + ((lane >> 3) & 1) * 8);
          else  // smem [k][n], as V in attention
            ldmatrix_x4_trans(b, sB + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kBStride +
                                     wn * 32 + np * 16 + (lane >> 4) * 8);
#pragma unroll
          for (int mt = 0; mt < 4; ++mt) {
            mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
            mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
          }
        }
      }
      __syncthreads();  // everyone is done with `buf` before it is refilled
    }
    cp_async_wait_all();

    T* C = static_cast<T*>(p.c) + co;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int64_t row = m0 + wm * 64 + mt * 16 + g + 8 * hh;
        if (row >= p.m) continue;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const int64_t col = n0 + wn * 32 + nt * 8 + 2 * t;
          if (col >= p.n) continue;
          T* dst = C + row * p.rs_c + col * p.cs_c;
          const float v0 = acc[mt][nt][2 * hh], v1 = acc[mt][nt][2 * hh + 1];
          if (c_vec && col + 1 < p.n) {
            *reinterpret_cast<uint32_t*>(dst) = pack2<T>(v0, v1);
          } else {
            dst[0] = store_as<T>(v0);
            if (col + 1 < p.n) dst[p.cs_c] = store_as<T>(v1);
          }
        }
      }
  }
}

// ---- FMA GEMM (fp32 / fp64) ----
constexpr int kSM = 64, kSN = 64, kSK = 16;

// (256, 2): two blocks per SM; the compiler's own choice (64 registers) spilled on sm_90.
template <class T>
__global__ void __launch_bounds__(256, 2) gemm_simt_kernel(const GemmParams p, int64_t batch) {
  __shared__ T sA[kSK][kSM + 1];
  __shared__ T sB[kSK][kSN];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t m0 = int64_t(blockIdx.y) * kSM, n0 = int64_t(blockIdx.x) * kSN;
  const bool a_k_fast = p.cs_a <= p.rs_a, b_n_fast = p.cs_b <= p.rs_b;
  for (int64_t z = blockIdx.z; z < batch; z += gridDim.z) {
    int64_t ao, bo, co;
    batch_offsets(p, z, ao, bo, co);
    const T* A = static_cast<const T*>(p.a) + ao;
    const T* B = static_cast<const T*>(p.b) + bo;
    T acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
    for (int64_t k0 = 0; k0 < p.k; k0 += kSK) {
      for (int idx = threadIdx.x; idx < kSM * kSK; idx += 256) {
        const int mm = a_k_fast ? idx / kSK : idx % kSM, kk = a_k_fast ? idx % kSK : idx / kSM;
        const int64_t m = m0 + mm, k = k0 + kk;
        sA[kk][mm] = (m < p.m && k < p.k) ? A[m * p.rs_a + k * p.cs_a] : T(0);
      }
      for (int idx = threadIdx.x; idx < kSK * kSN; idx += 256) {
        const int nn = b_n_fast ? idx % kSN : idx / kSK, kk = b_n_fast ? idx / kSN : idx % kSK;
        const int64_t n = n0 + nn, k = k0 + kk;
        sB[kk][nn] = (n < p.n && k < p.k) ? B[k * p.rs_b + n * p.cs_b] : T(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kSK; ++kk) {
        T a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = sA[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = sB[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
    T* C = static_cast<T*>(p.c) + co;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + ty + 16 * i;
      if (m >= p.m) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + tx + 16 * j;
        if (n < p.n) C[m * p.rs_c + n * p.cs_c] = acc[i][j];
      }
    }
  }
}

template <class T>
__global__ void fill_zero_kernel(const GemmParams p, int64_t batch) {
  // k == 0: c = 0 (an empty sum).
  const int64_t total = batch * p.m * p.n;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e % p.n, m = (e / p.n) % p.m, z = e / (p.n * p.m);
    int64_t ao, bo, co;
    batch_offsets(p, z, ao, bo, co);
    static_cast<T*>(p.c)[co + m * p.rs_c + n * p.cs_c] = store_as<T>(0.0f);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The kernel of the last product (tests: which path a shape took).
enum LastKernel : int { kNone = 0, kSm90, kMma, kSimt };
std::atomic<int> g_last_kernel{kNone};

std::atomic<bool>& cutlass_flag() {
  static std::atomic<bool> on{[] {
    const char* e = std::getenv("ATTNKIT_CUDA_CUTLASS_GEMM");
    return e && std::strcmp(e, "1") == 0;
  }()};
  return on;
}

#if defined(ATTNKIT_HAVE_SM90_GEMM)
// Whether the current device is an sm_90 (the sm_90a code of gemm_sm90.cu runs only there),
// cached per device ordinal.
bool device_is_sm90() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  static std::atomic<int> cache[64];  // 0 unknown, 1 yes, 2 no
  int v = cache[dev].load();
  if (v == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    v = major == 9 && minor == 0 ? 1 : 2;
    cache[dev].store(v);
  }
  return v == 1;
}
#endif

template <class T>
cudaError_t run(const GemmParams& p, cudaStream_t stream) {
  int64_t batch = 1;
  for (int d = 0; d < p.batch_ndim; ++d) batch *= p.batch_shape[d];
  if (batch == 0 || p.m == 0 || p.n == 0) return cudaSuccess;
  const unsigned gz = unsigned(batch < 65535 ? batch : 65535);
  if (p.k == 0) {
    const int64_t total = batch * p.m * p.n;
    const unsigned blocks = unsigned(std::min<int64_t>((total + 255) / 256, 65535));
    auto kernel = fill_zero_kernel<T>;
    ATTNKIT_LAUNCH(kernel, blocks, 256, 0, stream, p, batch);
    return cudaGetLastError();
  }
  constexpr bool kTensorCores = sizeof(T) == 2;
  const int bm = kTensorCores ? kBM : kSM, bn = kTensorCores ? kBN : kSN;
  const int64_t gx = (p.n + bn - 1) / bn, gy = (p.m + bm - 1) / bm;
  if (gx > 0x7fffffff || gy > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(unsigned(gx), unsigned(gy), gz);
  if constexpr (kTensorCores) {
#if defined(ATTNKIT_HAVE_SM90_GEMM)
    if (cutlass_flag().load() && device_is_sm90()) {
      bool applied = false;
      const cudaError_t e = gemm_sm90(p, stream, &applied);
      if (applied) g_last_kernel.store(kSm90);
      if (applied || e != cudaSuccess) return e;
    }
#endif
    g_last_kernel.store(kMma);
    bool batch_aligned = true;
    for (int d = 0; d < p.batch_ndim; ++d)
      batch_aligned = batch_aligned && p.a_batch_strides[d] % 8 == 0 && p.b_batch_strides[d] % 8 == 0;
    const bool a_vec = p.cs_a == 1 && p.rs_a % 8 == 0 && aligned16(p.a) && batch_aligned;
    const bool b_kmajor = p.cs_b != 1 && p.rs_b == 1;
    const bool b_vec = batch_aligned && aligned16(p.b) &&
                       (b_kmajor ? p.cs_b % 8 == 0 : (p.cs_b == 1 && p.rs_b % 8 == 0));
    bool c_vec = p.cs_c == 1 && p.rs_c % 2 == 0 && reinterpret_cast<uintptr_t>(p.c) % 4 == 0;
    for (int d = 0; d < p.batch_ndim; ++d) c_vec = c_vec && p.c_batch_strides[d] % 2 == 0;
    auto kernel = b_kmajor ? gemm_tc_kernel<T, true> : gemm_tc_kernel<T, false>;
    ATTNKIT_LAUNCH(kernel, grid, kTcThreads, 0, stream, p, batch, a_vec, b_vec, c_vec);
  } else {
    g_last_kernel.store(kSimt);
    auto kernel = gemm_simt_kernel<T>;
    ATTNKIT_LAUNCH(kernel, grid, 256, 0, stream, p, batch);
  }
  return cudaGetLastError();
}

}  // namespace

#if defined(ATTNKIT_HAVE_SM90_GEMM)
bool cutlass_gemm_built() { return true; }
#else
bool cutlass_gemm_built() { return false; }
cudaError_t gemm_sm90(const GemmParams&, cudaStream_t, bool* applied) {
  *applied = false;
  return cudaSuccess;
}
#endif
bool cutlass_gemm_enabled() { return cutlass_flag().load(); }
const char* last_gemm_kernel() {
  static const char* const names[] = {"none", "sm90", "mma", "simt"};
  return names[g_last_kernel.load()];
}
void set_cutlass_gemm_enabled(bool on) { cutlass_flag().store(on); }

cudaError_t gemm(const GemmParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::f32:
      return run<float>(p, stream);
    case DType::f64:
      return run<double>(p, stream);
    case DType::f16:
      return run<half>(p, stream);
    case DType::bf16:
      return run<bf16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace attnkit
