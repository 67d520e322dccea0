// RoPE on q and k + paged KV-cache write. One thread per (token, head, 8-column chunk of the first
// half): it loads columns [c, c+8) and [D/2 + c, D/2 + c + 8) of one head of q, k or v (16 bytes each),
// rotates q/k pairs, and writes q_rot or the arena. Heads are ordered q | k | v per token.
#include "epd_kernels/common.cuh"
#include "epd_kernels/rmsnorm_rope/params.h"
#include "epd_kernels/rmsnorm_rope/row_vec.cuh"

namespace epd {
namespace {

constexpr int kRopeThreads = 256;

// cos/sin for 8 columns: fp32 table values rounded to T first, as HF does.
template <typename T> __device__ __forceinline__ void load_rounded8(const float* src, float (&dst)[8]) {
  const float4 a = reinterpret_cast<const float4*>(src)[0];
  const float4 b = reinterpret_cast<const float4*>(src)[1];
  const float raw[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
  for (int e = 0; e < 8; ++e) dst[e] = to_float(from_float<T>(raw[e]));
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kRopeThreads) rope_cache_kernel(const RopeCacheParams p) {
  using V = VecN<T, 8>;
  constexpr int kHalf = kHeadDim / 2;
  constexpr int kChunks = kHalf / 8;
  static_assert(kHalf % 8 == 0, "head_dim / 2 must be a multiple of 8");
  const int heads = p.num_q_heads + 2 * p.num_kv_heads;
  const int64_t items = static_cast<int64_t>(heads) * kChunks;  // threads per token
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kRopeThreads + threadIdx.x;
  if (idx >= p.num_tokens * items) return;  // no barriers or shuffles below
  const int64_t t = idx / items;
  const int rem = static_cast<int>(idx - t * items);
  const int h = rem / kChunks;
  const int col = (rem - h * kChunks) * 8;
  const bool is_q = h < p.num_q_heads;
  const bool is_v = h >= p.num_q_heads + p.num_kv_heads;

  int64_t slot = -1;
  if (!is_q) {
    slot = p.slot_mapping[t];
    if (slot < 0) return;  // padded token: nothing of k/v to write
  }
  const int kv_head = is_q ? 0 : (is_v ? h - p.num_q_heads - p.num_kv_heads : h - p.num_q_heads);
  const T* src = is_q   ? static_cast<const T*>(p.q) + t * p.q_row_stride + static_cast<int64_t>(h) * kHeadDim
                 : is_v ? static_cast<const T*>(p.v) + t * p.v_row_stride + static_cast<int64_t>(kv_head) * kHeadDim
                        : static_cast<const T*>(p.k) + t * p.k_row_stride + static_cast<int64_t>(kv_head) * kHeadDim;
  const V x1 = *reinterpret_cast<const V*>(src + col);
  const V x2 = *reinterpret_cast<const V*>(src + kHalf + col);

  V y1, y2;
  if (is_v) {
    y1 = x1;
    y2 = x2;
  } else {
    const float* table = p.cos_sin + p.positions[t] * kHeadDim;
    float cos_r[8], sin_r[8];
    load_rounded8<T>(table + col, cos_r);
    load_rounded8<T>(table + kHalf + col, sin_r);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float a = to_float(x1.v[e]), b = to_float(x2.v[e]);
      // x * cos + rotate_half(x) * sin, each op rounded in fp32 (no FMA) like the torch reference.
      y1.v[e] = from_float<T>(__fadd_rn(__fmul_rn(a, cos_r[e]), __fmul_rn(-b, sin_r[e])));
      y2.v[e] = from_float<T>(__fadd_rn(__fmul_rn(b, cos_r[e]), __fmul_rn(a, sin_r[e])));
    }
  }

  T* dst;
  if (is_q) {
    dst = static_cast<T*>(p.q_rot) + (t * p.num_q_heads + h) * kHeadDim;
  } else {
    const int64_t block = slot / p.block_size, offset = slot - block * p.block_size;
    dst = static_cast<T*>(p.kv_arena) + block * p.arena_block_stride + p.layer * p.arena_layer_stride +
          (is_v ? p.arena_kv_stride : 0) + offset * p.arena_slot_stride + static_cast<int64_t>(kv_head) * kHeadDim;
  }
  *reinterpret_cast<V*>(dst + col) = y1;
  *reinterpret_cast<V*>(dst + kHalf + col) = y2;
}

}  // namespace

void launch_rope_and_cache_write(const RopeCacheParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return;
  EPD_SWITCH_HALF_TYPES(p.dtype, [&] {
    EPD_SWITCH_HEAD_DIM(p.head_dim, [&] {
      const int64_t threads = p.num_tokens * (p.num_q_heads + 2 * p.num_kv_heads) * (kHeadDim / 16);
      const unsigned grid = static_cast<unsigned>((threads + kRopeThreads - 1) / kRopeThreads);
      rope_cache_kernel<scalar_t, kHeadDim><<<grid, kRopeThreads, 0, stream>>>(p);
    });
  });
}

}  // namespace epd
