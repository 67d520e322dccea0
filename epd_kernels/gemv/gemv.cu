// Small-batch GEMV for decode (M <= 8 rows of x): linear (out = x @ w^T) and gate_up_silu (the fused
// gate | up projection followed by silu_and_mul, the [M, 2I] intermediate never written).
//
// Bandwidth-bound: every weight byte is read once, so the kernel streams w with 16-byte non-caching
// loads and does the math on tensor cores (mma.sync m16n8k16, fp32 accumulation), which needs no
// per-element conversion and reads x at half the weight rate instead of M times it:
//   * a CTA owns one 16-row tile of w (gate_up_silu: 8 gate rows and the 8 matching up rows); its 8
//     warps split K into contiguous slices (split-K inside the CTA) and sum their partial tiles in
//     shared memory, in warp order, at the end. (Two tiles per CTA read x half as often but were
//     slower: qkv 86.5% vs 94% of copy bandwidth in the kernel bench; gate_up_silu as a gate tile
//     plus an up tile 90 MB away took 78.7 us in the decode step, this layout 59.6 us.)
//   * the K reduction order is free, so lane (g = lane / 4, t = lane % 4) loads w[row g][k0 + 8t, +8),
//     w[row g + 8][...] and x[token g][...] as plain 16-byte vectors and hands them to the MMA as the A
//     and B fragments of a 32-wide K chunk (physical k0 + 8t + 2j + {0,1} is logical column 2t + {0,1}
//     or 2t + 8 + {0,1}; A and B use the same map, so the dot products are unchanged);
//   * a warp issues all the loads of kChunks chunks (8 x 16 bytes of w per lane) before their MMAs;
//     at 80 registers 3 CTAs fit per SM. Measured in the decode step (H100, batch 1): 16 loads per
//     lane (120 registers, 2 CTAs) 5.43 ms, 8 loads capped at 2 CTAs by shared memory 6.08 ms,
//     this 5.26 ms;
//   * tokens g >= M load zeros and their output columns are dropped, so M needs no template.
// Every row's sum is formed in the same order whatever the tiling (chunks in order inside a warp's
// slice, slices in warp order), so gate_up_silu's g and u equal linear's outputs bit for bit.
#include <type_traits>

#include "epd_kernels/common.cuh"
#include "epd_kernels/elementwise/silu.cuh"
#include "epd_kernels/gemv/params.h"

namespace epd {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = 16;  // rows of w per MMA tile
constexpr int kChunkK = 32;    // K per chunk: 4 lanes x 8 elements, two m16n8k16 MMAs
constexpr int kLoadsPerLane = 8;  // 16-byte weight loads in flight per lane: kChunks * 2
constexpr int kSliceAlign = 4;    // a warp's K slice is a multiple of this many chunks (256 bytes of a row)

// 16 bytes of w, streamed once: skip L1; zeros (no access) where pred is false.
__device__ __forceinline__ uint4 load_stream(const void* ptr, bool pred) {
  uint4 v;
  asm volatile(
      "{\n"
      "  .reg .pred p;\n"
      "  setp.ne.b32 p, %5, 0;\n"
      "  mov.b32 %0, 0;\n  mov.b32 %1, 0;\n  mov.b32 %2, 0;\n  mov.b32 %3, 0;\n"
      "  @p ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      "}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr), "r"(static_cast<int>(pred)));
  return v;
}

// 16 bytes of x (read by every CTA: keep it in L1 / L2); zeros where pred is false.
__device__ __forceinline__ uint4 load_cached(const void* ptr, bool pred) {
  uint4 v;
  asm volatile(
      "{\n"
      "  .reg .pred p;\n"
      "  setp.ne.b32 p, %5, 0;\n"
      "  mov.b32 %0, 0;\n  mov.b32 %1, 0;\n  mov.b32 %2, 0;\n  mov.b32 %3, 0;\n"
      "  @p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      "}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr), "r"(static_cast<int>(pred)));
  return v;
}

// c += A (16 x 16, row-major fragment a0..a3) * B (16 x 8, col-major fragment b0, b1); fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// One 32-wide K chunk of a 16-row tile: lo = w[row g][k0 + 8t, +8), hi = w[row g + 8][...], xv = x[token g][...].
template <typename T>
__device__ __forceinline__ void mma_chunk(float (&c)[4], const uint4& lo, const uint4& hi, const uint4& xv) {
  mma_16816<T>(c, lo.x, hi.x, lo.y, hi.y, xv.x, xv.y);
  mma_16816<T>(c, lo.z, hi.z, lo.w, hi.w, xv.z, xv.w);
}

// The end of a tile: sum the warps' partial tiles in warp order, store (gate-up: silu(g) * u).
template <typename T, bool kGateUp>
__device__ __forceinline__ void finish_tile(T* __restrict__ out, const float (&acc)[4], int m, int64_t rows) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t out_cols = kGateUp ? rows / 2 : rows;
  // red[w][e][lane]: accumulator e.
  __shared__ float red[kWarps][4][32];
#pragma unroll
  for (int e = 0; e < 4; ++e) red[warp][e][lane] = acc[e];
  __syncthreads();

  // Accumulator e of lane l holds tile row (l / 4) + 8 (e / 2), token 2 (l % 4) + e % 2.
  constexpr int kItems = (kGateUp ? 2 : 4) * 32;  // gate-up: items for e = 0, 1 also read e + 2
  if (threadIdx.x >= kItems) return;
  const int e = threadIdx.x / 32, l = threadIdx.x & 31;
  const int token = 2 * (l & 3) + (e & 1);
  float s = red[0][e][l];
