// SiLU-and-multiply of one gate/up pair, shared by silu_and_mul.cu and the GEMV's fused gate_up_silu
// epilogue, so both round alike: round(round(silu(gate)) * up), silu(gate) rounded to T as HF does.
#pragma once
#include "epd_kernels/common.cuh"

namespace epd {

__device__ __forceinline__ float silu_f32(float g) { return g / (1.0f + __expf(-g)); }

template <typename T>
__device__ __forceinline__ T silu_mul(T gate, T up) {
  const T s = from_float<T>(silu_f32(to_float(gate)));  // rounded to T, as HF does
  return from_float<T>(to_float(s) * to_float(up));
}

}  // namespace epd
