// gelu (exact, erf) and quick_gelu (x * sigmoid(1.702 x)) over any contiguous tensor:
// fp32 math, rounded once to the input dtype. 16-byte vectors over the body, scalars over the tail.
#include <algorithm>

#include "epd_kernels/common.cuh"
#include "epd_kernels/elementwise/dispatch.cuh"
#include "epd_kernels/elementwise/params.h"

namespace epd {
namespace {

struct GeluErf {
  // erff is the accurate library function even under --use_fast_math.
  __device__ __forceinline__ float operator()(float x) const { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
};

struct QuickGelu {
  __device__ __forceinline__ float operator()(float x) const { return x / (1.0f + __expf(-1.702f * x)); }
};

template <typename T, typename Act>
__device__ __forceinline__ Vec16<T> apply(const Vec16<T>& in, const Act& act) {
  Vec16<T> res;
#pragma unroll
  for (int i = 0; i < Vec16<T>::N; ++i) res.v[i] = from_float<T>(act(to_float(in.v[i])));
  return res;
}

// kVec: 16-byte vectors over the body (two per thread per step, both loads issued first), scalars
// over the last numel % N elements; !kVec: scalars throughout (unaligned pointers).
template <typename T, bool kVec, typename Act>
__global__ void activation_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t numel, Act act) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  const int64_t tid = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  int64_t tail_start = 0;
  if constexpr (kVec) {
    const auto* in_vec = reinterpret_cast<const Vec16<T>*>(x);
    auto* out_vec = reinterpret_cast<Vec16<T>*>(out);
    const int64_t num_vecs = numel / Vec16<T>::N;
    int64_t v = tid;
    for (; v + stride < num_vecs; v += 2 * stride) {
      const Vec16<T> a = in_vec[v];
      const Vec16<T> b = in_vec[v + stride];
      out_vec[v] = apply(a, act);
      out_vec[v + stride] = apply(b, act);
    }
    if (v < num_vecs) out_vec[v] = apply(in_vec[v], act);
    tail_start = num_vecs * Vec16<T>::N;
  }
  for (int64_t i = tail_start + tid; i < numel; i += stride) out[i] = from_float<T>(act(to_float(x[i])));
}

template <typename Act>
void launch_activation(const ActivationParams& p, cudaStream_t stream) {
  if (p.numel == 0) return;
  constexpr int kThreads = 256;
  EPD_SWITCH_FLOAT_TYPES(p.dtype, [&] {
    constexpr int N = Vec16<scalar_t>::N;
    auto* out = static_cast<scalar_t*>(p.out);
    const auto* x = static_cast<const scalar_t*>(p.x);
    if (aligned16(out) && aligned16(x)) {
      const int64_t work = std::max<int64_t>((p.numel / N + 1) / 2, 1);
      activation_kernel<scalar_t, true><<<grid_for(work, kThreads), kThreads, 0, stream>>>(out, x, p.numel, Act{});
    } else {
      activation_kernel<scalar_t, false><<<grid_for(p.numel, kThreads), kThreads, 0, stream>>>(out, x, p.numel, Act{});
    }
  });
}

}  // namespace

void launch_gelu(const ActivationParams& p, cudaStream_t stream) { launch_activation<GeluErf>(p, stream); }
void launch_quick_gelu(const ActivationParams& p, cudaStream_t stream) { launch_activation<QuickGelu>(p, stream); }

}  // namespace epd
