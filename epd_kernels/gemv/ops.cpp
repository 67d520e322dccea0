// Host side of the small-batch GEMV family: input checks, params, launch.
#include "epd_kernels/gemv/ops.h"

#include "epd_kernels/gemv/params.h"
#include "epd_kernels/torch_utils.h"

namespace epd {

void launch_linear(const GemvParams& p, cudaStream_t stream);
void launch_gate_up_silu(const GemvParams& p, cudaStream_t stream);

namespace {

bool aligned16(const torch::Tensor& t) { return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0; }

// Checks shared by both ops; out_cols is the expected out.size(1) given w's rows.
GemvParams gemv_params(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& w, int64_t out_cols) {
  EPD_CHECK_CUDA(x);
  EPD_CHECK_SAME_DEVICE(w, x);
  EPD_CHECK_SAME_DEVICE(out, x);
  TORCH_CHECK(x.dim() == 2, "x must be [M, K], got ", x.sizes());
  TORCH_CHECK(w.dim() == 2, "w must be [N, K], got ", w.sizes());
  const int64_t m = x.size(0), k = x.size(1), rows = w.size(0);
  TORCH_CHECK(m <= kGemvMaxRows, "x has ", m, " rows; the limit is ", kGemvMaxRows, " (use torch for more)");
  TORCH_CHECK(w.size(1) == k, "w must have x's K = ", k, " columns, got ", w.sizes());
  TORCH_CHECK(k % 8 == 0, "K (x.size(1)) must be a multiple of 8, got ", k);
  TORCH_CHECK(k <= (int64_t{1} << 30), "K (x.size(1)) is ", k, "; the limit is 2^30");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  TORCH_CHECK(aligned16(x), "x must be 16-byte aligned");
  TORCH_CHECK(aligned16(w), "w must be 16-byte aligned");
  const DType dtype = half_dtype(x, "x");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "w must have x's dtype ", x.scalar_type(), ", got ",
              w.scalar_type());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out must have x's dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == out_cols && out.is_contiguous(),
              "out must be a contiguous [", m, ", ", out_cols, "] tensor, got ", out.sizes());
  return GemvParams{out.data_ptr(), x.data_ptr(), w.data_ptr(), static_cast<int>(m), rows, k, dtype};
}

}  // namespace

void linear(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& w) {
  const GemvParams p = gemv_params(out, x, w, w.dim() == 2 ? w.size(0) : -1);
  const c10::cuda::CUDAGuard guard(x.device());
  launch_linear(p, current_stream(x));
  EPD_CHECK_LAUNCH();
}

void gate_up_silu(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) % 2 == 0, "w must be [2I, K] (gate | up), got ", w.sizes());
  const GemvParams p = gemv_params(out, x, w, w.size(0) / 2);
  const c10::cuda::CUDAGuard guard(x.device());
  launch_gate_up_silu(p, current_stream(x));
  EPD_CHECK_LAUNCH();
}

}  // namespace epd
