// Split-KV paged decode attention (flash-decoding): one query token per sequence.
//
// Grid (num_splits, Hkv * q_subgroups, B), 128 threads. A CTA serves the query heads of one kv head
// (up to kDecodeMaxGroup of them), so each K/V byte is read once per GQA group, over one contiguous
// chunk of the sequence: the chunk is cut on the device from seq_lens (a launch never depends on
// the lengths, so it can be captured in a CUDA graph and replayed with new lengths).
//
// Per CTA: K and V tiles of kDecodeTileTokens tokens x D stream into shared memory through a
// kDecodeStages-deep cp.async ring (16-byte copies, zero-filled past the end). A "lane group" of
// CP lanes (CP = D/8 rounded up to a power of two) owns one token at a time: lane c holds q[:, 8c:8c+8]
// in fp32 registers, dots it with its 16-byte K chunk and the group reduces with shuffles. Each lane
// group runs its own online softmax (max, sum, acc[g][8 dims]) over the tokens it saw; at the end the
// groups merge (shuffles within a warp, shared memory across warps). With one split the CTA writes
// `out`; otherwise it writes an unnormalised partial (acc, max, sum) and a second kernel combines the
// splits by log-sum-exp. Scores live in log2 units (q is pre-scaled by scale * log2(e)).
#include "epd_kernels/attn_varlen/decode_params.h"
#include "epd_kernels/common.cuh"

