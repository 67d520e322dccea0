// FlashAttention-2 forward mainloop shared by paged varlen prefill (causal, K/V gathered through a
// block table) and dense vision attention (non-causal, strided K/V). Only the "problem" class that
// maps rows to addresses differs between the two.
//
// One CTA = kNWarps warps = a tile of kBlockM query rows of one (sequence, KV head); each warp owns
// 16 or 32 rows (FmhaConfig::kMFrags). K/V tiles of kBlockN keys are copied to shared memory with
// cp.async (K of the next tile streams in during P·V, V of this tile during Q·K^T), read with
// ldmatrix and multiplied with mma.sync.m16n8k16 into fp32 accumulators. Softmax is online (running
// max and sum per row, exp2 with the scale folded in); P is rounded to the input type for P·V.
//
// GQA: the rows of a tile are (query, head-in-group) pairs, row r = query r / G, head kv_head*G + r % G,
// so the G query heads sharing a KV head share every K/V tile load.
// Causal: K/V tiles run from the last needed one down to 0; only tiles that cross the diagonal
// (or the end of the keys) are masked, and tiles wholly above the diagonal are never loaded.
// Out-of-range Q/K/V rows are zero-filled in shared memory, so masked keys never meet stale data.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

#include "epd_kernels/attn_varlen/params.h"
#include "epd_kernels/common.cuh"

