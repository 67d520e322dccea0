// CLIP's center crop (HF, zero padding) + rescale + normalize + HWC -> CHW for a batch of resized
// uint8 images in one launch. The arithmetic is a [3, 256] lookup table made on the host by the same
// numpy operations as engine.images.ImageProcessor (epd_kernels/image/reference.py normalize_lut), so
// float32 outputs are that path's bit for bit; half outputs are the table rounded to nearest even.
// grid = (pixel blocks, N); one thread per output pixel (3 channel planes, coalesced along a row).
#include <algorithm>

#include "epd_kernels/common.cuh"
#include "epd_kernels/elementwise/dispatch.cuh"
#include "epd_kernels/image/params.h"

namespace epd {
namespace {

__device__ __forceinline__ int64_t floor_half(int64_t a) { return a >= 0 ? a / 2 : -((1 - a) / 2); }

template <typename T>
__global__ void crop_normalize_kernel(const CropNormalizeParams p) {
  __shared__ float lut[3 * 256];
  for (int t = threadIdx.x; t < 3 * 256; t += blockDim.x) lut[t] = p.lut[t];
  __syncthreads();
  const int64_t n = blockIdx.y;
  const int64_t size = p.size;
  const int64_t plane = size * size;
  const int64_t offset = p.meta[3 * n], height = p.meta[3 * n + 1], width = p.meta[3 * n + 2];
  const int64_t top = floor_half(height - size), left = floor_half(width - size);
  T* out = static_cast<T*>(p.out) + n * 3 * plane;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t pix = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pix < plane; pix += grid_stride) {
    const int64_t y = pix / size + top;
    const int64_t x = pix % size + left;
    int v0 = 0, v1 = 0, v2 = 0;  // the zero padding is level 0, normalized like any pixel (as HF)
    if (y >= 0 && y < height && x >= 0 && x < width) {
      const int64_t at = offset + (y * width + x) * 3;
      if (at >= 0 && at + 2 < p.src_bytes) {
        v0 = p.src[at];
        v1 = p.src[at + 1];
        v2 = p.src[at + 2];
      }
    }
    out[pix] = from_float<T>(lut[v0]);
    out[plane + pix] = from_float<T>(lut[256 + v1]);
    out[2 * plane + pix] = from_float<T>(lut[512 + v2]);
  }
}

}  // namespace

void launch_crop_normalize(const CropNormalizeParams& p, cudaStream_t stream) {
  if (p.num_images == 0 || p.size == 0) return;
  constexpr int kThreads = 256;
  const int64_t plane = static_cast<int64_t>(p.size) * p.size;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((plane + kThreads - 1) / kThreads, 1 << 16));
  const dim3 grid(blocks, static_cast<unsigned>(p.num_images));
  EPD_SWITCH_FLOAT_TYPES(p.dtype, [&] { crop_normalize_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p); });
}

}  // namespace epd
