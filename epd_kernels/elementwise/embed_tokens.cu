// embed_tokens: out[t] = image_index[t] >= 0 ? image_embeds[image_index[t]] : weight[input_ids[t]].
// A row whose index is out of range ([0, V) for ids, [0, N) for image rows) is written as zeros:
// the device never reads out of bounds and never syncs with the host to report it; callers
// validate ids before they get here. One block per token row, 16-byte vectors when H allows.
#include <algorithm>

#include "epd_kernels/common.cuh"
#include "epd_kernels/elementwise/dispatch.cuh"
#include "epd_kernels/elementwise/params.h"

namespace epd {
namespace {

template <typename T, int N>
__global__ void embed_tokens_kernel(T* __restrict__ out, const int64_t* __restrict__ input_ids,
                                    const T* __restrict__ weight, const int64_t* __restrict__ image_index,
                                    const T* __restrict__ image_embeds, int64_t hidden, int64_t vocab,
                                    int64_t num_image_rows) {
  const int64_t row = blockIdx.x;
  const int64_t img = image_index != nullptr ? image_index[row] : -1;
  const T* src = nullptr;
  if (img >= 0) {
    if (img < num_image_rows) src = image_embeds + img * hidden;
  } else {
    const int64_t id = input_ids[row];
    if (id >= 0 && id < vocab) src = weight + id * hidden;
  }
  T* dst = out + row * hidden;
  const int64_t num_vecs = hidden / N;
  if constexpr (N == 1) {
    for (int64_t i = threadIdx.x; i < num_vecs; i += blockDim.x) dst[i] = src != nullptr ? src[i] : from_float<T>(0.f);
  } else {
    Vec16<T> zero;
#pragma unroll
    for (int i = 0; i < N; ++i) zero.v[i] = from_float<T>(0.f);
    const auto* src_vec = reinterpret_cast<const Vec16<T>*>(src);
    auto* dst_vec = reinterpret_cast<Vec16<T>*>(dst);
    for (int64_t i = threadIdx.x; i < num_vecs; i += blockDim.x) dst_vec[i] = src != nullptr ? src_vec[i] : zero;
  }
}

}  // namespace

void launch_embed_tokens(const EmbedParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.hidden == 0) return;
  EPD_SWITCH_FLOAT_TYPES(p.dtype, [&] {
    constexpr int N = Vec16<scalar_t>::N;
    auto* out = static_cast<scalar_t*>(p.out);
    const auto* weight = static_cast<const scalar_t*>(p.weight);
    const auto* image_embeds = static_cast<const scalar_t*>(p.image_embeds);
    const bool vec = p.hidden % N == 0 && aligned16(out) && aligned16(weight) &&
                     (image_embeds == nullptr || aligned16(image_embeds));
    const int vecs = static_cast<int>(std::min<int64_t>(vec ? p.hidden / N : p.hidden, 1 << 20));
    const int threads = vecs >= 256 ? 256 : (vecs >= 128 ? 128 : 64);
    const dim3 grid(static_cast<unsigned>(p.num_tokens));
    if (vec) {
      embed_tokens_kernel<scalar_t, N><<<grid, threads, 0, stream>>>(out, p.input_ids, weight, p.image_index,
                                                                     image_embeds, p.hidden, p.vocab, p.num_image_rows);
    } else {
      embed_tokens_kernel<scalar_t, 1><<<grid, threads, 0, stream>>>(out, p.input_ids, weight, p.image_index,
                                                                     image_embeds, p.hidden, p.vocab, p.num_image_rows);
    }
  });
}

}  // namespace epd
