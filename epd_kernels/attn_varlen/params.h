// POD parameters of the FlashAttention-2 style kernels: paged varlen prefill and dense (vision) attention.
// Strides are in elements; pointers are raw. No torch includes.
#pragma once
#include <cstdint>

#include "epd_kernels/common.cuh"

namespace epd {

// Causal varlen attention over the paged KV arena
// [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim].
struct PagedPrefillParams {
  const void* q;  // [T, Hq, D]
  void* out;      // [T, Hq, D]
  const void* kv;  // arena + layer * (2 * block_size * Hkv * D): K of block 0, token 0, kv head 0
  int64_t q_row_stride, q_head_stride;
  int64_t o_row_stride, o_head_stride;
  int64_t block_stride;   // between arena blocks: num_layers * 2 * block_size * Hkv * D
  int64_t token_stride;   // between tokens of a block: Hkv * D
  int64_t v_offset;       // K -> V of the same block and layer: block_size * Hkv * D
  const int32_t* cu_seqlens_q;  // [B + 1]
  const int32_t* seq_lens;      // [B], context + new tokens
  const int32_t* block_tables;  // [B, max_blocks]
  int64_t block_table_stride;
  int batch, num_heads, num_kv_heads, head_dim;
  int log2_block_size;
  int max_seqlen_q;  // host-side bound on cu_seqlens_q[i+1] - cu_seqlens_q[i]; sizes the grid
  int invariant;     // 1: one tile shape whatever the grid (batch-invariant mode)
  float scale_log2;  // softmax scale * log2(e)
  DType dtype;
};

// Non-causal attention with strided q/k/v [B, N, H, D] (views into a fused qkv tensor).
struct DenseAttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int batch, seqlen, num_heads, head_dim;
  float scale_log2;
  DType dtype;
};

void launch_paged_attention_prefill(const PagedPrefillParams& p, cudaStream_t stream);
void launch_attention_dense(const DenseAttnParams& p, cudaStream_t stream);

}  // namespace epd
