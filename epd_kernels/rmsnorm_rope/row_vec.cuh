// Device helpers shared by the norm kernels: N-element vectors and row reductions over a group of
// `tpr` threads (threads per row), plus the host-side choice of that group.
#pragma once
#include <cstdint>
#include <type_traits>

#include "epd_kernels/common.cuh"
#include "epd_kernels/rmsnorm_rope/params.h"

namespace epd {

// kN elements of T as one access: kN = 8 is a 16-byte access for a 16-bit dtype (like Vec16).
template <typename T, int kN> struct alignas(sizeof(T) * kN) VecN {
  T v[kN];
};

// This thread's vectors of a row (vector index j * tpr + lane, those < nvec when `valid`) into a[j];
// kResidual (add_rms_norm / add_layer_norm): a[j] = round(x + residual), written back to the
// residual row `res` as well.
template <typename T, int kN, int kVecs, bool kResidual>
__device__ __forceinline__ void load_row(VecN<T, kN> (&a)[kVecs], const VecN<T, kN>* x, VecN<T, kN>* res, bool valid,
                                         int nvec, int tpr, int lane) {
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int i = j * tpr + lane;
    if (valid && i < nvec) a[j] = x[i];
  }
  if constexpr (kResidual) {
    VecN<T, kN> b[kVecs];
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const int i = j * tpr + lane;
      if (valid && i < nvec) b[j] = res[i];
    }
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const int i = j * tpr + lane;
      if (valid && i < nvec) {
#pragma unroll
        for (int e = 0; e < kN; ++e) a[j].v[e] = from_float<T>(to_float(a[j].v[e]) + to_float(b[j].v[e]));
        res[i] = a[j];
      }
    }
  }
}

// Sum of `v` over the `tpr` threads that share a row. tpr is uniform over the block and either a
// power of two <= 32 (rows packed in aligned lane groups of a warp; every lane of the warp must call)
// or a multiple of 32 equal to blockDim.x (one row per block; every thread must call: barriers).
// smem: 32 floats. Safe to call several times in a row (the first barrier guards smem reuse).
__device__ __forceinline__ float row_sum(float v, int tpr, float* smem) {
  if (tpr <= 32) {
    for (int o = tpr >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  }
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float total = 0.f;
  const int warps = blockDim.x >> 5;
  for (int w = 0; w < warps; ++w) total += smem[w];
  return total;
}

// How the threads of a block split over rows of `nvec` vectors each.
struct RowPlan {
  int vecs_per_thread;  // the kernel's kVecs template argument
  int tpr;              // threads per row
  int block;            // threads per block
  int rows_per_block;
  int64_t grid;
};

// Short rows (<= 32 vectors): a power-of-two lane group per row, 256-thread blocks hold many rows.
// Otherwise `vecs` vectors per thread at most: one warp per row (8 rows per block) while that fits,
// else one row per block of ceil(nvec / vecs) threads rounded up to whole warps. The caller keeps
// ceil(nvec / vecs) <= kNormMaxThreads.
inline RowPlan plan_rows(int64_t rows, int nvec, int vecs) {
  RowPlan p{};
  if (nvec <= 32) {
    p.vecs_per_thread = 1;
    p.tpr = 1;
    while (p.tpr < nvec) p.tpr <<= 1;
  } else {
    p.vecs_per_thread = vecs;
    const int threads = (nvec + vecs - 1) / vecs;
    p.tpr = threads <= 32 ? 32 : (threads + 31) / 32 * 32;
  }
  p.block = p.tpr <= 32 ? 256 : p.tpr;
  p.rows_per_block = p.block / p.tpr;
  p.grid = (rows + p.rows_per_block - 1) / p.rows_per_block;
  return p;
}

template <int kValue> using IntC = std::integral_constant<int, kValue>;

// Picks the access width (kN: 8 elements = 16 bytes, or 1) and vectors per thread (kVecs) for a
// row of `hidden` elements and calls launch(IntC<kN>, IntC<kVecs>, plan). Two 16-byte vectors per
// thread measured faster than four or eight on H100 at every size (more threads in flight), so
// four are used only for rows past 2 * kNormMaxThreads vectors.
template <typename F> void dispatch_rows(bool vectorized, int64_t rows, int hidden, F&& launch) {
  if (vectorized) {
    const int nvec = hidden / kNormVecElems;
    const RowPlan plan = plan_rows(rows, nvec, nvec <= 2 * kNormMaxThreads ? 2 : kNormMaxVecsPerThread);
    if (plan.vecs_per_thread == 1) launch(IntC<kNormVecElems>{}, IntC<1>{}, plan);
    else if (plan.vecs_per_thread == 2) launch(IntC<kNormVecElems>{}, IntC<2>{}, plan);
    else launch(IntC<kNormVecElems>{}, IntC<kNormMaxVecsPerThread>{}, plan);
  } else {
    const RowPlan plan = plan_rows(rows, hidden, kNormScalarsPerThread);
    if (plan.vecs_per_thread == 1) launch(IntC<1>{}, IntC<1>{}, plan);
    else launch(IntC<1>{}, IntC<kNormScalarsPerThread>{}, plan);
  }
}

}  // namespace epd
