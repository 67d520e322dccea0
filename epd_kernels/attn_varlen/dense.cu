// Dense non-causal attention (CLIP vision tower): launcher for the shared FlashAttention-2 mainloop
// (fmha.cuh) with strided q/k/v [B, N, H, D] (views into one fused qkv tensor).
#include "epd_kernels/attn_varlen/fmha.cuh"
#include "epd_kernels/attn_varlen/params.h"
#include "epd_kernels/common.cuh"

namespace epd {

void launch_attention_dense(const DenseAttnParams& p, cudaStream_t stream) {
  // Same tile choice as prefill: 128 rows per CTA (4 warps x 32 rows) for large grids (16 images),
  // 64 rows per CTA for small ones (one image: 10 x 16 CTAs).
  const bool large = fmha::grid_ctas(p.seqlen, 128, p.batch, p.num_heads) >= 4 * num_sms();
  EPD_SWITCH_HALF_TYPES(p.dtype, [&] {
    EPD_SWITCH_HEAD_DIM(p.head_dim, [&] {
      using Dense = fmha::DenseProblem<scalar_t>;
      if constexpr (kHeadDim == 64) {  // the A/B's other tiles (fmha::tiles_variant), this head_dim only
        const int variant = large ? fmha::tiles_variant() : 0;
        if (variant == 1) {  // 8 warps x 16 rows, Q in registers, 2 CTAs per SM (122 registers)
          fmha::launch_fmha<scalar_t, fmha::FmhaConfig<kHeadDim, 8, 1, 64, 2>, false, Dense>(p, p.seqlen, p.batch,
                                                                                             p.num_heads, stream);
        } else if (variant == 2) {  // 4 warps x 16 rows, Q in registers, 4 CTAs per SM (126 registers)
          fmha::launch_fmha<scalar_t, fmha::FmhaConfig<kHeadDim, 4, 1, 64, 4>, false, Dense>(p, p.seqlen, p.batch,
                                                                                             p.num_heads, stream);
        } else if (variant == 3) {  // 128 rows x 128 keys, FlashAttention-2's tile at this head_dim (255 registers)
          fmha::launch_fmha<scalar_t, fmha::FmhaConfig<kHeadDim, 4, 2, 128>, false, Dense>(p, p.seqlen, p.batch,
                                                                                           p.num_heads, stream);
        }
        if (variant != 0) return;
      }
      if (large) {  // 222 registers at head_dim 64: 2 CTAs per SM
        fmha::launch_fmha<scalar_t, fmha::FmhaConfig<kHeadDim, 4, 2, 64>, false, Dense>(p, p.seqlen, p.batch,
                                                                                        p.num_heads, stream);
      } else {
        fmha::launch_fmha<scalar_t, fmha::FmhaConfig<kHeadDim, 4, 1, 64>, false, Dense>(p, p.seqlen, p.batch,
                                                                                        p.num_heads, stream);
      }
    });
  });
}

}  // namespace epd
