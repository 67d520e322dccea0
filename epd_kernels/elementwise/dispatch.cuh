// Dtype dispatch for the elementwise family: half types plus fp32 (activations accept fp32 too).
#pragma once
#include "epd_kernels/common.cuh"

#define EPD_SWITCH_FLOAT_TYPES(DTYPE, ...)                                       \
  [&] {                                                                          \
    if ((DTYPE) == ::epd::DType::kFloat32) {                                     \
      using scalar_t = float;                                                    \
      return __VA_ARGS__();                                                      \
    } else if ((DTYPE) == ::epd::DType::kFloat16) {                              \
      using scalar_t = half;                                                     \
      return __VA_ARGS__();                                                      \
    } else {                                                                     \
      using scalar_t = __nv_bfloat16;                                            \
      return __VA_ARGS__();                                                      \
    }                                                                            \
  }()

namespace epd {

// True when p is aligned for 16-byte vector accesses.
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Grid for a grid-stride loop over `work` items with `threads` per block.
inline unsigned grid_for(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > (1 << 20) ? (1 << 20) : blocks));
}

}  // namespace epd
