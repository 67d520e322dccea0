// Parameter struct for the sampling family. POD only.
#pragma once
#include <cstdint>

namespace epd {

// One token per row of logits [B, V] (fp32, row stride logits_row_stride, unit column stride).
struct SampleParams {
  int64_t* out;               // [B] token ids
  const float* logits;        // [B, V]
  const float* temperature;   // [B]; <= 0 = greedy
  const int64_t* top_k;       // [B]; <= 0 = no limit
  const float* top_p;         // [B]; >= 1 = no limit
  const int64_t* seeds;       // [B]
  const int64_t* steps;       // [B]
  int64_t batch;              // B
  int64_t vocab;              // V
  int64_t logits_row_stride;  // elements between rows of logits
};

}  // namespace epd
