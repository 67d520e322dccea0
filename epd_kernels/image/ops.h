// Torch-facing image ops. Outputs are passed in (allocated by the Python wrapper) and mutated.
#pragma once
#include <torch/all.h>

namespace epd {

// out [H, L, 3] uint8 (mutated, contiguous): Pillow's horizontal 8-bit pass over src [H, W, 3] uint8
// (any strides). bounds [L, 2] int32 (first, count), coeffs [L, K] int32 fixed point; `offset` is the
// full-image column of src's column 0 (bounds are in full-image coordinates).
void resample_horizontal(torch::Tensor& out, const torch::Tensor& src, const torch::Tensor& bounds,
                         const torch::Tensor& coeffs, int64_t offset);

// out [L, W, 3] uint8 (mutated, contiguous): the vertical pass over src [H, W, 3]; `offset` is the
// full-image row of src's row 0.
void resample_vertical(torch::Tensor& out, const torch::Tensor& src, const torch::Tensor& bounds,
                       const torch::Tensor& coeffs, int64_t offset);

// out [N, 3, S, S] (mutated, contiguous; float32, float16 or bfloat16): center crop (zero pad) of
// image n = src[meta[n, 0]:] viewed as [meta[n, 1], meta[n, 2], 3], each level mapped through lut
// [3, 256] float32. src is flat uint8, meta [N, 3] int64 on the device (not read on the host).
void crop_normalize(torch::Tensor& out, const torch::Tensor& src, const torch::Tensor& meta,
                    const torch::Tensor& lut);

}  // namespace epd
