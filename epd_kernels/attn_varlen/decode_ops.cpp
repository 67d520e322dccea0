// Host side of paged decode attention: input checks, the split-count choice, workspace, launch.
#include <algorithm>
#include <array>
#include <atomic>

#include "epd_kernels/attn_varlen/decode_ops.h"
#include "epd_kernels/attn_varlen/decode_params.h"
#include "epd_kernels/torch_utils.h"

namespace epd {
namespace {

// Multiprocessor count and opt-in shared memory per block of a device, read once and cached.
struct DeviceLimits {
  int num_sms;
  int max_smem_per_block;
};

DeviceLimits device_limits(int device) {
  static std::array<std::atomic<int>, 64> sms{};
  static std::array<std::atomic<int>, 64> smem{};
  TORCH_CHECK(device >= 0 && device < 64, "device index ", device, " out of range");
  if (sms[device].load(std::memory_order_relaxed) == 0) {
    int n = 0, s = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&s, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    smem[device].store(s, std::memory_order_relaxed);
    sms[device].store(n, std::memory_order_relaxed);
  }
  return {sms[device].load(std::memory_order_relaxed), smem[device].load(std::memory_order_relaxed)};
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The block-table slice one split keeps in shared memory stays below this many entries.
constexpr int64_t kMaxBtEntries = 1024;
// Split until the grid has a CTA per multiprocessor. Each CTA keeps 2-3 tiles (32-48 KB) of K/V in
// flight, enough to saturate HBM with one CTA per SM; measured on H100 (B=8 x 2048, 32 heads), aiming
// for 2 or 4 per SM only added splits (a reduction pass, partial fills) and ran 3-8% slower. On the
// H200 (7B, ctx 640, batches 1-4, session 15) 2 per SM was within the run-to-run spread of 1 per SM
// (4.106-4.186 vs 4.139-4.188 ms a step at batch 1), 4 per SM no better.
constexpr int64_t kTargetCtasPerSm = 1;
// Don't cut a split below this many tiles of capacity: each split pays a pipeline fill.
constexpr int64_t kMinTilesPerSplit = 2;

// Splits per (sequence, kv head) from shapes only (graph-safe): fill the GPU when B * Hkv is small,
// bounded by the table's capacity in tiles; and at least enough that a split's block-table slice fits.
int choose_num_splits(int64_t ctas, int64_t cap_tokens, int64_t block_size, int num_sms) {
  const int64_t cap_tiles = ceil_div(cap_tokens, kDecodeTileTokens);
  int64_t splits = ceil_div(kTargetCtasPerSm * num_sms, ctas);
  splits = std::min(splits, std::max<int64_t>(1, cap_tiles / kMinTilesPerSplit));
  const int64_t max_tiles_per_split = std::max<int64_t>(1, (kMaxBtEntries - 1) * block_size / kDecodeTileTokens);
  splits = std::max(splits, ceil_div(cap_tiles, max_tiles_per_split));
  return static_cast<int>(std::clamp<int64_t>(splits, 1, kDecodeMaxSplits));
}

}  // namespace

void paged_attention_decode(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& kv_arena, int64_t layer,
                            const torch::Tensor& seq_lens, const torch::Tensor& block_tables, double scale,
                            bool invariant) {
  EPD_CHECK_CUDA(q);
  EPD_CHECK_SAME_DEVICE(out, q);
  EPD_CHECK_SAME_DEVICE(kv_arena, q);
  EPD_CHECK_SAME_DEVICE(seq_lens, q);
  EPD_CHECK_SAME_DEVICE(block_tables, q);
  const DType dtype = half_dtype(q, "q");
  TORCH_CHECK(q.dim() == 3, "q must be [B, Hq, D], got ", q.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "out must be ", q.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(kv_arena.scalar_type() == q.scalar_type(), "kv_arena must be ", q.scalar_type(), ", got ",
              kv_arena.scalar_type());
  EPD_CHECK_LAST_DIM_CONTIGUOUS(q);
  EPD_CHECK_LAST_DIM_CONTIGUOUS(out);
  EPD_CHECK_LAST_DIM_CONTIGUOUS(kv_arena);
  TORCH_CHECK(kv_arena.dim() == 6 && kv_arena.size(2) == 2,
              "kv_arena must be [num_blocks, num_layers, 2, block_size, Hkv, D], got ", kv_arena.sizes());
  EPD_CHECK_DTYPE(seq_lens, torch::kInt32);
  EPD_CHECK_DTYPE(block_tables, torch::kInt32);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.is_contiguous(), "seq_lens must be a contiguous [B] tensor, got ",
              seq_lens.sizes());
  TORCH_CHECK(block_tables.dim() == 2, "block_tables must be [B, max_blocks], got ", block_tables.sizes());
  EPD_CHECK_LAST_DIM_CONTIGUOUS(block_tables);

  const int64_t batch = q.size(0), hq = q.size(1), head_dim = q.size(2);
  const int64_t num_layers = kv_arena.size(1), block_size = kv_arena.size(3), hkv = kv_arena.size(4);
  const int64_t max_blocks = block_tables.size(1);
  TORCH_CHECK(head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128,
              "head_dim must be 64, 80, 96 or 128, got ", head_dim);
  TORCH_CHECK(kv_arena.size(5) == head_dim, "kv_arena head_dim must be q's ", head_dim, ", got ", kv_arena.size(5));
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, "q heads (", hq, ") must be a multiple of kv heads (", hkv, ")");
  TORCH_CHECK(seq_lens.size(0) == batch, "seq_lens must have B = ", batch, " entries, got ", seq_lens.size(0));
  TORCH_CHECK(block_tables.size(0) == batch, "block_tables must have B = ", batch, " rows, got ",
              block_tables.size(0));
  TORCH_CHECK(block_size >= 1 && (block_size & (block_size - 1)) == 0, "block_size must be a power of two, got ",
              block_size);
  TORCH_CHECK(layer >= 0 && layer < num_layers, "layer ", layer, " out of range [0, ", num_layers, ")");
  TORCH_CHECK(max_blocks * block_size < (int64_t{1} << 31), "block_tables addresses ", max_blocks * block_size,
              " tokens; the limit is 2^31 - 1");
  TORCH_CHECK(batch <= 65535 && hkv <= 65535, "B (", batch, ") and Hkv (", hkv, ") must be <= 65535");
  // 16-byte copies of K/V rows: every row must start on a 16-byte boundary.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(kv_arena.data_ptr()) % 16 == 0, "kv_arena must be 16-byte aligned");
  for (int dim = 0; dim < 5; ++dim)
    TORCH_CHECK(kv_arena.stride(dim) % 8 == 0, "kv_arena stride of dim ", dim, " must be a multiple of 8, got ",
                kv_arena.stride(dim));
  if (batch == 0) return;

