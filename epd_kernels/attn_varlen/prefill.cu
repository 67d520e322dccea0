// Paged varlen causal prefill attention: launcher for the shared FlashAttention-2 mainloop (fmha.cuh)
// with K/V gathered from the paged arena through each sequence's block table.
#include "epd_kernels/attn_varlen/fmha.cuh"
#include "epd_kernels/attn_varlen/params.h"
#include "epd_kernels/common.cuh"

namespace epd {

void launch_paged_attention_prefill(const PagedPrefillParams& p, cudaStream_t stream) {
  const int group = p.num_heads / p.num_kv_heads;
  const int64_t rows = static_cast<int64_t>(p.max_seqlen_q) * group;  // packed (query, head-in-group) rows
  // Large grids: 128 rows per CTA (4 warps x 32 rows; each K/V fragment feeds two row fragments).
  // Small grids (e.g. one 640-token prompt): 64 rows per CTA for more CTAs per SM. Host data only.
  // Batch-invariant mode: always 64, so a sequence's tiles never depend on what shares the batch.
  const bool large = !p.invariant && fmha::grid_ctas(rows, 128, p.batch, p.num_kv_heads) >= 4 * num_sms();
  EPD_SWITCH_HALF_TYPES(p.dtype, [&] {
    EPD_SWITCH_HEAD_DIM(p.head_dim, [&] {
      using Paged = fmha::PagedProblem<scalar_t>;
      if constexpr (kHeadDim == 128) {  // the A/B's other tiles (fmha::tiles_variant), this head_dim only
        const int variant = large ? fmha::tiles_variant() : 0;
        if (variant == 1) {  // 8 warps x 16 rows, Q in registers (205 registers: 1 CTA per SM)
          fmha::launch_fmha<scalar_t, fmha::FmhaConfig<kHeadDim, 8, 1, 64>, true, Paged>(p, rows, p.batch,
                                                                                         p.num_kv_heads, stream);
        } else if (variant == 2) {  // 4 warps x 16 rows, Q in registers, 2 CTAs per SM (219 registers)
          fmha::launch_fmha<scalar_t, fmha::FmhaConfig<kHeadDim, 4, 1, 64, 2>, true, Paged>(p, rows, p.batch,
                                                                                            p.num_kv_heads, stream);
        } else if (variant == 3) {  // the same, 3 CTAs per SM (168 registers, 40 bytes of spills)
          fmha::launch_fmha<scalar_t, fmha::FmhaConfig<kHeadDim, 4, 1, 64, 3>, true, Paged>(p, rows, p.batch,
                                                                                            p.num_kv_heads, stream);
        }
        if (variant != 0) return;
      }
      if (large) {  // 255 registers and 16 bytes of spills at head_dim 128: 2 CTAs per SM
        fmha::launch_fmha<scalar_t, fmha::FmhaConfig<kHeadDim, 4, 2, 64>, true, Paged>(p, rows, p.batch,
                                                                                       p.num_kv_heads, stream);
      } else {
        fmha::launch_fmha<scalar_t, fmha::FmhaConfig<kHeadDim, 4, 1, 64>, true, Paged>(p, rows, p.batch,
                                                                                       p.num_kv_heads, stream);
      }
    });
  });
}

}  // namespace epd
