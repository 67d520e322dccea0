// Parameter structs for the elementwise family (activations, token embedding). POD only.
#pragma once
#include <cstdint>

#include "epd_kernels/common.cuh"

namespace epd {

// out[t, i] = silu(x[t, i]) * x[t, I + i]: gate | up halves of one row, out [T, I].
struct SiluAndMulParams {
  void* out;
  const void* x;
  int64_t num_tokens;      // T
  int64_t inter;           // I
  int64_t x_row_stride;    // elements between rows of x (>= 2I)
  int64_t out_row_stride;  // elements between rows of out (>= I)
  DType dtype;
};

// out = act(x) elementwise over numel contiguous elements (gelu, quick_gelu).
struct ActivationParams {
  void* out;
  const void* x;
  int64_t numel;
  DType dtype;
};

// out[t] = image_index[t] >= 0 ? image_embeds[image_index[t]] : weight[input_ids[t]]; rows whose
// index is out of range are written as zeros (the device never reads out of bounds).
struct EmbedParams {
  void* out;                   // [T, H], contiguous
  const int64_t* input_ids;    // [T]
  const void* weight;          // [V, H], contiguous
  const int64_t* image_index;  // [T] or nullptr
  const void* image_embeds;    // [N, H], contiguous, or nullptr
  int64_t num_tokens;          // T
  int64_t hidden;              // H
  int64_t vocab;               // V
  int64_t num_image_rows;      // N (0 when image_embeds is nullptr)
  DType dtype;
};

}  // namespace epd
