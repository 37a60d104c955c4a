// Attention forward on the GPU: the plan (kernel, tile, GQA packing, key splits), the
// KV-cache metadata check and append, the kernel dispatch (one switch per axis: dtype, then
// head-dim bucket; ARCHITECTURE.md rule 3) and the combine of split partials (flash-decoding).
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "attention_kernels.h"

namespace attnkit {
namespace cuda {
namespace {

constexpr int kWarpsPerCombineBlock = 4;
constexpr int kMaxSplits = 64;

int mma_bucket(int64_t d) {
  if (d <= 64) return 64;
  if (d <= 96) return 96;
  if (d <= 128) return 128;
  if (d <= 192) return 192;
  return 256;
}

// f(Shape<kD>()) for the head-dim bucket (64, 96, 128, 192, else 256).
template <template <int> class Shape, class F>
void with_bucket(int bucket, F f) {
  switch (bucket) {
    case 64: f(Shape<64>()); break;
    case 96: f(Shape<96>()); break;
    case 128: f(Shape<128>()); break;
    case 192: f(Shape<192>()); break;
    default: f(Shape<256>()); break;
  }
}
// Tile of a tensor-core kernel (MmaShape or DecodeShape) for the plan's head-dim bucket;
// `codes`: the decode kernel's layout for 8-bit caches.
template <template <int> class Shape>
void tile_shape(AttentionPlan* plan, size_t elem, bool codes = false) {
  with_bucket<Shape>(plan->head_dim_bucket, [&](auto shape) {
    using S = decltype(shape);
    plan->block_m = S::kBlockM;
    plan->block_n = S::kBlockN;
    if constexpr (std::is_same<Shape<64>, DecodeShape<64>>::value)
      plan->smem_bytes = codes ? S::code_smem_bytes(elem) : S::smem_bytes(elem);
    else
      plan->smem_bytes = S::smem_bytes(elem);
  });
}

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

std::atomic<bool>& decode_flag() {
  static std::atomic<bool> on{[] {
    const char* e = std::getenv("ATTNKIT_CUDA_DECODE");
    return e && std::strcmp(e, "1") == 0;
  }()};
  return on;
}

std::atomic<bool>& hopper_flag() {
  static std::atomic<bool> on{[] {
    const char* e = std::getenv("ATTNKIT_CUDA_HOPPER");
    return e && std::strcmp(e, "1") == 0;
  }()};
  return on;
}

// ---- KV cache: check the metadata on the device, then append the new keys/values ----

__device__ __forceinline__ int64_t load_index(const void* base, DType t, int64_t off) {
  return t == DType::i32 ? int64_t(static_cast<const int32_t*>(base)[off])
                         : static_cast<const int64_t*>(base)[off];
}

// One block per batch entry: seqlens_out[b] = cache_seqlens[b] + n_new, or -1 when that
// overflows the cache or a page the sequence uses is not a valid page index. The attention
// kernel turns -1 into NaN results for that batch entry, and the append kernel skips it: a
// device-side check cannot raise without a synchronization, but it never touches memory
// outside the cache.
__global__ void kv_meta_kernel(KvCacheArgs kv, int64_t capacity, int64_t page_size,
                               int64_t max_blocks, int64_t* seqlens_out, int64_t* table_out) {
  const int64_t b = blockIdx.x;
  const int64_t len = load_index(kv.cache_seqlens, kv.cache_seqlens_dtype, b * kv.cache_seqlens_stride);
  const int64_t total = len + kv.n_new;
  bool bad = len < 0 || total > capacity;
  if (kv.block_table) {
    for (int64_t jb = threadIdx.x; jb < max_blocks; jb += blockDim.x) {
      const int64_t e = load_index(kv.block_table, kv.block_table_dtype,
                                   b * kv.block_table_strides[0] + jb * kv.block_table_strides[1]);
      table_out[b * max_blocks + jb] = e;
      if (jb * page_size < total && (e < 0 || e >= kv.num_pages)) bad = true;
    }
  }
  bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) seqlens_out[b] = bad ? -1 : total;
}

// One block per (batch, new token, kv head): copies the new k and v rows into the cache at
// position cache_seqlens[b] + t. Raw bits (W = the element width) so every dtype shares it.
template <class W>
__global__ void kv_append_kernel(const AttentionParams p, const KvCacheArgs kv) {
  const int64_t row = blockIdx.x;
  const int64_t hkv = row % p.num_kv_heads;
  const int64_t t = (row / p.num_kv_heads) % kv.n_new;
  const int64_t b = row / (p.num_kv_heads * kv.n_new);
  const int64_t len = p.seqlens_k[b];
  if (len < 0) return;
  const int64_t pos = len - kv.n_new + t;
  int64_t ko, vo;
  if (p.block_table) {
    const int64_t page = p.block_table[b * p.block_table_stride + pos / p.page_size];
    const int64_t in_page = pos % p.page_size;
    ko = page * p.k_stride[0] + hkv * p.k_stride[1] + in_page * p.k_stride[2];
    vo = page * p.v_stride[0] + hkv * p.v_stride[1] + in_page * p.v_stride[2];
  } else {
    ko = b * p.k_stride[0] + hkv * p.k_stride[1] + pos * p.k_stride[2];
    vo = b * p.v_stride[0] + hkv * p.v_stride[1] + pos * p.v_stride[2];
  }
  const W* ks = static_cast<const W*>(kv.k_new) + b * kv.k_new_stride[0] +
                hkv * kv.k_new_stride[1] + t * kv.k_new_stride[2];
  const W* vs = static_cast<const W*>(kv.v_new) + b * kv.v_new_stride[0] +
                hkv * kv.v_new_stride[1] + t * kv.v_new_stride[2];
  W* kd = const_cast<W*>(static_cast<const W*>(p.k)) + ko;
  W* vd = const_cast<W*>(static_cast<const W*>(p.v)) + vo;
  for (int64_t d = threadIdx.x; d < p.head_dim; d += blockDim.x) kd[d] = ks[d];
  for (int64_t d = threadIdx.x; d < p.head_dim_v; d += blockDim.x) vd[d] = vs[d];
}

// ---- 8-bit caches: quantize rows (the append, and attnkit.quantize_kv on device arrays) ----
constexpr int kQuantThreads = 128;

template <class TC>
struct CodeMax;
template <>
struct CodeMax<int8_t> {
  static constexpr float value = 127.0f;
};
template <>
struct CodeMax<f8e4m3_t> {
  static constexpr float value = 448.0f;
};

// One block (kQuantThreads threads) quantizes one row of n values: scale = max|x| / CodeMax,
// codes round(x / scale); a row of zeros gets scale 0, a row holding inf/NaN scale NaN (codes
// 0). Division and rounding are exact IEEE operations and the max does not depend on the
// order, so the bytes equal the CPU's (csrc/cpu/quantize.h). `red` is kQuantThreads floats of
// shared memory; the block synchronizes, so every thread must call this.
template <class TN, class TC>
__device__ __forceinline__ void quantize_row_block(const TN* src, int64_t n, TC* dst, float* scale_out, float* red) {
  float amax = 0.0f;
  bool bad = false;
  for (int64_t d = threadIdx.x; d < n; d += kQuantThreads) {
    const float x = to_float(src[d]);
    bad |= !(x - x == 0.0f);
    amax = fmaxf(amax, fabsf(x));
  }
  red[threadIdx.x] = bad ? quiet_nan() : amax;
  __syncthreads();
  for (int w = kQuantThreads / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) {
      const float a = red[threadIdx.x], b = red[threadIdx.x + w];
      red[threadIdx.x] = (a != a || b != b) ? quiet_nan() : fmaxf(a, b);
    }
    __syncthreads();
  }
  const float scale = red[0] / CodeMax<TC>::value;
  const bool usable = scale > 0.0f;  // false for zeros, an underflowing scale, NaN
  for (int64_t d = threadIdx.x; d < n; d += kQuantThreads)
    store_code(usable ? to_float(src[d]) / scale : 0.0f, dst + d);
  if (threadIdx.x == 0) *scale_out = usable ? scale : (scale == scale ? 0.0f : scale);
  __syncthreads();  // red is reused by the caller's next row
}

// 8-bit caches: one block per (batch, new token, kv head) quantizes the new k and v rows into
// the caches and writes their scales (the float-cache twin is kv_append_kernel).
template <class TN, class TC>
__global__ void __launch_bounds__(kQuantThreads) kv_append_code_kernel(const AttentionParams p,
                                                                      const KvCacheArgs kv) {
  __shared__ float red[kQuantThreads];
  const int64_t row = blockIdx.x;
  const int64_t hkv = row % p.num_kv_heads;
  const int64_t t = (row / p.num_kv_heads) % kv.n_new;
  const int64_t b = row / (p.num_kv_heads * kv.n_new);
  const int64_t len = p.seqlens_k[b];
  if (len < 0) return;  // block-uniform: no thread reaches the barriers
  const int64_t pos = len - kv.n_new + t;
  int64_t base, in_row;
  if (p.block_table) {
    base = p.block_table[b * p.block_table_stride + pos / p.page_size];
    in_row = pos % p.page_size;
  } else {
    base = b;
    in_row = pos;
  }
  for (int which = 0; which < 2; ++which) {  // K, then V
    const bool is_k = which == 0;
    const int64_t* ns = is_k ? kv.k_new_stride : kv.v_new_stride;
    const int64_t* cs = is_k ? p.k_stride : p.v_stride;
    const int64_t* ss = is_k ? p.k_scale_stride : p.v_scale_stride;
    const TN* src = static_cast<const TN*>(is_k ? kv.k_new : kv.v_new) + b * ns[0] + hkv * ns[1] + t * ns[2];
    TC* dst = const_cast<TC*>(static_cast<const TC*>(is_k ? p.k : p.v)) + base * cs[0] + hkv * cs[1] +
              in_row * cs[2];
    float* sc = const_cast<float*>(is_k ? p.k_scale : p.v_scale) + base * ss[0] + hkv * ss[1] + in_row * ss[2];
    quantize_row_block(src, is_k ? p.head_dim : p.head_dim_v, dst, sc, red);
  }
}

template <class TC>
cudaError_t launch_append_codes(const AttentionParams& p, const KvCacheArgs& kv, unsigned rows,
                                cudaStream_t stream) {
  auto kernel = p.new_dtype == DType::f16    ? kv_append_code_kernel<half, TC>
                : p.new_dtype == DType::bf16 ? kv_append_code_kernel<bf16, TC>
                                             : kv_append_code_kernel<float, TC>;
  ATTNKIT_LAUNCH(kernel, rows, kQuantThreads, 0, stream, p, kv);
  return cudaGetLastError();
}

// attnkit.quantize_kv: one block per row (outer index), rows up to 2^31 - 1.
template <class TN, class TC>
__global__ void __launch_bounds__(kQuantThreads) quantize_kernel(const QuantizeParams p) {
  __shared__ float red[kQuantThreads];
  int64_t r = blockIdx.x, xo = 0, qo = 0, so = 0;
  for (int d = p.outer_ndim - 1; d >= 0; --d) {
    const int64_t i = r % p.outer_shape[d];
    r /= p.outer_shape[d];
    xo += i * p.x_outer_strides[d];
    qo += i * p.q_outer_strides[d];
    so += i * p.scale_outer_strides[d];
  }
  quantize_row_block(static_cast<const TN*>(p.x) + xo, p.n, static_cast<TC*>(p.q) + qo,
                     p.scale + so, red);
}

template <class TC>
cudaError_t launch_quantize(const QuantizeParams& p, unsigned rows, cudaStream_t stream) {
  auto kernel = p.x_dtype == DType::f16    ? quantize_kernel<half, TC>
                : p.x_dtype == DType::bf16 ? quantize_kernel<bf16, TC>
                                           : quantize_kernel<float, TC>;
  ATTNKIT_LAUNCH(kernel, rows, kQuantThreads, 0, stream, p);
  return cudaGetLastError();
}

template <class TQ>
cudaError_t launch_simt_codes(const AttentionParams& p, const FwdLaunch& L, cudaStream_t stream) {
  return p.kv_dtype == DType::i8 ? launch_attention_simt<TQ, int8_t, float>(p, L, stream)
                                 : launch_attention_simt<TQ, f8e4m3_t, float>(p, L, stream);
}

// ---- combine split partials: one warp per (b, h, i) row, fixed order over the splits ----
template <class TO>
__global__ void __launch_bounds__(32 * kWarpsPerCombineBlock)
    combine_kernel(const AttentionParams p, const FwdLaunch L) {
  __shared__ float weight[kWarpsPerCombineBlock][kMaxSplits];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerCombineBlock + warp;
  if (row >= p.batch * p.num_heads * p.seqlen_q) return;  // warp-uniform
  const int64_t i = row % p.seqlen_q, h = (row / p.seqlen_q) % p.num_heads;
  const int64_t b = row / (p.seqlen_q * p.num_heads);
  int64_t q_tok = 0, sq = p.seqlen_q;
  if (p.cu_seqlens_q) {
    q_tok = p.cu_seqlens_q[b];
    sq = p.cu_seqlens_q[b + 1] - q_tok;
  }
  if (i >= sq) return;
  const int S = L.num_splits, Dv = int(p.head_dim_v);
  const int64_t split_stride = p.batch * p.num_heads * p.seqlen_q;
  const int64_t ar = (b * p.num_heads + h) * p.seqlen_q + i;
  // Max over splits (-inf: split saw no allowed key); NaN (poisoned batch) propagates.
  float mx = neg_inf();
  bool nan = false;
  for (int s = lane; s < S; s += 32) {
    const float v = L.lse_accum[s * split_stride + ar];
    nan |= v != v;
    mx = fmaxf(mx, v);
  }
  mx = warp_max(mx);
  nan = __any_sync(0xffffffffu, nan);
  const float m_use = mx == neg_inf() ? 0.0f : mx;
  for (int s = lane; s < S; s += 32)
    weight[warp][s] = fast_exp2((L.lse_accum[s * split_stride + ar] - m_use) * kLog2e);
  __syncwarp();
  float sum = 0.0f;
  for (int s = 0; s < S; ++s) sum += weight[warp][s];  // same order in every lane and run
  const float inv = sum == 0.0f ? 0.0f : 1.0f / sum;
  float lse = sum == 0.0f ? neg_inf() : m_use + logf(sum);
  TO* out = static_cast<TO*>(p.out) + (p.cu_seqlens_q ? 0 : b * p.out_stride[0]) +
            h * p.out_stride[1] + (q_tok + i) * p.out_stride[2];
  for (int d = lane; d < Dv; d += 32) {
    float acc = 0.0f;
    for (int s = 0; s < S; ++s) {
      // Skip only splits without an allowed key (lse -inf): one whose weight underflowed
      // still adds 0 * O, which keeps a NaN its O holds (an attended NaN value).
      if (L.lse_accum[s * split_stride + ar] != neg_inf())
        acc += weight[warp][s] * L.o_accum[(s * split_stride + ar) * Dv + d];
    }
    out[d] = store_as<TO>(nan ? quiet_nan() : acc * inv);
  }
  if (nan) lse = quiet_nan();
  if (p.lse && lane == 0)
    p.lse[(p.cu_seqlens_q ? 0 : b * p.lse_stride[0]) + h * p.lse_stride[1] +
          (q_tok + i) * p.lse_stride[2]] = lse;
}

template <class TO>
cudaError_t launch_combine(const AttentionParams& p, const FwdLaunch& L, cudaStream_t stream) {
  const int64_t rows = p.batch * p.num_heads * p.seqlen_q;
  const int64_t blocks = (rows + kWarpsPerCombineBlock - 1) / kWarpsPerCombineBlock;
  auto kernel = combine_kernel<TO>;
  ATTNKIT_LAUNCH(kernel, unsigned(blocks), 32 * kWarpsPerCombineBlock, 0, stream, p, L);
  return cudaGetLastError();
}

// Query heads of a kv head stacked into the decode kernel's 16 rows: the largest divisor of
// the group that fits sq positions each (1 when even one head's rows do not fit).
int64_t decode_pack(int64_t group, int64_t sq) {
  for (int64_t pk = std::min<int64_t>(group, 16); pk > 1; --pk)
    if (group % pk == 0 && pk * sq <= 16) return pk;
  return 1;
}

// The tensor-core forward or the decode kernel (over a cache of T, or of 8-bit codes) of the
// head-dim bucket.
template <class T>
cudaError_t launch_tensor_core(const AttentionParams& p, const FwdLaunch& L, int bucket,
                               bool decode, bool hopper, cudaStream_t s) {
  cudaError_t err = cudaErrorInvalidValue;
  with_bucket<MmaShape>(bucket, [&](auto shape) {
    constexpr int kD = decltype(shape)::kHeadDim;
    if (hopper) {
#ifdef ATTNKIT_HAVE_SM90_ATTENTION
      err = launch_attention_hopper<T, kD>(p, L, s);
#endif
    } else if (!decode)
      err = launch_attention_mma<T, kD>(p, L, s);
    else if (p.kv_dtype == DType::i8)
      err = launch_attention_decode<T, int8_t, kD>(p, L, s);
    else if (p.kv_dtype == DType::f8e4m3)
      err = launch_attention_decode<T, f8e4m3_t, kD>(p, L, s);
    else
      err = launch_attention_decode<T, T, kD>(p, L, s);
  });
  return err;
}

}  // namespace