namespace epd {
namespace {

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 8 consecutive 16-bit elements (one 16-byte chunk) to fp32.
template <typename T>
__device__ __forceinline__ void chunk_to_float(const uint4& u, float (&f)[8]);
template <>
__device__ __forceinline__ void chunk_to_float<__nv_bfloat16>(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
template <>
__device__ __forceinline__ void chunk_to_float<half>(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], 4);
    const float2 v = __half22float2(h);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

// Resident CTAs per SM the register budget should allow (the tile ring allows 4 at D = 128).
template <int kGroup>
constexpr int decode_min_ctas() { return kGroup >= 8 ? 1 : kGroup >= 4 ? 2 : 4; }

template <typename T, int kHeadDim, int kGroup>
__global__ void __launch_bounds__(kDecodeThreads, decode_min_ctas<kGroup>()) paged_decode_kernel(const PagedDecodeParams p) {
  constexpr int D = kHeadDim;
  constexpr int C = D / 8;                  // 16-byte chunks per K/V row
  constexpr int CP = C <= 8 ? 8 : 16;       // lanes per token group (power of two >= C)
  constexpr int NG = 32 / CP;               // token groups per warp
  constexpr int W = kDecodeThreads / 32;
  constexpr int kGroups = W * NG;           // tokens in flight per CTA step
  constexpr int TT = kDecodeTileTokens;
  constexpr int kTokPerGroup = TT / kGroups;
  constexpr int kTileElems = TT * D;        // one K (or V) tile
  constexpr int kCopies = TT * C;           // 16-byte copies per K (or V) tile
  constexpr int kCopyIters = (kCopies + kDecodeThreads - 1) / kDecodeThreads;
  static_assert(D % 8 == 0 && C <= 16, "head_dim must be a multiple of 8, at most 128");
  static_assert(TT % kGroups == 0, "tile must split evenly over token groups");
  static_assert(kGroup <= kDecodeMaxGroup, "group too large");

  extern __shared__ __align__(16) unsigned char smem[];
  T* s_tiles = reinterpret_cast<T*>(smem);  // [kDecodeStages][2][TT][D]
  int* s_bt = reinterpret_cast<int*>(smem + paged_decode_tile_region_bytes(D));

  const int split = blockIdx.x;
  const int kvh = blockIdx.y / p.q_subgroups;
  const int q_head0 = kvh * p.group + (blockIdx.y % p.q_subgroups) * kGroup;
  const int n_q = min(kGroup, p.group - (blockIdx.y % p.q_subgroups) * kGroup);
  const int b = blockIdx.z;
  const int tid = threadIdx.x;

  // This split's tiles, cut from the live length (clamped to what the block table can address).
  const int seq_len = max(0, min(p.seq_lens[b], p.max_blocks * p.block_size));
  const int n_tiles_total = (seq_len + TT - 1) / TT;
  const int tiles_per_split = p.split_tiles > 0 ? p.split_tiles : (n_tiles_total + p.num_splits - 1) / p.num_splits;
  const int tile_begin = split * tiles_per_split;
  const int n_tiles = max(0, min(tiles_per_split, n_tiles_total - tile_begin));

  T* out = reinterpret_cast<T*>(p.out) + b * p.out_stride_b;
  const int64_t part_row0 = (static_cast<int64_t>(b) * p.num_q_heads + q_head0) * p.num_splits + split;

  if (n_tiles == 0) {  // empty chunk (or padded row): zeros, or an empty partial (-inf max, 0 sum)
    if (p.direct) {
      for (int i = tid; i < n_q * D; i += kDecodeThreads)
        out[(q_head0 + i / D) * p.out_stride_h + i % D] = from_float<T>(0.f);
    } else if (tid < n_q) {
      float* ml = p.partial_ml + (part_row0 + static_cast<int64_t>(tid) * p.num_splits) * 2;
      ml[0] = -INFINITY;
      ml[1] = 0.f;
    }
    return;
  }

  const int lg = p.log2_block_size;
  const int tok_begin = tile_begin * TT;
  const int tok_end = min(tok_begin + n_tiles * TT, seq_len);
  const int blk_begin = tok_begin >> lg;
  const int blk_count = min(((tok_end - 1) >> lg) - blk_begin + 1, p.bt_smem_entries);
  const int* bt_row = p.block_tables + b * p.bt_stride + blk_begin;
  for (int i = tid; i < blk_count; i += kDecodeThreads) s_bt[i] = bt_row[i];

  const int lane = tid & 31, warp = tid >> 5;
  const int c = lane % CP;          // this lane's 16-byte chunk of a row
  const int grp = warp * NG + lane / CP;
  const bool chunk_lane = c < C;    // D = 80, 96: some lanes of a group hold no chunk

  // q[g][8c : 8c+8] in fp32, pre-scaled into log2 units; absent heads/chunks are 0.
  float qf[kGroup][8];
  {
    const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_stride_b;
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        qf[g][e] = (chunk_lane && g < n_q) ? to_float(q[(q_head0 + g) * p.q_stride_h + c * 8 + e]) * p.scale_log2
                                           : 0.f;
    }
  }

  const T* kv = reinterpret_cast<const T*>(p.kv_arena) + p.kv_layer_offset + kvh * p.kv_stride_head;
  const int block_mask = p.block_size - 1;
  __syncthreads();  // s_bt

  auto load_tile = [&](int tile, int stage) {
    T* sk = s_tiles + stage * 2 * kTileElems;
    T* sv = sk + kTileElems;
    const int tok0 = tok_begin + tile * TT;
#pragma unroll
    for (int it = 0; it < kCopyIters; ++it) {
      const int idx = tid + it * kDecodeThreads;
      if (kCopies % kDecodeThreads == 0 || idx < kCopies) {
        const int t = idx / C, cc = idx % C;
        const int tok = tok0 + t;
        const bool valid = tok < tok_end;
        const T* src_k = kv;  // any valid address; not read when !valid
        const T* src_v = kv;
        if (valid) {
          const int64_t phys = s_bt[(tok >> lg) - blk_begin];
          src_k = kv + phys * p.kv_stride_block + static_cast<int64_t>(tok & block_mask) * p.kv_stride_token + cc * 8;
          src_v = src_k + p.kv_stride_kv;
        }
        cp_async_16(sk + t * D + cc * 8, src_k, valid);
        cp_async_16(sv + t * D + cc * 8, src_v, valid);
      }
    }
  };

