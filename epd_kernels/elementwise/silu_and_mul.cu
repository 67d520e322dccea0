// silu_and_mul: x [T, 2I] = gate | up -> out [T, I] = round(round(silu(gate)) * up).
// HF rounds silu(gate) to the activation dtype before the product; we mirror that rounding.
// One thread per 16-byte vector of a row (N elements); a scalar path (N = 1) covers I % N != 0.
#include "epd_kernels/common.cuh"
#include "epd_kernels/elementwise/dispatch.cuh"
#include "epd_kernels/elementwise/params.h"
#include "epd_kernels/elementwise/silu.cuh"

namespace epd {
namespace {

template <typename T, int N>
__global__ void silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t num_tokens,
                                    int64_t inter, int64_t x_row_stride, int64_t out_row_stride) {
  const int64_t vecs_per_row = inter / N;
  const int64_t total = num_tokens * vecs_per_row;
  for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < total; v += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = v / vecs_per_row;
    const int64_t col = (v - row * vecs_per_row) * N;
    const T* gate_ptr = x + row * x_row_stride + col;
    T* out_ptr = out + row * out_row_stride + col;
    if constexpr (N == 1) {
      *out_ptr = silu_mul(gate_ptr[0], gate_ptr[inter]);
    } else {
      const Vec16<T> gate = *reinterpret_cast<const Vec16<T>*>(gate_ptr);
      const Vec16<T> up = *reinterpret_cast<const Vec16<T>*>(gate_ptr + inter);
      Vec16<T> res;
#pragma unroll
      for (int i = 0; i < N; ++i) res.v[i] = silu_mul(gate.v[i], up.v[i]);
      *reinterpret_cast<Vec16<T>*>(out_ptr) = res;
    }
  }
}

}  // namespace

void launch_silu_and_mul(const SiluAndMulParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.inter == 0) return;
  constexpr int kThreads = 128;
  EPD_SWITCH_FLOAT_TYPES(p.dtype, [&] {
    constexpr int N = Vec16<scalar_t>::N;
    auto* out = static_cast<scalar_t*>(p.out);
    const auto* x = static_cast<const scalar_t*>(p.x);
    const bool vec = p.inter % N == 0 && p.x_row_stride % N == 0 && p.out_row_stride % N == 0 && aligned16(out) &&
                     aligned16(x);
    if (vec) {
      silu_and_mul_kernel<scalar_t, N><<<grid_for(p.num_tokens * (p.inter / N), kThreads), kThreads, 0, stream>>>(
          out, x, p.num_tokens, p.inter, p.x_row_stride, p.out_row_stride);
    } else {
      silu_and_mul_kernel<scalar_t, 1><<<grid_for(p.num_tokens * p.inter, kThreads), kThreads, 0, stream>>>(
          out, x, p.num_tokens, p.inter, p.x_row_stride, p.out_row_stride);
    }
  });
}

}  // namespace epd
