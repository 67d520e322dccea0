// Parameters of split-KV paged decode attention (one query per sequence). POD, no torch.
#pragma once
#include <cstdint>

#include "epd_kernels/common.cuh"

namespace epd {

// Tile shape of the decode kernel, shared by the launcher (grid/smem sizing) and the kernel.
constexpr int kDecodeThreads = 128;     // 4 warps per CTA
constexpr int kDecodeTileTokens = 32;   // tokens per pipeline stage (K and V tiles of kDecodeTileTokens x D)
constexpr int kDecodeStages = 3;        // cp.async pipeline depth
constexpr int kDecodeMaxGroup = 8;      // query heads one CTA serves; larger GQA groups are split over grid.y
constexpr int kDecodeMaxSplits = 256;
// Batch-invariant mode (EngineConfig.deterministic): every split covers this many tiles of a
// sequence, whatever the batch or the block table's width, and the reduce pass always runs, so a
// sequence's output depends on nothing but its own query and cache (up to 256 x 512 tokens).
constexpr int kInvariantSplitTiles = 16;

struct PagedDecodeParams {
  const void* q;          // [B, Hq, D], last dim contiguous
  void* out;              // [B, Hq, D], last dim contiguous
  const void* kv_arena;   // [num_blocks, num_layers, 2, block_size, Hkv, D], last dim contiguous
  const int* seq_lens;    // [B] int32, 0 = padded row
  const int* block_tables;  // [B, max_blocks] int32, row stride bt_stride
  float* partial_acc;     // [B, Hq, num_splits, D] fp32, unnormalised; unused when direct
  float* partial_ml;      // [B, Hq, num_splits, 2] fp32: (max in log2 units, sum of exp2); unused when direct

  int64_t q_stride_b, q_stride_h;
  int64_t out_stride_b, out_stride_h;
  // Element strides of kv_arena (dims 0..4) and the element offset of (layer, K) inside a block.
  int64_t kv_stride_block, kv_stride_kv, kv_stride_token, kv_stride_head;
  int64_t kv_layer_offset;
  int64_t bt_stride;

  int batch, num_q_heads, num_kv_heads, head_dim;
  int group;              // Hq / Hkv
  int group_per_cta;      // query heads per CTA (<= kDecodeMaxGroup); grid.y = Hkv * q_subgroups
  int q_subgroups;        // ceil(group / group_per_cta)
  int block_size, log2_block_size;
  int max_blocks;         // block_tables.shape[1]
  int num_splits;         // grid.x; fixed per launch shape, never from seq_lens
  int split_tiles;        // > 0: tiles per split, fixed (invariant mode); 0: the live length / num_splits
  int direct;             // 1: one split, no reduce pass (the kernel writes out); else partials + reduce
  int bt_smem_entries;    // block-table entries one split can touch (sizes shared memory)
  float scale_log2;       // softmax scale * log2(e)
  DType dtype;
};

// Shared memory of one decode CTA: the cp.async tile ring (K and V, 16-bit elements), reused at the
// end for the cross-warp merge ([warps][group][D] acc + [warps][group] max and sum, fp32), then the
// split's slice of its block-table row.
__host__ __device__ constexpr int paged_decode_tile_region_bytes(int head_dim) {
  return kDecodeStages * 2 * kDecodeTileTokens * head_dim * 2 >
                 (kDecodeThreads / 32) * kDecodeMaxGroup * (head_dim + 2) * 4
             ? kDecodeStages * 2 * kDecodeTileTokens * head_dim * 2
             : (kDecodeThreads / 32) * kDecodeMaxGroup * (head_dim + 2) * 4;
}
inline int paged_decode_smem_bytes(int head_dim, int bt_smem_entries) {
  return paged_decode_tile_region_bytes(head_dim) + bt_smem_entries * 4;
}

void launch_paged_attention_decode(const PagedDecodeParams& p, cudaStream_t stream);

}  // namespace epd
