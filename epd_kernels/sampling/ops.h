// Torch-facing sampling op. The output is passed in (allocated by the Python wrapper) and mutated.
#pragma once
#include <torch/all.h>

namespace epd {

// out [B] int64 (mutated): one token per row of logits [B, V] fp32, as epd_kernels/reference.py:sample.
// temperature [B] fp32 (<= 0: greedy), top_k [B] int64 (<= 0: all), top_p [B] fp32,
// seeds [B] int64, steps [B] int64; all contiguous, on logits' device.
void sample(torch::Tensor& out, const torch::Tensor& logits, const torch::Tensor& temperature,
            const torch::Tensor& top_k, const torch::Tensor& top_p, const torch::Tensor& seeds,
            const torch::Tensor& steps);

// out [B, V] fp32 (mutated; may be logits itself) = logits [B, V] fp32 with presence / frequency /
// repetition [B] fp32 penalties from the state of slot slots[b] [B] int64: counts [S, V] int32 and
// prompt_mask [S, V] bool or uint8. Rows with slots[b] outside [0, S) are copied (or, in place, untouched).
void apply_penalties(torch::Tensor& out, const torch::Tensor& logits, const torch::Tensor& counts,
                     const torch::Tensor& prompt_mask, const torch::Tensor& slots, const torch::Tensor& presence,
                     const torch::Tensor& frequency, const torch::Tensor& repetition);

// counts [S, V] int32 (mutated): counts[slots[b], tokens[b]] += 1 for slots in [0, S), tokens in [0, V).
void record_tokens(torch::Tensor& counts, const torch::Tensor& slots, const torch::Tensor& tokens);

}  // namespace epd
