// Shared helpers for every kernel family: dtype traits, 16-byte vectors, dispatch macros, the SM count.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <cstdlib>
#include <utility>

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

// Whether launch_pdl asks for PDL: on sm_90+ devices unless EPD_PDL=0 (read once; cached per device).
inline bool pdl_enabled() {
  static const bool env_on = [] {
    const char* s = std::getenv("EPD_PDL");
    return s == nullptr || !(s[0] == '0' && s[1] == '\0');
  }();
  static int cached[64] = {};  // 0 unknown, 1 off, 2 on
  int dev = 0;
  cudaGetDevice(&dev);
  if (!env_on || dev < 0 || dev >= 64) return false;
  if (cached[dev] == 0) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cached[dev] = major >= 9 ? 2 : 1;
  }
  return cached[dev] == 2;
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

// Programmatic dependent launch (sm_90+). A kernel started with launch_pdl may begin while the
// kernel before it on the stream is still running, so it must call pdl_wait() in every CTA before
// any early return, before it reads anything an earlier kernel wrote and before it writes anything
// (reading what no kernel of the stream writes, like weights, may come first). Every kernel of the
// decode step calls pdl_launch_dependents() at its start, which lets a launch_pdl kernel after it be
// scheduled once all of its CTAs have started. Both are no-ops in a kernel launched without PDL.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), allowed to overlap the previous kernel's tail
// (see pdl_wait). Errors are left for EPD_CHECK_LAUNCH, as with <<<>>>.
template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                Args&&... args) {
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = pdl_enabled() ? 1 : 0;
  (void)cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
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
