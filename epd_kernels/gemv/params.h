// Parameter struct for the small-batch GEMV family (decode GEMMs, M <= 8 rows of x). POD only.
#pragma once
#include <cstdint>

#include "epd_kernels/common.cuh"

namespace epd {

// Rows of x the kernels take (one m16n8k16 MMA tile of tokens); the Python wrapper falls back above it.
constexpr int kGemvMaxRows = 8;

// linear:       out [M, N] = x [M, K] @ w [N, K]^T                      (rows = N)
// gate_up_silu: out [M, I] = silu_and_mul(x @ w^T), w [2I, K] = gate | up (rows = 2I)
// All contiguous; x and w 16-byte aligned; K % 8 == 0; fp32 accumulation, fp16 or bf16 storage.
struct GemvParams {
  void* out;
  const void* x;
  const void* w;
  int m;         // M, 0..kGemvMaxRows
  int64_t rows;  // rows of w: N (linear) or 2I (gate_up_silu)
  int64_t k;     // K, a multiple of 8, <= 2^30
  DType dtype;
};

}  // namespace epd
