// Torch-facing sampling op. The output is passed in (allocated by the Python wrapper) and mutated.
#pragma once
#include <torch/all.h>

namespace epd {

// out [B] int64 (mutated): one token per row of logits [B, V] fp32, as kernels/reference.py:sample.
// temperature [B] fp32 (<= 0: greedy), top_k [B] int64 (<= 0: all), top_p [B] fp32,
// seeds [B] int64, steps [B] int64; all contiguous, on logits' device.
void sample(torch::Tensor& out, const torch::Tensor& logits, const torch::Tensor& temperature,
            const torch::Tensor& top_k, const torch::Tensor& top_p, const torch::Tensor& seeds,
            const torch::Tensor& steps);

}  // namespace epd
