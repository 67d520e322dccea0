// Host side of paged prefill and dense attention: input checks, params, launch.
#include "epd_kernels/attn_varlen/ops.h"

#include <cmath>

#include "epd_kernels/attn_varlen/params.h"
#include "epd_kernels/torch_utils.h"

namespace epd {
namespace {

constexpr double kLog2e = 1.4426950408889634;

bool supported_head_dim(int64_t d) { return d == 64 || d == 80 || d == 96 || d == 128; }

// The kernels move 16-byte chunks: the base must be 16-byte aligned and every stride a multiple of 8 elements.
void check_chunked(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, " must have a contiguous last dim, got stride ", t.stride(-1));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    TORCH_CHECK(t.stride(i) % 8 == 0, name, ".stride(", i, ") must be a multiple of 8 elements, got ", t.stride(i));
  }
}

void check_int32_vector(const torch::Tensor& t, const char* name, int64_t len, const torch::Tensor& like) {
  EPD_CHECK_SAME_DEVICE(t, like);
  TORCH_CHECK(t.scalar_type() == torch::kInt32, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, name, " must have shape [", len, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

void paged_attention_prefill(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& kv_arena, int64_t layer,
                             const torch::Tensor& cu_seqlens_q, const torch::Tensor& seq_lens,
                             const torch::Tensor& block_tables, double scale, int64_t max_seqlen_q,
                             bool invariant) {
  EPD_CHECK_CUDA(q);
  EPD_CHECK_SAME_DEVICE(out, q);
  EPD_CHECK_SAME_DEVICE(kv_arena, q);
  const DType dtype = half_dtype(q, "q");
  TORCH_CHECK(q.dim() == 3, "q must be [T, Hq, D], got ", q.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "out must be ", q.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(kv_arena.scalar_type() == q.scalar_type(), "kv_arena must be ", q.scalar_type(), ", got ",
              kv_arena.scalar_type());
  TORCH_CHECK(kv_arena.dim() == 6 && kv_arena.size(2) == 2,
              "kv_arena must be [num_blocks, num_layers, 2, block_size, Hkv, D], got ", kv_arena.sizes());
  TORCH_CHECK(kv_arena.is_contiguous(), "kv_arena must be contiguous");
  const int64_t head_dim = q.size(2);
  const int64_t num_heads = q.size(1);
  const int64_t num_kv_heads = kv_arena.size(4);
  const int64_t block_size = kv_arena.size(3);
  TORCH_CHECK(supported_head_dim(head_dim), "head_dim must be 64, 80, 96 or 128, got ", head_dim);
  TORCH_CHECK(kv_arena.size(5) == head_dim, "kv_arena head_dim must be ", head_dim, ", got ", kv_arena.size(5));
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "q heads (", num_heads,
              ") must be a multiple of kv heads (", num_kv_heads, ")");
  TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0, "block_size must be a power of two, got ",
              block_size);
  TORCH_CHECK(layer >= 0 && layer < kv_arena.size(1), "layer must be in [0, ", kv_arena.size(1), "), got ", layer);
  const int64_t batch = seq_lens.size(0);
  check_int32_vector(seq_lens, "seq_lens", batch, q);
  check_int32_vector(cu_seqlens_q, "cu_seqlens_q", batch + 1, q);
  EPD_CHECK_SAME_DEVICE(block_tables, q);
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32, "block_tables must be int32, got ",
              block_tables.scalar_type());
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch, "block_tables must be [", batch,
              ", max_blocks], got ", block_tables.sizes());
  TORCH_CHECK(block_tables.stride(1) == 1, "block_tables must have a contiguous last dim");
  TORCH_CHECK(batch <= 65535 && num_kv_heads <= 65535, "batch and kv heads must be <= 65535, got ", batch, ", ",
              num_kv_heads);
  TORCH_CHECK(scale > 0, "scale must be positive, got ", scale);
  // A bound larger than every q_len (e.g. a static one) only adds CTAs that exit at once.
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_q * num_heads < (int64_t{1} << 31), "max_seqlen_q must be in [0, ",
              ((int64_t{1} << 31) - 1) / num_heads, "], got ", max_seqlen_q);
  TORCH_CHECK(q.size(0) * num_heads < (int64_t{1} << 31), "q has too many rows for 32-bit indexing");
  check_chunked(q, "q");
  check_chunked(out, "out");
  check_chunked(kv_arena, "kv_arena");
  if (q.size(0) == 0 || batch == 0 || max_seqlen_q == 0) return;

  const c10::cuda::CUDAGuard guard(q.device());
  PagedPrefillParams p{};
  p.q = q.data_ptr();
  p.out = out.data_ptr();
  const int64_t layer_stride = kv_arena.stride(1);
  p.kv = static_cast<const char*>(kv_arena.data_ptr()) + layer * layer_stride * kv_arena.element_size();
  p.q_row_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.o_row_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  p.block_stride = kv_arena.stride(0);
  p.token_stride = kv_arena.stride(3);
  p.v_offset = kv_arena.stride(2);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.block_table_stride = block_tables.stride(0);
  p.batch = static_cast<int>(batch);
  p.num_heads = static_cast<int>(num_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.log2_block_size = 0;
  while ((int64_t{1} << p.log2_block_size) < block_size) ++p.log2_block_size;
  p.max_seqlen_q = static_cast<int>(max_seqlen_q);
  p.invariant = invariant ? 1 : 0;
  p.scale_log2 = static_cast<float>(scale * kLog2e);
  p.dtype = dtype;
  launch_paged_attention_prefill(p, current_stream(q));
  EPD_CHECK_LAUNCH();
}

void attention_dense(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     double scale) {
  EPD_CHECK_CUDA(q);
  EPD_CHECK_SAME_DEVICE(out, q);
  EPD_CHECK_SAME_DEVICE(k, q);
  EPD_CHECK_SAME_DEVICE(v, q);
  const DType dtype = half_dtype(q, "q");
  TORCH_CHECK(q.dim() == 4, "q must be [B, N, H, D], got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), "v must have q's shape ", q.sizes(), ", got ", v.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must be ", q.scalar_type(), ", got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "v must be ", q.scalar_type(), ", got ", v.scalar_type());
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "out must be ", q.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(scale > 0, "scale must be positive, got ", scale);
  TORCH_CHECK(supported_head_dim(q.size(3)), "head_dim must be 64, 80, 96 or 128, got ", q.size(3));
  TORCH_CHECK(q.size(1) < (int64_t{1} << 31), "sequence too long for 32-bit indexing");
  TORCH_CHECK(q.size(0) <= 65535 && q.size(2) <= 65535, "batch and heads must be <= 65535, got ", q.size(0), ", ",
              q.size(2));
  check_chunked(q, "q");
  check_chunked(k, "k");
  check_chunked(v, "v");
  check_chunked(out, "out");
  if (q.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(q.device());
  DenseAttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_row_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0);
  p.k_row_stride = k.stride(1);
  p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0);
  p.v_row_stride = v.stride(1);
  p.v_head_stride = v.stride(2);
  p.o_batch_stride = out.stride(0);
  p.o_row_stride = out.stride(1);
  p.o_head_stride = out.stride(2);
  p.batch = static_cast<int>(q.size(0));
  p.seqlen = static_cast<int>(q.size(1));
  p.num_heads = static_cast<int>(q.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.scale_log2 = static_cast<float>(scale * kLog2e);
  p.dtype = dtype;
  launch_attention_dense(p, current_stream(q));
  EPD_CHECK_LAUNCH();
}

}  // namespace epd