#pragma unroll
  for (int v = 1; v < kWarps; ++v) s += red[v][e][l];
  if constexpr (kGateUp) {
    const int64_t col = blockIdx.x * int64_t{8} + (l >> 2);
    if (col >= out_cols || token >= m) return;
    float su = red[0][e + 2][l];
#pragma unroll
    for (int v = 1; v < kWarps; ++v) su += red[v][e + 2][l];
    out[token * out_cols + col] = silu_mul(from_float<T>(s), from_float<T>(su));
  } else {
    const int64_t row = blockIdx.x * int64_t{kTileRows} + (l >> 2) + 8 * (e >> 1);
    if (row >= rows || token >= m) return;
    out[token * out_cols + row] = from_float<T>(s);
  }
}

// Tile row j (0..15) of this CTA's tile, and whether it exists (*ok): linear rows blockIdx.x * 16 + j
// (< N); gate-up gate rows blockIdx.x * 8 + j (j < 8) and the matching up rows I further (j >= 8),
// for output columns < I.
template <bool kGateUp>
__device__ __forceinline__ int64_t tile_row(int j, int64_t rows, bool* ok) {
  if constexpr (kGateUp) {
    const int64_t out_cols = rows / 2, col = blockIdx.x * int64_t{8} + (j & 7);
    *ok = col < out_cols;
    return col + (j >> 3) * out_cols;
  } else {
    const int64_t row = blockIdx.x * int64_t{kTileRows} + j;
    *ok = row < rows;
    return row;
  }
}

// This warp's contiguous slice [begin, end) of the K chunks; the same for every N, so linear and
// gate_up_silu sum alike.
struct Slice {
  int begin, end;
};
__device__ __forceinline__ Slice warp_slice(int k, int warp) {
  const int num_chunks = (k + kChunkK - 1) / kChunkK;
  const int per_warp = ((num_chunks + kWarps - 1) / kWarps + kSliceAlign - 1) / kSliceAlign * kSliceAlign;
  const int begin = warp * per_warp;
  return {begin, min(num_chunks, begin + per_warp)};
}

// One 16-row MMA tile of w per CTA. Linear: tile rows blockIdx.x * 16 + [0, 16), rows >= N masked.
// Gate-up: tile rows 0-7 are gate rows blockIdx.x * 8 + [0, 8) and rows 8-15 the up rows I further, so
// lane l's accumulators hold gate (e = 0, 1) and up (e = 2, 3) of one output column and the
// epilogue needs no exchange; columns >= I masked. `rows` = N or 2I.
template <typename T, bool kGateUp>
__global__ void __launch_bounds__(kThreads, 2)
    gemv_kernel(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ w, int m, int64_t rows, int k) {
  constexpr int kChunks = kLoadsPerLane / 2;  // chunks loaded per step (two 16-byte loads of w each)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  // This lane's rows (tile rows g and g + 8) and token g, at column 8t; invalid ones point at row 0 and
  // are never read.
  const T* wp[2];
  bool row_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = tile_row<kGateUp>(g + 8 * h, rows, &row_ok[h]);
    wp[h] = w + (row_ok[h] ? row : 0) * k + 8 * t;
  }
  const bool x_ok = g < m;
  const T* xp = x + (x_ok ? g : 0) * int64_t{k} + 8 * t;

  const Slice slice = warp_slice(k, warp);
  const int c_begin = slice.begin, c_end = slice.end;

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int c0 = c_begin; c0 < c_end; c0 += kChunks) {
    uint4 wv[kChunks][2];
    uint4 xv[kChunks];
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      const int col = (c0 + u) * kChunkK;  // + 8t is in the pointers
      const bool k_ok = c0 + u < c_end && col + 8 * t < k;
#pragma unroll
      for (int h = 0; h < 2; ++h) wv[u][h] = load_stream(wp[h] + col, k_ok && row_ok[h]);
      xv[u] = load_cached(xp + col, k_ok && x_ok);
    }
#pragma unroll
    for (int u = 0; u < kChunks; ++u) {
      if (c0 + u < c_end) mma_chunk<T>(acc, wv[u][0], wv[u][1], xv[u]);  // warp-uniform: no +0 past the slice
    }
  }

  finish_tile<T, kGateUp>(out, acc, m, rows);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <bool kGateUp>
void launch(const GemvParams& p, int64_t ctas, cudaStream_t stream) {
  EPD_SWITCH_HALF_TYPES(p.dtype, [&] {
    gemv_kernel<scalar_t, kGateUp><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(
        static_cast<scalar_t*>(p.out), static_cast<const scalar_t*>(p.x), static_cast<const scalar_t*>(p.w), p.m,
        p.rows, static_cast<int>(p.k));
  });
}

}  // namespace

void launch_linear(const GemvParams& p, cudaStream_t stream) {
  if (p.m == 0 || p.rows == 0) return;
  launch<false>(p, ceil_div(p.rows, kTileRows), stream);
}

void launch_gate_up_silu(const GemvParams& p, cudaStream_t stream) {
  if (p.m == 0 || p.rows == 0) return;
  launch<true>(p, ceil_div(p.rows / 2, kTileRows / 2), stream);
}

}  // namespace epd
