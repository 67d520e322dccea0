// Torch-facing prefill and dense attention ops (outputs are passed in and written).
#pragma once
#include <torch/all.h>

namespace epd {

// out [T, Hq, D] (written) = causal varlen attention of q [T, Hq, D] over the paged arena
// [num_blocks, num_layers, 2, block_size, Hkv, D] at `layer`; cu_seqlens_q [B+1], seq_lens [B],
// block_tables [B, max_blocks] int32. max_seqlen_q bounds every q_len (sizes the grid). invariant:
// one tile shape whatever the grid (batch-invariant mode), not the one that fills the GPU best.
void paged_attention_prefill(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& kv_arena, int64_t layer,
                             const torch::Tensor& cu_seqlens_q, const torch::Tensor& seq_lens,
                             const torch::Tensor& block_tables, double scale, int64_t max_seqlen_q,
                             bool invariant);

// out [B, N, H, D] (written) = non-causal attention of q, k, v [B, N, H, D] (last dim contiguous).
void attention_dense(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     double scale);

}  // namespace epd
