// Torch-facing small-batch GEMV ops (decode GEMMs). Outputs are passed in (allocated by the Python wrapper)
// and mutated.
#pragma once
#include <torch/all.h>

namespace epd {

// out [M, N] (mutated) = x [M, K] @ w [N, K]^T, fp32 accumulation, rounded to x's dtype.
// M <= 8, K % 8 == 0; x, w, out contiguous, one dtype (fp16 or bf16); x and w 16-byte aligned.
void linear(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& w);

// out [M, I] (mutated) = silu_and_mul(linear(x, w)) for the fused gate | up weight w [2I, K]:
// gate g = round(x . w[i]), up u = round(x . w[I + i]), out = round(round(silu(g)) * u). Same limits as linear.
void gate_up_silu(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& w);

}  // namespace epd
