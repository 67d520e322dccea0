// Shared helpers for every kernel family: dtype traits, 16-byte vectors, dispatch macros, the SM count.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace epd {

// Element types the kernels are compiled for.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

template <typename T> struct TypeTraits;
template <> struct TypeTraits<half> {
  __device__ __forceinline__ static float to_float(half x) { return __half2float(x); }
  __device__ __forceinline__ static half from_float(float x) { return __float2half_rn(x); }
};
template <> struct TypeTraits<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <> struct TypeTraits<float> {
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};

template <typename T> __device__ __forceinline__ float to_float(T x) { return TypeTraits<T>::to_float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x) { return TypeTraits<T>::from_float(x); }

// N elements of T loaded/stored as one 16-byte access (N = 16 / sizeof(T)).
template <typename T> struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// Multiprocessors of the current device (host; cached per device).
inline int num_sms() {
  static int cached[64] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    cached[dev] = n > 0 ? n : 132;
  }
  return cached[dev];
}

#ifdef __CUDACC__  // device intrinsics: not seen by the host compiler (ops.cpp files)
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

#endif  // __CUDACC__

}  // namespace epd

// Dispatch on a runtime DType to a compile-time type `scalar_t` (half / bf16 only).
#define EPD_SWITCH_HALF_TYPES(DTYPE, ...)                                        \
  [&] {                                                                          \
    if ((DTYPE) == ::epd::DType::kFloat16) {                                     \
      using scalar_t = half;                                                     \
      return __VA_ARGS__();                                                      \
    } else {                                                                     \
      using scalar_t = __nv_bfloat16;                                            \
      return __VA_ARGS__();                                                      \
    }                                                                            \
  }()

// Dispatch on head_dim to a constexpr `kHeadDim` (64, 80, 96, 128).
#define EPD_SWITCH_HEAD_DIM(HEAD_DIM, ...)                                       \
  [&] {                                                                          \
    if ((HEAD_DIM) == 64) { constexpr int kHeadDim = 64; return __VA_ARGS__(); } \
    else if ((HEAD_DIM) == 80) { constexpr int kHeadDim = 80; return __VA_ARGS__(); } \
    else if ((HEAD_DIM) == 96) { constexpr int kHeadDim = 96; return __VA_ARGS__(); } \
    else { constexpr int kHeadDim = 128; return __VA_ARGS__(); }                 \
  }()
