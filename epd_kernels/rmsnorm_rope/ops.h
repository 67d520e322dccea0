// Torch-facing ops of the rmsnorm_rope family (checks + launch). Outputs are passed in and mutated.
#pragma once
#include <torch/all.h>

namespace epd {

// out [T, H] (mutated) = rms_norm(x [T, H], weight [H], eps). x: last dim contiguous, any row stride.
void rms_norm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight, double eps);

// residual [T, H] (mutated, in place) = round(x + residual); out [T, H] (mutated) = rms_norm(residual).
void add_rms_norm(torch::Tensor& out, torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& weight,
                  double eps);

// out [T, H] (mutated) = layer_norm(x [T, H], weight [H], bias [H], eps), fp32 statistics.
void layer_norm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                double eps);

// residual [T, H] (mutated, in place) = round(x + residual); out [T, H] (mutated) = layer_norm(residual).
void add_layer_norm(torch::Tensor& out, torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& weight,
                    const torch::Tensor& bias, double eps);

// q_rot [T, Hq, D] (mutated) = rope(q); kv_arena (mutated) [.., layer, 0/1, slot] = rope(k) / v for
// slot_mapping >= 0. q/k/v [T, H, D] with contiguous heads and any 16-byte-aligned row stride.
void rope_and_cache_write(torch::Tensor& q_rot, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          const torch::Tensor& positions, const torch::Tensor& cos_sin, torch::Tensor& kv_arena,
                          int64_t layer, const torch::Tensor& slot_mapping);

}  // namespace epd
