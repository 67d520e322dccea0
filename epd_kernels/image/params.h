// Parameter structs for the image family (PIL-exact resize passes, CLIP crop + normalize). POD only.
#pragma once
#include <cstdint>

#include "epd_kernels/common.cuh"

namespace epd {

// Pillow's fixed point for 8-bit resampling (libImaging/Resample.c): PRECISION_BITS = 32 - 8 - 2.
constexpr int kResamplePrecisionBits = 22;

// One 8-bit resample pass of an RGB image, as Pillow's ImagingResample{Horizontal,Vertical}_8bpc:
// out[r, c, ch] = clip8((2^21 + sum_j in[.., first + j - offset, ..] * coeffs[o, j]) >> 22), where o is
// the output index along the pass axis (c for horizontal, r for vertical) and (first, count) = bounds[o].
// The other axis is copied through: horizontal has out_rows == in_rows, vertical out_cols == in_cols.
struct ResampleParams {
  uint8_t* out;            // [out_rows, out_cols, 3], contiguous
  const uint8_t* in;       // [in_rows, in_cols, 3], any non-negative strides (elements == bytes)
  const int32_t* bounds;   // [out_len, 2]: first input index (full-image coordinates), tap count
  const int32_t* coeffs;   // [out_len, ksize]: fixed-point weights, zero past each count
  int64_t in_stride_row;
  int64_t in_stride_col;
  int64_t in_stride_chan;
  int32_t in_rows;
  int32_t in_cols;
  int32_t out_rows;
  int32_t out_cols;
  int32_t ksize;
  int32_t offset;  // full-image index of `in`'s first row (vertical) / column (horizontal)
};

// out[n, ch, i, j] = lut[ch, pixel] with pixel = image n's (i + top, j + left, ch), or 0 where that is
// outside the image (HF center crop with zero padding); top = floor((H - size) / 2), left likewise.
struct CropNormalizeParams {
  void* out;               // [N, 3, size, size], contiguous, dtype
  const uint8_t* src;      // flat bytes; image n is [H, W, 3] contiguous at byte meta[n, 0]
  const int64_t* meta;     // [N, 3]: byte offset, H, W
  const float* lut;        // [3, 256]: final value per channel and uint8 level
  int64_t src_bytes;       // reads past this are treated as 0 (the device never reads out of bounds)
  int32_t num_images;      // N (<= 65535: grid.y)
  int32_t size;
  DType dtype;
};

}  // namespace epd
