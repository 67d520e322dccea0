// Torch-facing elementwise ops. Outputs are passed in (allocated by the Python wrapper) and mutated.
#pragma once
#include <optional>

#include <torch/all.h>

namespace epd {

// out [T, I] (mutated) = silu(x[:, :I]) * x[:, I:], x [T, 2I]; fp16, bf16 or fp32.
void silu_and_mul(torch::Tensor& out, const torch::Tensor& x);

// out (mutated, same shape as x) = exact erf GELU of x; x contiguous, fp16, bf16 or fp32.
void gelu(torch::Tensor& out, const torch::Tensor& x);

// out (mutated, same shape as x) = x * sigmoid(1.702 x); x contiguous, fp16, bf16 or fp32.
void quick_gelu(torch::Tensor& out, const torch::Tensor& x);

// out [T, H] (mutated): row t = image_embeds[image_index[t]] where image_index[t] >= 0, else
// weight[input_ids[t]]; out-of-range indices give zero rows. input_ids / image_index [T] int64,
// weight [V, H], image_embeds [N, H] of weight's dtype.
void embed_tokens(torch::Tensor& out, const torch::Tensor& input_ids, const torch::Tensor& weight,
                  const std::optional<torch::Tensor>& image_index, const std::optional<torch::Tensor>& image_embeds);

}  // namespace epd
