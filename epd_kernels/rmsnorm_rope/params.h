// Parameter structs for the rmsnorm_rope family (POD, no torch): rms_norm, add_rms_norm,
// layer_norm, add_layer_norm and rope_and_cache_write. Strides are in elements; pointers are device pointers.
#pragma once
#include <cstdint>
#include <initializer_list>

#include "epd_kernels/common.cuh"

namespace epd {

// rms_norm: out = w * round(x * rsqrt(mean(x^2) + eps)), rounded again.
// add_rms_norm: residual = round(x + residual) (in place), then out = rms_norm(residual).
struct RmsNormParams {
  void* out;             // [rows, hidden], row stride out_row_stride
  const void* x;         // [rows, hidden], row stride x_row_stride
  void* residual;        // add_rms_norm only: [rows, hidden], read and overwritten; nullptr for rms_norm
  const void* weight;    // [hidden]
  int64_t rows;
  int hidden;
  int64_t out_row_stride, x_row_stride, residual_row_stride;
  float eps;
  DType dtype;           // of every tensor above
};

// layer_norm: out = (x - mean) * rsqrt(var + eps) * weight + bias, statistics in fp32, one rounding.
// add_layer_norm: residual = round(x + residual) (in place), then out = layer_norm(residual).
struct LayerNormParams {
  void* out;             // [rows, hidden]
  const void* x;         // [rows, hidden]
  void* residual;        // add_layer_norm only: [rows, hidden], read and overwritten; nullptr for layer_norm
  const void* weight;    // [hidden]
  const void* bias;      // [hidden]
  int64_t rows;
  int hidden;
  int64_t out_row_stride, x_row_stride, residual_row_stride;
  float eps;
  DType dtype;
};

// Rotate-half RoPE on q and k; rotated k and plain v go to the paged KV arena.
struct RopeCacheParams {
  void* q_rot;                 // [T, Hq, D] contiguous (output)
  const void* q;               // [T, Hq, D], row stride q_row_stride, head stride D
  const void* k;               // [T, Hkv, D], row stride k_row_stride, head stride D
  const void* v;               // [T, Hkv, D], row stride v_row_stride, head stride D
  const int64_t* positions;    // [T]
  const float* cos_sin;        // [max_pos, D] fp32 contiguous: cos | sin
  const int64_t* slot_mapping; // [T], -1 = do not write k/v
  void* kv_arena;              // [num_blocks, num_layers, 2, block_size, Hkv, D]
  int64_t num_tokens;
  int num_q_heads, num_kv_heads, head_dim;
  int64_t q_row_stride, k_row_stride, v_row_stride;
  int64_t arena_block_stride, arena_layer_stride, arena_kv_stride, arena_slot_stride;
  int layer, block_size;
  DType dtype;                 // of q, k, v, q_rot and the arena
};

// Norm rows use 16-byte accesses when every pointer is 16-byte aligned and every row starts on a
// 16-byte boundary; otherwise they fall back to one element per access (slow, for odd hidden sizes).
constexpr int kNormVecElems = 8;          // 16 bytes of a 16-bit dtype
constexpr int kNormMaxThreads = 512;      // threads per row at most (__launch_bounds__: 128 registers each)
constexpr int kNormMaxVecsPerThread = 4;  // 16-byte vectors of one row held per thread at most
constexpr int kNormScalarsPerThread = 12; // elements per thread on the one-element path
constexpr int kMaxNormHiddenVectorized = kNormMaxThreads * kNormMaxVecsPerThread * kNormVecElems;  // 16384
constexpr int kMaxNormHiddenScalar = kNormMaxThreads * kNormScalarsPerThread;                     // 6144

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline bool norm_rows_vectorized(int hidden, std::initializer_list<const void*> ptrs,
                                 std::initializer_list<int64_t> row_strides) {
  if (hidden % kNormVecElems != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  for (int64_t s : row_strides)
    if (s % kNormVecElems != 0) return false;
  return true;
}

inline int max_norm_hidden(bool vectorized) { return vectorized ? kMaxNormHiddenVectorized : kMaxNormHiddenScalar; }

// The launcher and the host checks both decide the access width from the params through these.
inline bool norm_vectorized(const RmsNormParams& p) {
  return norm_rows_vectorized(p.hidden, {p.out, p.x, p.residual, p.weight},
                              {p.out_row_stride, p.x_row_stride, p.residual ? p.residual_row_stride : 0});
}
inline bool norm_vectorized(const LayerNormParams& p) {
  return norm_rows_vectorized(p.hidden, {p.out, p.x, p.residual, p.weight, p.bias},
                              {p.out_row_stride, p.x_row_stride, p.residual ? p.residual_row_stride : 0});
}

void launch_rms_norm(const RmsNormParams& p, cudaStream_t stream);
void launch_add_rms_norm(const RmsNormParams& p, cudaStream_t stream);
void launch_layer_norm(const LayerNormParams& p, cudaStream_t stream);
void launch_add_layer_norm(const LayerNormParams& p, cudaStream_t stream);
void launch_rope_and_cache_write(const RopeCacheParams& p, cudaStream_t stream);

}  // namespace epd
