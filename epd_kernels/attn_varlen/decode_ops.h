// Torch-facing entry point of split-KV paged decode attention.
#pragma once
#include <torch/all.h>

namespace epd {

// One query per sequence over the paged KV arena (flash-decoding split-KV). Graph-safe: the launch
// shape depends only on tensor shapes, never on the contents of seq_lens / block_tables.
//   out          [B, Hq, D] bf16/fp16, last dim contiguous — MUTATED (every element written)
//   q            [B, Hq, D] same dtype, last dim contiguous
//   kv_arena     [num_blocks, num_layers, 2, block_size, Hkv, D] same dtype (block_size a power of two)
//   layer        which layer of the arena to read
//   seq_lens     [B] int32 on the device, tokens in the cache (0 = padded row: out row is zeros)
//   block_tables [B, max_blocks] int32, row i lists sequence i's blocks in order
//   scale        softmax scale (usually head_dim ** -0.5)
//   invariant    batch-invariant splits (kInvariantSplitTiles per split, the reduce always runs): a
//                sequence's output is independent of the batch and of block_tables' width
// Hq must be a multiple of Hkv (GQA / MHA); D in {64, 80, 96, 128}.
void paged_attention_decode(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& kv_arena, int64_t layer,
                            const torch::Tensor& seq_lens, const torch::Tensor& block_tables, double scale,
                            bool invariant);

}  // namespace epd