namespace epd {
namespace fmha {

// ----------------------------------------------------------------------------- PTX helpers

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when !valid nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c[16x8 fp32] += a[16x16] * b[16x8]; fragment layouts of PTX mma.m16n8k16 (row.col).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one 32-bit register of two 16-bit values (lo in the low half = lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// ----------------------------------------------------------------------------- problems
// A problem maps the CTA (blockIdx.y = sequence, blockIdx.z = head or KV head) to its rows:
//   init() -> false when the CTA has no queries; q_len, kv_len, group;
//   q_row(r) / o_row(r): packed query row r (0 <= r < q_len * group);
//   k_row(t) / v_row(t): key t (0 <= t < kv_len); any_row(): a valid address for zero-fill copies.

template <typename T>
struct PagedProblem {
  using Params = PagedPrefillParams;
  const T* q;
  T* o;
  const T* kv;
  const int32_t* block_table;
  int64_t q_row_stride, q_head_stride, o_row_stride, o_head_stride;
  int64_t block_stride, token_stride, v_offset;
  int log2_block_size, block_mask;
  int q_len, kv_len, group;

  __device__ __forceinline__ bool init(const Params& p) {
    const int b = blockIdx.y;
    const int kv_head = blockIdx.z;
    const int q_start = p.cu_seqlens_q[b];
    q_len = p.cu_seqlens_q[b + 1] - q_start;
    kv_len = p.seq_lens[b];
    group = p.num_heads / p.num_kv_heads;
    const int head0 = kv_head * group;
    q_row_stride = p.q_row_stride;
    q_head_stride = p.q_head_stride;
    o_row_stride = p.o_row_stride;
    o_head_stride = p.o_head_stride;
    q = static_cast<const T*>(p.q) + q_start * q_row_stride + head0 * q_head_stride;
    o = static_cast<T*>(p.out) + q_start * o_row_stride + head0 * o_head_stride;
    kv = static_cast<const T*>(p.kv) + static_cast<int64_t>(kv_head) * p.head_dim;
    block_table = p.block_tables + b * p.block_table_stride;
    block_stride = p.block_stride;
    token_stride = p.token_stride;
    v_offset = p.v_offset;
    log2_block_size = p.log2_block_size;
    block_mask = (1 << p.log2_block_size) - 1;
    return q_len > 0;
  }
  __device__ __forceinline__ const T* q_row(int r) const {
    const int i = r / group;
    return q + i * q_row_stride + (r - i * group) * q_head_stride;
  }
  __device__ __forceinline__ T* o_row(int r) const {
    const int i = r / group;
    return o + i * o_row_stride + (r - i * group) * o_head_stride;
  }
  __device__ __forceinline__ const T* k_row(int t) const {
    const int64_t block = __ldg(block_table + (t >> log2_block_size));
    return kv + block * block_stride + (t & block_mask) * token_stride;
  }
  __device__ __forceinline__ const T* v_row(int t) const { return k_row(t) + v_offset; }
  __device__ __forceinline__ const T* any_row() const { return q; }
};

template <typename T>
struct DenseProblem {
  using Params = DenseAttnParams;
  const T* q;
  T* o;
  const T* k;
  const T* v;
  int64_t q_row_stride, o_row_stride, k_row_stride, v_row_stride;
  int q_len, kv_len, group;

  __device__ __forceinline__ bool init(const Params& p) {
    const int b = blockIdx.y;
    const int h = blockIdx.z;
    q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    o = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride;
    k = static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
    v = static_cast<const T*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
    q_row_stride = p.q_row_stride;
    o_row_stride = p.o_row_stride;
    k_row_stride = p.k_row_stride;
    v_row_stride = p.v_row_stride;
    q_len = kv_len = p.seqlen;
    group = 1;
    return q_len > 0;
  }
  __device__ __forceinline__ const T* q_row(int r) const { return q + r * q_row_stride; }
  __device__ __forceinline__ T* o_row(int r) const { return o + r * o_row_stride; }
  __device__ __forceinline__ const T* k_row(int t) const { return k + t * k_row_stride; }
  __device__ __forceinline__ const T* v_row(int t) const { return v + t * v_row_stride; }
  __device__ __forceinline__ const T* any_row() const { return q; }
};

// ----------------------------------------------------------------------------- kernel

// Tile configuration. A warp owns 16 * kMFrags query rows; kMFrags = 2 reuses every K/V fragment read
// from shared memory for two row fragments (less shared-memory traffic per MMA) but keeps Q in shared
// memory instead of registers. kMinBlocks: CTAs per SM the register allocation must allow.
template <int kHeadDim_, int kNWarps_, int kMFrags_, int kBlockN_, int kMinBlocks_ = 1>
struct FmhaConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kMFrags = kMFrags_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kWarpRows = 16 * kMFrags;
  static constexpr int kBlockM = kWarpRows * kNWarps;
  static constexpr int kThreads = 32 * kNWarps;
  static constexpr int kStride = kHeadDim + 8;  // smem row pitch (elements): odd multiple of 16 B, no ldmatrix conflicts
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kStride * 2;
  static constexpr bool kQInRegs = kMFrags == 1;
  static_assert(kHeadDim % 16 == 0 && kBlockN % 16 == 0, "tile shapes must be multiples of 16");
  static_assert(kMFrags == 1 || kMFrags == 2, "a warp owns 16 or 32 rows");
};

// kRows x kHeadDim tile (row r from row_ptr(r), zero-filled where !valid(r)) -> smem at pitch kHeadDim + 8.
template <int kRows, int kHeadDim, int kThreads, typename RowPtr, typename RowValid>
__device__ __forceinline__ void load_tile(uint32_t smem, RowPtr row_ptr, RowValid valid, const void* fallback) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kStride = kHeadDim + 8;
  constexpr int kTotal = kRows * kChunks;
#pragma unroll
  for (int it = 0; it < (kTotal + kThreads - 1) / kThreads; ++it) {
    const int i = static_cast<int>(threadIdx.x) + it * kThreads;
    if (kTotal % kThreads == 0 || i < kTotal) {
      const int r = i / kChunks;
      const int c = i - r * kChunks;
      const bool ok = valid(r);
      const char* src = ok ? reinterpret_cast<const char*>(row_ptr(r)) + c * 16
                           : static_cast<const char*>(fallback);
      cp_async_16(smem + (r * kStride + c * 8) * 2, src, ok);
    }
  }
}

template <typename T, typename Cfg, bool kCausal, typename Problem>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    fmha_fwd_kernel(const __grid_constant__ typename Problem::Params params) {
  constexpr int kHeadDim = Cfg::kHeadDim;
  constexpr int kMF = Cfg::kMFrags;
  constexpr int kBlockM = Cfg::kBlockM;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kStride = Cfg::kStride;
  constexpr int kChunks = Cfg::kChunks;
  constexpr int kKSteps = kHeadDim / 16;  // k-steps of Q·K^T
  constexpr int kNFrags = kBlockN / 8;    // n-fragments of S (keys)
  constexpr int kDFrags = kHeadDim / 8;   // n-fragments of O (head dim)

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  const uint32_t sQ_u32 = smem_u32(sQ);
  const uint32_t sK_u32 = sQ_u32 + kBlockM * kStride * 2;
  const uint32_t sV_u32 = sK_u32 + kBlockN * kStride * 2;

  Problem prob;
  if (!prob.init(params)) return;
  // Heaviest (last, for causal) row tiles first: better tail balance.
  const int m_block = static_cast<int>(gridDim.x - 1 - blockIdx.x);
  const int group = prob.group;
  const int rows_total = prob.q_len * group;
  const int row0 = m_block * kBlockM;
  if (row0 >= rows_total) return;

  const int kv_len = prob.kv_len;
  const int ctx = kv_len - prob.q_len;  // keys before the first query
  int key_end = kv_len;                 // keys [0, key_end) are visible to some row of this tile
  if constexpr (kCausal) {
    const int last_row = min(row0 + kBlockM, rows_total) - 1;
    key_end = min(kv_len, ctx + last_row / group + 1);
  }
  const int n_blocks = key_end > 0 ? (key_end + kBlockN - 1) / kBlockN : 0;
  const int first_pos = ctx + row0 / group;  // position of the tile's first (earliest) row

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int warp_row0 = warp * Cfg::kWarpRows;  // first row of this warp within the tile

  // Prologue: Q tile and the last K tile.
  load_tile<kBlockM, kHeadDim, kThreads>(
      sQ_u32, [&](int r) { return prob.q_row(row0 + r); }, [&](int r) { return row0 + r < rows_total; },
      prob.any_row());
  if (n_blocks > 0) {
    const int n0 = (n_blocks - 1) * kBlockN;
    load_tile<kBlockN, kHeadDim, kThreads>(
        sK_u32, [&](int r) { return prob.k_row(n0 + r); }, [&](int r) { return n0 + r < kv_len; }, prob.any_row());
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // ldmatrix lane offsets (bytes). Q as the A operand ([16 rows x 16 dims] per k-step); K as the B
  // operand of Q·K^T (n = key, k = dim), non-transposed; V as the B operand of P·V (k = key, n = dim),
  // transposed.
  const uint32_t q_lane_off =
      ((warp_row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8) * 2;
  const uint32_t k_lane_off = (((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8) * 2;
  const uint32_t v_lane_off = (((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8) * 2;

  // With one row fragment per warp, Q stays in registers for the whole loop.
  uint32_t qf[Cfg::kQInRegs ? kKSteps : 1][4];
  if constexpr (Cfg::kQInRegs) {
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) ldmatrix_x4(qf[ks], sQ_u32 + q_lane_off + ks * 16 * 2);
  }

  // Row fragment mf of this thread holds rows g and g + 8 (g = lane / 4) of the warp's rows
  // 16 mf .. 16 mf + 15, and in each 8-column fragment the columns 2 * (lane % 4) and +1.
  // Keys [0, limit) are visible to a row.
  int limit[kMF][2];
#pragma unroll
  for (int mf = 0; mf < kMF; ++mf) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + warp_row0 + mf * 16 + (lane >> 2) + h * 8;
      limit[mf][h] = kCausal ? min(kv_len, ctx + row / group + 1) : kv_len;
    }
  }
  const float scale_log2 = params.scale_log2;

  float acc_o[kMF][kDFrags][4];
  float row_max[kMF][2];
  float row_sum[kMF][2];  // this thread's partial sums; reduced over the quad at the end
#pragma unroll
  for (int mf = 0; mf < kMF; ++mf) {
#pragma unroll
    for (int d = 0; d < kDFrags; ++d) acc_o[mf][d][0] = acc_o[mf][d][1] = acc_o[mf][d][2] = acc_o[mf][d][3] = 0.f;
    row_max[mf][0] = row_max[mf][1] = -INFINITY;
    row_sum[mf][0] = row_sum[mf][1] = 0.f;
  }

  for (int n = n_blocks - 1; n >= 0; --n) {
    const int n0 = n * kBlockN;
    // K[n] has landed; every warp is done reading sV of the previous tile.
    cp_async_wait_all();
    __syncthreads();
    load_tile<kBlockN, kHeadDim, kThreads>(
        sV_u32, [&](int r) { return prob.v_row(n0 + r); }, [&](int r) { return n0 + r < kv_len; }, prob.any_row());
    cp_async_commit();

    // S = Q K^T for this warp's rows x kBlockN keys.
    float s[kMF][kNFrags][4];
#pragma unroll
    for (int mf = 0; mf < kMF; ++mf) {
#pragma unroll
      for (int f = 0; f < kNFrags; ++f) s[mf][f][0] = s[mf][f][1] = s[mf][f][2] = s[mf][f][3] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t a[kMF][4];
      if constexpr (Cfg::kQInRegs) {
#pragma unroll
        for (int j = 0; j < 4; ++j) a[0][j] = qf[ks][j];
      } else {
#pragma unroll
        for (int mf = 0; mf < kMF; ++mf) ldmatrix_x4(a[mf], sQ_u32 + q_lane_off + (mf * 16 * kStride + ks * 16) * 2);
      }
#pragma unroll
      for (int f2 = 0; f2 < kNFrags / 2; ++f2) {
        uint32_t b[4];
        ldmatrix_x4(b, sK_u32 + k_lane_off + (f2 * 16 * kStride + ks * 16) * 2);
#pragma unroll
        for (int mf = 0; mf < kMF; ++mf) {
          mma_16816<T>(s[mf][2 * f2], a[mf], b[0], b[1]);
          mma_16816<T>(s[mf][2 * f2 + 1], a[mf], b[2], b[3]);
        }
      }
    }

    const bool need_mask = (n0 + kBlockN > kv_len) || (kCausal && n0 + kBlockN - 1 > first_pos);
    if (need_mask) {
#pragma unroll
      for (int mf = 0; mf < kMF; ++mf) {
#pragma unroll
        for (int f = 0; f < kNFrags; ++f) {
          const int col = n0 + f * 8 + (lane & 3) * 2;
          if (col >= limit[mf][0]) s[mf][f][0] = -INFINITY;
          if (col + 1 >= limit[mf][0]) s[mf][f][1] = -INFINITY;
          if (col >= limit[mf][1]) s[mf][f][2] = -INFINITY;
          if (col + 1 >= limit[mf][1]) s[mf][f][3] = -INFINITY;
        }
      }
    }

    // Online softmax; P as the A operand of P·V: k-step kk covers keys 16 kk .. 16 kk + 15 = S fragments
    // 2 kk and 2 kk + 1.
    uint32_t pa[kMF][kNFrags / 2][4];
#pragma unroll
    for (int mf = 0; mf < kMF; ++mf) {
      float mx[2] = {row_max[mf][0], row_max[mf][1]};
#pragma unroll
      for (int f = 0; f < kNFrags; ++f) {
        mx[0] = fmaxf(mx[0], fmaxf(s[mf][f][0], s[mf][f][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[mf][f][2], s[mf][f][3]));
      }
      float m_scaled[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        // A row with no visible key yet keeps max -inf; subtract 0 so exp2 gives 0, not NaN.
        m_scaled[h] = mx[h] == -INFINITY ? 0.f : mx[h] * scale_log2;
        const float corr = exp2f(row_max[mf][h] * scale_log2 - m_scaled[h]);
        row_max[mf][h] = mx[h];
        row_sum[mf][h] *= corr;
#pragma unroll
        for (int d = 0; d < kDFrags; ++d) {
          acc_o[mf][d][2 * h] *= corr;
          acc_o[mf][d][2 * h + 1] *= corr;
        }
      }
#pragma unroll
      for (int f = 0; f < kNFrags; ++f) {
        s[mf][f][0] = exp2f(fmaf(s[mf][f][0], scale_log2, -m_scaled[0]));
        s[mf][f][1] = exp2f(fmaf(s[mf][f][1], scale_log2, -m_scaled[0]));
        s[mf][f][2] = exp2f(fmaf(s[mf][f][2], scale_log2, -m_scaled[1]));
        s[mf][f][3] = exp2f(fmaf(s[mf][f][3], scale_log2, -m_scaled[1]));
        row_sum[mf][0] += s[mf][f][0] + s[mf][f][1];
        row_sum[mf][1] += s[mf][f][2] + s[mf][f][3];
      }
#pragma unroll
      for (int kk = 0; kk < kNFrags / 2; ++kk) {
        pa[mf][kk][0] = pack2<T>(s[mf][2 * kk][0], s[mf][2 * kk][1]);
        pa[mf][kk][1] = pack2<T>(s[mf][2 * kk][2], s[mf][2 * kk][3]);
        pa[mf][kk][2] = pack2<T>(s[mf][2 * kk + 1][0], s[mf][2 * kk + 1][1]);
        pa[mf][kk][3] = pack2<T>(s[mf][2 * kk + 1][2], s[mf][2 * kk + 1][3]);
      }
    }

    // V[n] has landed; every warp is done reading sK, so the next K tile may stream in during P·V.
    cp_async_wait_all();
    __syncthreads();
    if (n > 0) {
      const int n1 = n0 - kBlockN;
      load_tile<kBlockN, kHeadDim, kThreads>(
          sK_u32, [&](int r) { return prob.k_row(n1 + r); }, [&](int r) { return n1 + r < kv_len; },
          prob.any_row());
      cp_async_commit();
    }

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < kNFrags / 2; ++kk) {
#pragma unroll
      for (int d2 = 0; d2 < kDFrags / 2; ++d2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, sV_u32 + v_lane_off + (kk * 16 * kStride + d2 * 16) * 2);
#pragma unroll
        for (int mf = 0; mf < kMF; ++mf) {
          mma_16816<T>(acc_o[mf][2 * d2], pa[mf][kk], b[0], b[1]);
          mma_16816<T>(acc_o[mf][2 * d2 + 1], pa[mf][kk], b[2], b[3]);
        }
      }
    }
  }

  // Epilogue: normalise, stage this warp's rows in its own rows of sQ (only this warp ever read them),
  // then write 16-byte chunks.
  T* sO = sQ + warp_row0 * kStride;
#pragma unroll
  for (int mf = 0; mf < kMF; ++mf) {
    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[mf][h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      inv[h] = sum > 0.f ? 1.f / sum : 0.f;
    }
    const int r = mf * 16 + (lane >> 2);
    const int c = (lane & 3) * 2;
#pragma unroll
    for (int d = 0; d < kDFrags; ++d) {
      *reinterpret_cast<uint32_t*>(sO + r * kStride + d * 8 + c) =
          pack2<T>(acc_o[mf][d][0] * inv[0], acc_o[mf][d][1] * inv[0]);
      *reinterpret_cast<uint32_t*>(sO + (r + 8) * kStride + d * 8 + c) =
          pack2<T>(acc_o[mf][d][2] * inv[1], acc_o[mf][d][3] * inv[1]);
    }
  }
  __syncwarp();
  constexpr int kWarpChunks = Cfg::kWarpRows * kChunks;
#pragma unroll
  for (int it = 0; it < (kWarpChunks + 31) / 32; ++it) {
    const int i = lane + it * 32;
    if (i < kWarpChunks) {
      const int r = i / kChunks;
      const int c = i - r * kChunks;
      const int row = row0 + warp_row0 + r;
      if (row < rows_total) {
        *reinterpret_cast<uint4*>(prob.o_row(row) + c * 8) = *reinterpret_cast<const uint4*>(sO + r * kStride + c * 8);
      }
    }
  }
}

// A/B switch (issue 16, session 17; the winner becomes the code and the switch goes): EPD_FMHA_TILES
// = 1, 2 or 3 picks another tile configuration for the large-grid path of the dense (head_dim 64) and
// prefill (head_dim 128) launchers; unset or anything else: today's. Read once per process.
inline int tiles_variant() {
  static const int v = [] {
    const char* s = std::getenv("EPD_FMHA_TILES");
    return s != nullptr && s[0] >= '1' && s[0] <= '3' && s[1] == '\0' ? s[0] - '0' : 0;
  }();
  return v;
}

// CTAs of a grid with block_m rows per CTA.
inline int64_t grid_ctas(int64_t rows, int block_m, int grid_y, int grid_z) {
  return (rows + block_m - 1) / block_m * grid_y * grid_z;
}

// Launch one instantiation: grid = (row tiles, sequences or batch, heads or KV heads).
template <typename T, typename Cfg, bool kCausal, typename Problem>
void launch_fmha(const typename Problem::Params& p, int64_t rows, int grid_y, int grid_z, cudaStream_t stream) {
  const int row_tiles = static_cast<int>((rows + Cfg::kBlockM - 1) / Cfg::kBlockM);
  if (row_tiles == 0 || grid_y == 0 || grid_z == 0) return;
  auto kernel = fmha_fwd_kernel<T, Cfg, kCausal, Problem>;
  if (Cfg::kSmemBytes > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  }
  kernel<<<dim3(row_tiles, grid_y, grid_z), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
}

}  // namespace fmha
}  // namespace epd
