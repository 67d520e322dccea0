// Host side of the sampling family: input checks, params, launch.
#include "kernels/sampling/ops.h"

#include "kernels/sampling/params.h"
#include "kernels/torch_utils.h"

namespace epd {

void launch_sample(const SampleParams& p, cudaStream_t stream);

namespace {

void check_per_row(const torch::Tensor& t, const char* name, torch::ScalarType dtype, const torch::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), name, " must be on ", logits.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0) && t.is_contiguous(), name, " must be a contiguous [",
              logits.size(0), "] tensor, got ", t.sizes());
}

}  // namespace

void sample(torch::Tensor& out, const torch::Tensor& logits, const torch::Tensor& temperature,
            const torch::Tensor& top_k, const torch::Tensor& top_p, const torch::Tensor& seeds,
            const torch::Tensor& steps) {
  EPD_CHECK_CUDA(logits);
  EPD_CHECK_DTYPE(logits, torch::kFloat);
  TORCH_CHECK(logits.dim() == 2, "logits must be [B, V], got ", logits.sizes());
  EPD_CHECK_LAST_DIM_CONTIGUOUS(logits);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0 && vocab < (int64_t{1} << 31), "logits has vocab size ", vocab, "; it must be in [1, 2^31)");
  TORCH_CHECK(batch < (int64_t{1} << 31), "logits has ", batch, " rows; the limit is 2^31 - 1");
  check_per_row(temperature, "temperature", torch::kFloat, logits);
  check_per_row(top_k, "top_k", torch::kLong, logits);
  check_per_row(top_p, "top_p", torch::kFloat, logits);
  check_per_row(seeds, "seeds", torch::kLong, logits);
  check_per_row(steps, "steps", torch::kLong, logits);
  check_per_row(out, "out", torch::kLong, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  SampleParams p{out.data_ptr<int64_t>(),     logits.data_ptr<float>(), temperature.data_ptr<float>(),
                 top_k.data_ptr<int64_t>(),   top_p.data_ptr<float>(),  seeds.data_ptr<int64_t>(),
                 steps.data_ptr<int64_t>(),   batch,                    vocab,
                 logits.stride(0)};
  launch_sample(p, current_stream(logits));
  EPD_CHECK_LAUNCH();
}

}  // namespace epd