  float m[kGroup], l[kGroup], acc[kGroup][8];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }

#pragma unroll
  for (int s = 0; s < kDecodeStages - 1; ++s) {
    if (s < n_tiles) load_tile(s, s);
    cp_async_commit();
  }

  int stage = 0;
  for (int tile = 0; tile < n_tiles; ++tile) {
    cp_async_wait<kDecodeStages - 2>();  // this thread's copies of `tile` landed
    __syncthreads();                      // everyone's did; everyone is done with tile - 1
    {
      const int next = tile + kDecodeStages - 1;
      int next_stage = stage + kDecodeStages - 1;
      if (next_stage >= kDecodeStages) next_stage -= kDecodeStages;
      if (next < n_tiles) load_tile(next, next_stage);
      cp_async_commit();
    }
    const T* sk = s_tiles + stage * 2 * kTileElems;
    const T* sv = sk + kTileElems;
    const int tok0 = tok_begin + tile * TT;

    // Scores of this group's tokens: t = grp + i * kGroups.
    float s[kTokPerGroup][kGroup];
#pragma unroll
    for (int i = 0; i < kTokPerGroup; ++i) {
      const int t = grp + i * kGroups;
      float kf[8];
      if (chunk_lane) {
        chunk_to_float<T>(*reinterpret_cast<const uint4*>(sk + t * D + c * 8), kf);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) kf[e] = 0.f;
      }
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(qf[g][e], kf[e], dot);
#pragma unroll
        for (int off = CP / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        s[i][g] = (tok0 + t < tok_end) ? dot : -INFINITY;
      }
    }

    // Online softmax of this lane group, then P @ V.
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      float mx = m[g];
#pragma unroll
      for (int i = 0; i < kTokPerGroup; ++i) mx = fmaxf(mx, s[i][g]);
      const float base = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(m[g] - base);
      m[g] = mx;
      l[g] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= alpha;
#pragma unroll
      for (int i = 0; i < kTokPerGroup; ++i) {
        s[i][g] = exp2f(s[i][g] - base);
        l[g] += s[i][g];
      }
    }
    if (chunk_lane) {
#pragma unroll
      for (int i = 0; i < kTokPerGroup; ++i) {
        const int t = grp + i * kGroups;
        float vf[8];
        chunk_to_float<T>(*reinterpret_cast<const uint4*>(sv + t * D + c * 8), vf);
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(s[i][g], vf[e], acc[g][e]);
        }
      }
    }
    if (++stage == kDecodeStages) stage = 0;
  }
  cp_async_wait<0>();
  __syncthreads();  // the tile ring is free: reuse it for the merge

  // Merge the NG lane groups of this warp (same chunk c, different tokens).
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    float mx = m[g];
#pragma unroll
    for (int off = CP; off < 32; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float f = exp2f(m[g] - (mx == -INFINITY ? 0.f : mx));
    float sum = l[g] * f;
#pragma unroll
    for (int off = CP; off < 32; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float a = acc[g][e] * f;
#pragma unroll
      for (int off = CP; off < 32; off <<= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
      acc[g][e] = a;
    }
    m[g] = mx;
    l[g] = sum;
  }

  // Merge the warps through shared memory: s_acc [W][kGroup][D], s_m / s_l [W][kGroup].
  float* s_acc = reinterpret_cast<float*>(smem);
  float* s_m = s_acc + W * kGroup * D;
  float* s_l = s_m + W * kGroup;
  if (lane < CP && chunk_lane) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
#pragma unroll
      for (int e = 0; e < 8; ++e) s_acc[(warp * kGroup + g) * D + c * 8 + e] = acc[g][e];
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      s_m[warp * kGroup + g] = m[g];
      s_l[warp * kGroup + g] = l[g];
    }
  }
  __syncthreads();

  for (int i = tid; i < n_q * D; i += kDecodeThreads) {
    const int g = i / D, d = i % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < W; ++w) mx = fmaxf(mx, s_m[w * kGroup + g]);
    const float base = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, a = 0.f;