  const c10::cuda::CUDAGuard guard(q.device());
  const DeviceLimits limits = device_limits(q.get_device());

  PagedDecodeParams p{};
  p.q = q.data_ptr();
  p.out = out.data_ptr();
  p.kv_arena = kv_arena.data_ptr();
  p.seq_lens = seq_lens.data_ptr<int>();
  p.block_tables = block_tables.data_ptr<int>();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.out_stride_b = out.stride(0);
  p.out_stride_h = out.stride(1);
  p.kv_stride_block = kv_arena.stride(0);
  p.kv_stride_kv = kv_arena.stride(2);
  p.kv_stride_token = kv_arena.stride(3);
  p.kv_stride_head = kv_arena.stride(4);
  p.kv_layer_offset = layer * kv_arena.stride(1);
  p.bt_stride = block_tables.stride(0);
  p.batch = static_cast<int>(batch);
  p.num_q_heads = static_cast<int>(hq);
  p.num_kv_heads = static_cast<int>(hkv);
  p.head_dim = static_cast<int>(head_dim);
  p.group = static_cast<int>(hq / hkv);
  p.group_per_cta = p.group <= 1 ? 1 : p.group <= 2 ? 2 : p.group <= 4 ? 4 : kDecodeMaxGroup;
  p.q_subgroups = static_cast<int>(ceil_div(p.group, p.group_per_cta));
  TORCH_CHECK(hkv * p.q_subgroups <= 65535, "Hkv * q subgroups must be <= 65535");
  p.block_size = static_cast<int>(block_size);
  int log2_bs = 0;
  while ((int64_t{1} << log2_bs) < block_size) ++log2_bs;
  p.log2_block_size = log2_bs;
  p.max_blocks = static_cast<int>(max_blocks);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);

  const int64_t cap_tokens = max_blocks * block_size;
  const int64_t cap_tiles = ceil_div(cap_tokens, kDecodeTileTokens);
  if (invariant) {
    p.split_tiles = kInvariantSplitTiles;
    const int64_t splits = std::max<int64_t>(1, ceil_div(cap_tiles, kInvariantSplitTiles));
    TORCH_CHECK(splits <= kDecodeMaxSplits, "batch-invariant decode attention covers ",
                int64_t{kDecodeMaxSplits} * kInvariantSplitTiles * kDecodeTileTokens, " tokens per sequence; "
                "block_tables addresses ", cap_tokens);
    p.num_splits = static_cast<int>(splits);
    p.direct = 0;
  } else {
    p.split_tiles = 0;
    p.num_splits = choose_num_splits(batch * hkv * p.q_subgroups, cap_tokens, block_size, limits.num_sms);
    p.direct = p.num_splits == 1;
  }
  const int64_t max_tiles_per_split = p.split_tiles > 0 ? p.split_tiles : ceil_div(cap_tiles, p.num_splits);
  p.bt_smem_entries =
      static_cast<int>(std::max<int64_t>(1, std::min(max_blocks, ceil_div(max_tiles_per_split * kDecodeTileTokens,
                                                                          block_size) + 1)));
  const int smem = paged_decode_smem_bytes(p.head_dim, p.bt_smem_entries);
  TORCH_CHECK(smem <= limits.max_smem_per_block, "paged decode needs ", smem,
              " bytes of shared memory per block; the device allows ", limits.max_smem_per_block);

  torch::Tensor partial_acc, partial_ml;
  if (!p.direct) {
    const auto f32 = q.options().dtype(torch::kFloat32);
    partial_acc = torch::empty({batch, hq, p.num_splits, head_dim}, f32);
    partial_ml = torch::empty({batch, hq, p.num_splits, 2}, f32);
    p.partial_acc = partial_acc.data_ptr<float>();
    p.partial_ml = partial_ml.data_ptr<float>();
  }
  p.dtype = dtype;
  launch_paged_attention_decode(p, current_stream(q));
  EPD_CHECK_LAUNCH();
}

}  // namespace epd
