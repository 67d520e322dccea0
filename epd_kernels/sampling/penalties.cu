// apply_penalties / record_tokens: presence, frequency and repetition penalties on fp32 logits, the same
// function as epd_kernels/reference.py (vLLM's order, HF's repetition penalty), and the per-slot token counts
// they read.
//
// Grid (B, ceil(V / kChunk)): one block per chunk of a row, so batch 1 at V = 32000 still spreads over
// 16 blocks. A row without a slot is copied (out-of-place) or left alone (in place): it never reads the
// slot's state. The arithmetic is spelled with _rn intrinsics so that --use_fast_math neither approximates
// the division nor contracts x - f * n into an fma: every output is bit-identical to the reference.
// No host sync, no workspace, launch config fixed by (B, V): graph-capturable.
#include "epd_kernels/common.cuh"
#include "epd_kernels/sampling/params.h"

namespace epd {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;                    // tokens per thread, loaded before any math (more loads in flight)
constexpr int kChunk = kThreads * kItems;    // tokens per block
constexpr int kRecordThreads = 128;

__device__ __forceinline__ float penalize(float x, int32_t n, bool in_prompt, float presence, float frequency,
                                          float repetition) {
  if (n > 0 || in_prompt) x = x > 0.0f ? __fdiv_rn(x, repetition) : __fmul_rn(x, repetition);
  x = __fsub_rn(x, __fmul_rn(frequency, __int2float_rn(n)));
  return __fsub_rn(x, __fmul_rn(presence, n > 0 ? 1.0f : 0.0f));
}

__global__ void __launch_bounds__(kThreads) apply_penalties_kernel(PenaltyParams p) {
  const int64_t r = blockIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int64_t slot = p.slots[r];
  const float* x = p.logits + r * p.logits_row_stride;
  float* out = p.out + r * p.out_row_stride;
  if (slot < 0 || slot >= p.num_slots) {
    if (out == x) return;  // in place: nothing to do for this row
    for (int64_t i = begin + threadIdx.x; i < begin + kChunk && i < p.vocab; i += kThreads) out[i] = x[i];
    return;
  }
  const int32_t* counts = p.counts + slot * p.counts_row_stride;
  const uint8_t* mask = p.prompt_mask + slot * p.mask_row_stride;
  const float presence = p.presence[r], frequency = p.frequency[r], repetition = p.repetition[r];
  float v[kItems];
  int32_t n[kItems];
  uint8_t m[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = begin + j * kThreads + threadIdx.x;
    const bool in = i < p.vocab;
    v[j] = in ? x[i] : 0.0f;
    n[j] = in ? counts[i] : 0;
    m[j] = in ? mask[i] : 0;
  }
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = begin + j * kThreads + threadIdx.x;
    if (i < p.vocab) out[i] = penalize(v[j], n[j], m[j] != 0, presence, frequency, repetition);
  }
}

__global__ void __launch_bounds__(kRecordThreads) record_tokens_kernel(RecordParams p) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRecordThreads + threadIdx.x;
  if (r >= p.batch) return;
  const int64_t slot = p.slots[r], token = p.tokens[r];
  if (slot < 0 || slot >= p.num_slots || token < 0 || token >= p.vocab) return;
  atomicAdd(p.counts + slot * p.counts_row_stride + token, 1);  // two rows may share a slot
}

}  // namespace

void launch_apply_penalties(const PenaltyParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.vocab == 0) return;
  const dim3 grid(static_cast<unsigned>(p.batch), static_cast<unsigned>((p.vocab + kChunk - 1) / kChunk));
  apply_penalties_kernel<<<grid, kThreads, 0, stream>>>(p);
}

void launch_record_tokens(const RecordParams& p, cudaStream_t stream) {
  if (p.batch == 0) return;
  const unsigned blocks = static_cast<unsigned>((p.batch + kRecordThreads - 1) / kRecordThreads);
  record_tokens_kernel<<<blocks, kRecordThreads, 0, stream>>>(p);
}

}  // namespace epd
