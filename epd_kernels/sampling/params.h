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

// Penalized copy of logits [B, V] into out [B, V] (out may be logits: rows without a slot are then left
// untouched). Row b reads the state of slot slots[b]; slots outside [0, num_slots) mean no penalties.
struct PenaltyParams {
  float* out;                  // [B, V]
  const float* logits;         // [B, V]
  const int32_t* counts;       // [S, V] times each token was generated
  const uint8_t* prompt_mask;  // [S, V] token occurs in the prompt (bool or uint8)
  const int64_t* slots;        // [B]
  const float* presence;       // [B]
  const float* frequency;      // [B]
  const float* repetition;     // [B]
  int64_t batch;               // B
  int64_t vocab;               // V
  int64_t num_slots;           // S
  int64_t out_row_stride;      // elements between rows of out
  int64_t logits_row_stride;   // elements between rows of logits
  int64_t counts_row_stride;   // elements between rows of counts
  int64_t mask_row_stride;     // elements between rows of prompt_mask
};

// counts[slots[b], tokens[b]] += 1 where the slot is in [0, num_slots) and the token in [0, V).
struct RecordParams {
  int32_t* counts;            // [S, V]
  const int64_t* slots;       // [B]
  const int64_t* tokens;      // [B]
  int64_t batch;              // B
  int64_t vocab;              // V
  int64_t num_slots;          // S
  int64_t counts_row_stride;  // elements between rows of counts
};

}  // namespace epd
