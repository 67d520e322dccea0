// RMSNorm and fused residual-add + RMSNorm. One row lives in registers between the reduction and
// the output pass, so each input is read once and each output written once.
#include "epd_kernels/common.cuh"
#include "epd_kernels/rmsnorm_rope/params.h"
#include "epd_kernels/rmsnorm_rope/row_vec.cuh"

namespace epd {
namespace {

// Rows of p.hidden elements as vectors of kN; each thread holds up to kVecs vectors of one row
// (vector index j * tpr + lane). kResidual: residual = round(x + residual) is written back and
// normalised instead of x.
template <typename T, int kN, int kVecs, bool kResidual>
__global__ void __launch_bounds__(kNormMaxThreads)
    rms_norm_kernel(const RmsNormParams p, const int tpr, const int rows_per_block) {
  using V = VecN<T, kN>;
  __shared__ float smem[32];
  const int sub = threadIdx.x / tpr;
  const int lane = threadIdx.x - sub * tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + sub;
  const bool valid = row < p.rows;
  const int64_t r = valid ? row : 0;  // out-of-range rows compute nothing but join the reduction
  const int nvec = p.hidden / kN;

  const V* x = reinterpret_cast<const V*>(static_cast<const T*>(p.x) + r * p.x_row_stride);
  V a[kVecs];
  V* res = kResidual ? reinterpret_cast<V*>(static_cast<T*>(p.residual) + r * p.residual_row_stride) : nullptr;
  load_row<T, kN, kVecs, kResidual>(a, x, res, valid, nvec, tpr, lane);
  float sum_sq = 0.f;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int i = j * tpr + lane;
    if (valid && i < nvec) {
#pragma unroll
      for (int e = 0; e < kN; ++e) {
        const float f = to_float(a[j].v[e]);
        sum_sq += f * f;
      }
    }
  }

  const float total = row_sum(sum_sq, tpr, smem);
  const float rstd = rsqrtf(total / static_cast<float>(p.hidden) + p.eps);

  const V* w = static_cast<const V*>(p.weight);
  V* out = reinterpret_cast<V*>(static_cast<T*>(p.out) + r * p.out_row_stride);
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int i = j * tpr + lane;
    if (valid && i < nvec) {
      const V wv = w[i];
      V o;
#pragma unroll
      for (int e = 0; e < kN; ++e) {
        // HF order: round the normalised value to T, then scale by the weight and round again.
        const float normed = to_float(from_float<T>(to_float(a[j].v[e]) * rstd));
        o.v[e] = from_float<T>(to_float(wv.v[e]) * normed);
      }
      out[i] = o;
    }
  }
}

template <bool kResidual> void launch(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  EPD_SWITCH_HALF_TYPES(p.dtype, [&] {
    dispatch_rows(norm_vectorized(p), p.rows, p.hidden, [&](auto n, auto vecs, const RowPlan& plan) {
      rms_norm_kernel<scalar_t, decltype(n)::value, decltype(vecs)::value, kResidual>
          <<<static_cast<unsigned>(plan.grid), plan.block, 0, stream>>>(p, plan.tpr, plan.rows_per_block);
    });
  });
}

}  // namespace

void launch_rms_norm(const RmsNormParams& p, cudaStream_t stream) { launch<false>(p, stream); }
void launch_add_rms_norm(const RmsNormParams& p, cudaStream_t stream) { launch<true>(p, stream); }

}  // namespace epd
