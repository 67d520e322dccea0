// Shared device helpers for every kernel family: dtype traits, 16-byte vectors, dispatch macros.
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

// Programmatic dependent launch (Hopper and later; no-ops before sm_90). A kernel launched with
// pdl_launch may start while the kernel before it on the stream is still running: it may read
// only what no earlier kernel writes (weights) before pdl_wait(), which returns once the
// kernels before it have completed and their writes are visible. pdl_trigger() lets the next
// PDL-launched kernel be scheduled now (a hint: its pdl_wait still waits for this kernel's end).
// Every kernel launched with pdl_launch must call pdl_wait() before it reads or writes
// activations, or a later kernel's wait could return before this kernel's predecessors are done.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

#endif  // __CUDACC__

// Host: whether kernels launch with programmatic dependent launch on the current device (compute
// capability >= 9), unless the environment says EPD_PDL=0 (a switch for same-run A/B benchmarks;
// read once per process).
inline bool pdl_enabled() {
  static const bool allowed = [] {
    const char* v = std::getenv("EPD_PDL");
    return v == nullptr || v[0] != '0';
  }();
  if (!allowed) return false;
  static int major[64] = {};  // per device; 0 = not asked yet (benign race: every writer stores the same)
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (major[dev] == 0) {
    int m = 0;
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    major[dev] = m;
  }
  return major[dev] >= 9;
}

#ifdef __CUDACC__
// kernel<<<grid, block, 0, stream>>>(args...), with programmatic dependent launch where
// pdl_enabled() (the kernel calls pdl_wait; see above). Stream capture keeps the attribute as a
// programmatic edge of the graph.
template <typename... Params, typename... Args>
void pdl_launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = pdl_enabled() ? 1 : 0;
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
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