bool decode_kernel_enabled() { return decode_flag().load(); }
void set_decode_kernel_enabled(bool on) { decode_flag().store(on); }
#ifdef ATTNKIT_HAVE_SM90_ATTENTION
bool hopper_kernel_built() { return true; }
#else
bool hopper_kernel_built() { return false; }
#endif
bool hopper_kernel_enabled() { return hopper_flag().load(); }
void set_hopper_kernel_enabled(bool on) { hopper_flag().store(on); }

const char* attention_plan(const AttentionParams& p, const KvCacheArgs& kv,
                           const DeviceInfo& dev, AttentionPlan* plan) {
  *plan = AttentionPlan();
  if (p.head_dim > kMaxHeadDim || p.head_dim_v > kMaxHeadDim)
    return "head dims above 256 are not supported on CUDA devices";
  if (p.seqlen_q >= (int64_t(1) << 30) || p.seqlen_k >= (int64_t(1) << 30))
    return "sequence lengths must be below 2^30 on CUDA devices";
  if (p.dropout_p != 0.0f) return "dropout is not supported on CUDA devices";
  const bool half_types = p.q_dtype == DType::f16 || p.q_dtype == DType::bf16;
  // 8-bit caches (any float q but float64) run the SIMT kernel, which dequantizes K/V rows as it
  // stages them in shared memory, or with fp16/bf16 q the decode kernel where it applies.
  const bool codes = p.kv_dtype == DType::i8 || p.kv_dtype == DType::f8e4m3;
  if (codes && p.q_dtype == DType::f64) return "8-bit caches need a float32, float16 or bfloat16 q";
  plan->tensor_cores = half_types && p.kv_dtype == p.q_dtype;
  size_t acc_bytes = p.q_dtype == DType::f64 ? 8 : 4;
  const int64_t group = p.num_heads / p.num_kv_heads;
  // The decode kernel takes the calls whose masked keys are masked for all rows alike
  // (attention_decode.cuh): one query position, or no causal/window bound; never a mask.
  const int64_t span = p.seqlen_q + p.seqlen_k;
  const bool bounded = p.causal || (p.window_left >= 0 && p.window_left <= span) ||
                       (p.window_right >= 0 && p.window_right <= span);
  if ((plan->tensor_cores || (half_types && codes)) && decode_kernel_enabled() && !p.mask &&
      p.seqlen_q <= 16 && (p.seqlen_q == 1 || !bounded)) {
    plan->head_dim_bucket = mma_bucket(std::max(p.head_dim, p.head_dim_v));
    tile_shape<DecodeShape>(plan, 2, codes);
    plan->decode_kernel = plan->smem_bytes <= size_t(dev.max_smem_optin);
  }
#ifdef ATTNKIT_HAVE_SM90_ATTENTION
  // The Hopper kernel: sm_90 (its wgmma code is sm_90a), rows enough for its 128-row blocks
  // without GQA packing (shorter query blocks: the mma.sync kernel packs the group's heads);
  // a paged cache whose pages hold whole key tiles.
  const int64_t pages = kv.block_table ? kv.num_pages : 0;
  if (!plan->decode_kernel && plan->tensor_cores && hopper_kernel_enabled() && dev.cc_major == 9 &&
      dev.cc_minor == 0 && p.seqlen_q >= 64) {
    plan->head_dim_bucket = mma_bucket(std::max(p.head_dim, p.head_dim_v));
    tile_shape<HopperShape>(plan, 2);
    plan->hopper = plan->smem_bytes <= size_t(dev.max_smem_optin) &&
                   (!kv.block_table || p.page_size % plan->block_n == 0) &&
                   hopper_layout_ok(p, pages, plan->block_m, plan->block_n);
  }
#endif
  if (!plan->decode_kernel && !plan->hopper && plan->tensor_cores) {
    plan->head_dim_bucket = mma_bucket(std::max(p.head_dim, p.head_dim_v));
    tile_shape<MmaShape>(plan, 2);
  } else if (!plan->decode_kernel && !plan->hopper) {
    if (half_types && !codes) return "k/v must have q's dtype";  // binding checks first; defensive
    plan->head_dim_bucket = 0;
    plan->block_m = kSimtBlockM;
    plan->block_n = kSimtBlockN;
    plan->smem_bytes = simt_smem_bytes(p, acc_bytes);
  }
  if (plan->smem_bytes > size_t(dev.max_smem_optin)) {
    static thread_local char msg[160];
    snprintf(msg, sizeof msg,
             "these head dims need %zu bytes of shared memory per block in %s; this GPU allows %d",
             plan->smem_bytes, p.q_dtype == DType::f64 ? "float64" : "float32",
             dev.max_smem_optin);
    return msg;
  }

  // GQA packing: for short query blocks (decode), stack the query heads of a kv head.
  if (plan->decode_kernel)
    plan->pack = decode_pack(group, p.seqlen_q);
  else if (plan->hopper)
    plan->pack = 1;
  else
    plan->pack = (group > 1 && p.seqlen_q < plan->block_m) ? group : 1;
  plan->head_groups = p.num_heads / plan->pack;
  plan->num_m_blocks = (plan->pack * p.seqlen_q + plan->block_m - 1) / plan->block_m;
  if (plan->num_m_blocks == 0) plan->num_m_blocks = 1;
  if (plan->num_m_blocks > 65535) return "too many query rows for one launch";
  if (p.batch * plan->head_groups > 0x7fffffff) return "too many (batch, head) pairs";

  // Split the keys (flash-decoding) when the grid cannot fill the GPU: about two blocks per
  // SM are resident, each split keeps at least 2 key tiles, and at most kMaxSplits.
  // The key range is the longest sequence's when the cache lengths are known on the host:
  // 2k tokens in a 32k-position cache split like 2k keys, not like 32k mostly empty ones.
  plan->split_keys = kv.active && kv.max_seqlen >= 0 ? std::min(kv.max_seqlen, p.seqlen_k)
                                                     : p.seqlen_k;
  const int64_t blocks = std::max<int64_t>(1, p.batch * plan->head_groups * plan->num_m_blocks);
  const int64_t tiles = (plan->split_keys + plan->block_n - 1) / plan->block_n;
  // The decode kernel's blocks are small (one 16-row tile) and only stream: up to three share
  // an SM, and finer splits balance the SMs better, so it aims at four per SM.
  // The Hopper kernel's blocks take a whole SM (up to 225 KB of shared memory): one per SM.
  const int64_t target = (plan->decode_kernel ? 4 : plan->hopper ? 1 : 2) * int64_t(dev.sm_count);
  // float64 partials would be rounded to float32: never split float64.
  if (blocks < target && tiles >= 4 && p.q_dtype != DType::f64) {
    const int64_t want = (target + blocks - 1) / blocks;
    plan->num_splits = int(std::min<int64_t>({want, tiles / 2, kMaxSplits}));
    plan->num_splits = std::max(plan->num_splits, 1);
  }

  size_t off = 0;
  if (plan->num_splits > 1) {
    const size_t rows = size_t(plan->num_splits) * p.batch * p.num_heads * p.seqlen_q;
    plan->off_o_accum = off;
    off = align_up(off + rows * size_t(p.head_dim_v) * sizeof(float));
    plan->off_lse_accum = off;
    off = align_up(off + rows * sizeof(float));
  }
  if (kv.active) {
    plan->off_seqlens = off;
    off = align_up(off + size_t(p.batch) * sizeof(int64_t));
    if (kv.block_table) {
      plan->off_block_table = off;
      off = align_up(off + size_t(p.batch * p.block_table_stride) * sizeof(int64_t));
    }
  }
  plan->scratch_bytes = off;
  return nullptr;
}

