// PIL-exact 8-bit resample passes on RGB (Pillow libImaging/Resample.c, ImagingResample*_8bpc): int32
// accumulator from 2^21, uint8 pixel times fixed-point coefficient, clip8(acc >> 22). Integer math
// throughout, so the result is the reference's bit for bit; the coefficients come from the host
// (epd_kernels/image/reference.py resample_coeffs, the same code the CPU reference uses).
// One thread per output pixel (3 channels), grid-stride over out_rows * out_cols.
#include <algorithm>

#include "epd_kernels/common.cuh"
#include "epd_kernels/image/params.h"

namespace epd {
namespace {

__device__ __forceinline__ uint8_t clip8(int acc) {
  const int v = acc >> kResamplePrecisionBits;  // arithmetic shift: floor, as Pillow's lookup index
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

template <bool kHorizontal>
__global__ void resample_kernel(const ResampleParams p) {
  const int64_t total = static_cast<int64_t>(p.out_rows) * p.out_cols;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int n = kHorizontal ? p.in_cols : p.in_rows;  // input length along the pass axis
  const int64_t step = kHorizontal ? p.in_stride_col : p.in_stride_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total; i += grid_stride) {
    const int row = static_cast<int>(i / p.out_cols);
    const int col = static_cast<int>(i - static_cast<int64_t>(row) * p.out_cols);
    const int o = kHorizontal ? col : row;
    const int first = p.bounds[2 * o] - p.offset;
    const int count = min(p.bounds[2 * o + 1], p.ksize);
    const int32_t* k = p.coeffs + static_cast<int64_t>(o) * p.ksize;
    const uint8_t* base = kHorizontal ? p.in + row * p.in_stride_row : p.in + col * p.in_stride_col;
    int acc0 = 1 << (kResamplePrecisionBits - 1);
    int acc1 = acc0, acc2 = acc0;
    for (int j = 0; j < count; ++j) {
      const int src = first + j;
      if (src < 0 || src >= n) continue;  // never for bounds from resample_coeffs; keeps reads in bounds
      const uint8_t* px = base + src * step;
      const int w = k[j];
      acc0 += static_cast<int>(px[0]) * w;
      acc1 += static_cast<int>(px[p.in_stride_chan]) * w;
      acc2 += static_cast<int>(px[2 * p.in_stride_chan]) * w;
    }
    uint8_t* dst = p.out + i * 3;
    dst[0] = clip8(acc0);
    dst[1] = clip8(acc1);
    dst[2] = clip8(acc2);
  }
}

unsigned blocks_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 1 << 20)));
}

}  // namespace

void launch_resample(const ResampleParams& p, bool horizontal, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(p.out_rows) * p.out_cols;
  if (total == 0) return;
  constexpr int kThreads = 256;
  if (horizontal) {
    resample_kernel<true><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(p);
  } else {
    resample_kernel<false><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(p);
  }
}

}  // namespace epd