#pragma unroll
    for (int w = 0; w < W; ++w) {
      const float f = exp2f(s_m[w * kGroup + g] - base);
      sum += s_l[w * kGroup + g] * f;
      a += s_acc[(w * kGroup + g) * D + d] * f;
    }
    if (p.direct) {
      out[(q_head0 + g) * p.out_stride_h + d] = from_float<T>(sum > 0.f ? a / sum : 0.f);
    } else {
      const int64_t row = part_row0 + static_cast<int64_t>(g) * p.num_splits;
      p.partial_acc[row * D + d] = a;
      if (d == 0) {
        p.partial_ml[row * 2] = mx;
        p.partial_ml[row * 2 + 1] = sum;
      }
    }
  }
}

// Combine the splits of one (sequence, query head): out = sum_s w_s acc_s / sum_s w_s l_s,
// w_s = 2^(m_s - max_s m_s); empty splits (m = -inf, acc never written) are skipped.
template <typename T>
__global__ void __launch_bounds__(128) paged_decode_reduce_kernel(const PagedDecodeParams p) {
  __shared__ float s_w[kDecodeMaxSplits];
  __shared__ float s_inv_sum;
  const int hq = blockIdx.x, b = blockIdx.y;
  const int S = p.num_splits;
  const int64_t row0 = (static_cast<int64_t>(b) * p.num_q_heads + hq) * S;
  const float* ml = p.partial_ml + row0 * 2;

  float mx = -INFINITY;
  for (int s = 0; s < S; ++s) mx = fmaxf(mx, ml[2 * s]);
  for (int s = threadIdx.x; s < S; s += blockDim.x) {
    const float ms = ml[2 * s];
    s_w[s] = ms == -INFINITY ? 0.f : exp2f(ms - mx);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int s = 0; s < S; ++s)
      if (s_w[s] != 0.f) sum += s_w[s] * ml[2 * s + 1];
    s_inv_sum = sum > 0.f ? 1.f / sum : 0.f;
  }
  __syncthreads();
  T* out = reinterpret_cast<T*>(p.out) + b * p.out_stride_b + hq * p.out_stride_h;
  const float* acc = p.partial_acc + row0 * p.head_dim;
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    float a = 0.f;
    for (int s = 0; s < S; ++s)
      if (s_w[s] != 0.f) a += s_w[s] * acc[static_cast<int64_t>(s) * p.head_dim + d];
    out[d] = from_float<T>(a * s_inv_sum);
  }
}

template <typename T, int kHeadDim, int kGroup>
void launch(const PagedDecodeParams& p, cudaStream_t stream) {
  auto kernel = paged_decode_kernel<T, kHeadDim, kGroup>;
  const int smem = paged_decode_smem_bytes(kHeadDim, p.bt_smem_entries);
  if (smem > 48 * 1024) {
    // Like FlashAttention, set on every launch: cheap, and legal during graph capture.
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) return;
  }
  const dim3 grid(p.num_splits, p.num_kv_heads * p.q_subgroups, p.batch);
  kernel<<<grid, kDecodeThreads, smem, stream>>>(p);
  if (!p.direct) paged_decode_reduce_kernel<T><<<dim3(p.num_q_heads, p.batch), 128, 0, stream>>>(p);
}

}  // namespace

void launch_paged_attention_decode(const PagedDecodeParams& p, cudaStream_t stream) {
  EPD_SWITCH_HALF_TYPES(p.dtype, [&] {
    EPD_SWITCH_HEAD_DIM(p.head_dim, [&] {
      switch (p.group_per_cta) {
        case 1: launch<scalar_t, kHeadDim, 1>(p, stream); break;
        case 2: launch<scalar_t, kHeadDim, 2>(p, stream); break;
        case 4: launch<scalar_t, kHeadDim, 4>(p, stream); break;
        default: launch<scalar_t, kHeadDim, 8>(p, stream); break;
      }
    });
  });
}

}  // namespace epd