cudaError_t attention_fwd(AttentionParams p, const KvCacheArgs& kv, const AttentionPlan& plan,
                          void* scratch, cudaStream_t stream) {
  char* base = static_cast<char*>(scratch);
  // A window wider than both sequences bounds nothing; -1 keeps the kernels' int math small.
  const int64_t span = p.seqlen_q + p.seqlen_k;
  if (p.window_left > span) p.window_left = -1;
  if (p.window_right > span) p.window_right = -1;
  cudaError_t err;
  if (kv.active) {
    int64_t* seqlens = reinterpret_cast<int64_t*>(base + plan.off_seqlens);
    int64_t* table = kv.block_table ? reinterpret_cast<int64_t*>(base + plan.off_block_table)
                                    : nullptr;
    if (p.batch > 0) {
      ATTNKIT_LAUNCH(kv_meta_kernel, unsigned(p.batch), 128, 0, stream, kv, p.seqlen_k,
                     p.page_size, p.block_table_stride, seqlens, table);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    p.seqlens_k = seqlens;
    p.block_table = table;
    if (kv.k_new && kv.n_new > 0 && p.batch > 0 && p.num_kv_heads > 0 &&
        (p.kv_dtype == DType::i8 || p.kv_dtype == DType::f8e4m3)) {
      const unsigned rows = unsigned(p.batch * kv.n_new * p.num_kv_heads);
      err = p.kv_dtype == DType::i8 ? launch_append_codes<int8_t>(p, kv, rows, stream)
                                    : launch_append_codes<f8e4m3_t>(p, kv, rows, stream);
      if (err != cudaSuccess) return err;
    } else if (kv.k_new && kv.n_new > 0 && p.batch > 0 && p.num_kv_heads > 0) {
      const unsigned rows = unsigned(p.batch * kv.n_new * p.num_kv_heads);
      auto kernel = p.kv_dtype == DType::f64   ? kv_append_kernel<uint64_t>
                    : p.kv_dtype == DType::f32 ? kv_append_kernel<uint32_t>
                                               : kv_append_kernel<uint16_t>;
      ATTNKIT_LAUNCH(kernel, rows, 128, 0, stream, p, kv);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
  }
  if (p.batch == 0 || p.num_heads == 0 || p.seqlen_q == 0) return cudaSuccess;

  FwdLaunch L;
  L.pack = plan.pack;
  L.head_groups = plan.head_groups;
  L.num_m_blocks = plan.num_m_blocks;
  L.num_splits = plan.num_splits;
  L.split_keys = plan.split_keys;
  L.split_own_range = plan.decode_kernel;
  L.num_pages = kv.block_table ? kv.num_pages : 0;
  if (plan.num_splits > 1) {
    L.o_accum = reinterpret_cast<float*>(base + plan.off_o_accum);
    L.lse_accum = reinterpret_cast<float*>(base + plan.off_lse_accum);
  }
  if (plan.tensor_cores || plan.decode_kernel) {  // (the Hopper kernel is a tensor-core plan)
    const int kv16 = p.kv_dtype == DType::i8 || p.kv_dtype == DType::f8e4m3 ? 16 : 8;
    L.vec_loads = rows_aligned16(p.q, p.q_stride, 8) && rows_aligned16(p.k, p.k_stride, kv16) &&
                  rows_aligned16(p.v, p.v_stride, kv16);
    L.vec_store = reinterpret_cast<uintptr_t>(p.out) % 4 == 0 && p.out_stride[0] % 2 == 0 &&
                  p.out_stride[1] % 2 == 0 && p.out_stride[2] % 2 == 0;
    err = p.q_dtype == DType::f16
              ? launch_tensor_core<half>(p, L, plan.head_dim_bucket, plan.decode_kernel,
                                         plan.hopper, stream)
              : launch_tensor_core<bf16>(p, L, plan.head_dim_bucket, plan.decode_kernel,
                                         plan.hopper, stream);
  } else if (p.kv_dtype == DType::i8 || p.kv_dtype == DType::f8e4m3) {
    err = p.q_dtype == DType::f16    ? launch_simt_codes<half>(p, L, stream)
          : p.q_dtype == DType::bf16 ? launch_simt_codes<bf16>(p, L, stream)
                                     : launch_simt_codes<float>(p, L, stream);
  } else if (p.q_dtype == DType::f64) {
    err = launch_attention_simt<double, double, double>(p, L, stream);
  } else if (p.kv_dtype == DType::f16) {
    err = launch_attention_simt<float, half, float>(p, L, stream);
  } else if (p.kv_dtype == DType::bf16) {
    err = launch_attention_simt<float, bf16, float>(p, L, stream);
  } else {
    err = launch_attention_simt<float, float, float>(p, L, stream);
  }
  if (err != cudaSuccess || plan.num_splits == 1) return err;
  switch (p.q_dtype) {
    case DType::f16:
      return launch_combine<half>(p, L, stream);
    case DType::bf16:
      return launch_combine<bf16>(p, L, stream);
    case DType::f64:
      return launch_combine<double>(p, L, stream);
    default:
      return launch_combine<float>(p, L, stream);
  }
}

cudaError_t quantize_kv(const QuantizeParams& p, cudaStream_t stream) {
  int64_t rows = 1;
  for (int d = 0; d < p.outer_ndim; ++d) rows *= p.outer_shape[d];
  if (rows == 0 || p.n == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  return p.q_dtype == DType::i8 ? launch_quantize<int8_t>(p, unsigned(rows), stream)
                                : launch_quantize<f8e4m3_t>(p, unsigned(rows), stream);
}

}  // namespace cuda
}  // namespace attnkit
