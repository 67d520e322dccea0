// Host side of the sampling family: input checks, params, launch.
#include "epd_kernels/sampling/ops.h"

#include <ATen/MemoryOverlap.h>

#include "epd_kernels/sampling/params.h"
#include "epd_kernels/torch_utils.h"

namespace epd {

void launch_sample(const SampleParams& p, cudaStream_t stream);
void launch_apply_penalties(const PenaltyParams& p, cudaStream_t stream);
void launch_record_tokens(const RecordParams& p, cudaStream_t stream);

namespace {

void check_per_row(const torch::Tensor& t, const char* name, torch::ScalarType dtype, const torch::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device(), name, " must be on ", logits.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0) && t.is_contiguous(), name, " must be a contiguous [",
              logits.size(0), "] tensor, got ", t.sizes());
}

// counts [S, V] int32 on `device`, last dim contiguous, V = vocab.
void check_counts(const torch::Tensor& counts, int64_t vocab, const torch::Device& device) {
  TORCH_CHECK(counts.device() == device, "counts must be on ", device, ", got ", counts.device());
  TORCH_CHECK(counts.scalar_type() == torch::kInt, "counts must be Int, got ", counts.scalar_type());
  TORCH_CHECK(counts.dim() == 2 && counts.size(1) == vocab, "counts must be [S, ", vocab, "], got ", counts.sizes());
  EPD_CHECK_LAST_DIM_CONTIGUOUS(counts);
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

void apply_penalties(torch::Tensor& out, const torch::Tensor& logits, const torch::Tensor& counts,
                     const torch::Tensor& prompt_mask, const torch::Tensor& slots, const torch::Tensor& presence,
                     const torch::Tensor& frequency, const torch::Tensor& repetition) {
  EPD_CHECK_CUDA(logits);
  EPD_CHECK_DTYPE(logits, torch::kFloat);
  TORCH_CHECK(logits.dim() == 2, "logits must be [B, V], got ", logits.sizes());
  EPD_CHECK_LAST_DIM_CONTIGUOUS(logits);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab < (int64_t{1} << 31), "logits has vocab size ", vocab, "; the limit is 2^31 - 1");
  TORCH_CHECK(batch < (int64_t{1} << 31), "logits has ", batch, " rows; the limit is 2^31 - 1");
  TORCH_CHECK(out.device() == logits.device(), "out must be on ", logits.device(), ", got ", out.device());
  EPD_CHECK_DTYPE(out, torch::kFloat);
  TORCH_CHECK(out.sizes() == logits.sizes(), "out must be ", logits.sizes(), ", got ", out.sizes());
  EPD_CHECK_LAST_DIM_CONTIGUOUS(out);
  at::assert_no_partial_overlap(out, logits);  // out is logits itself (in place) or apart from it
  check_counts(counts, vocab, logits.device());
  TORCH_CHECK(prompt_mask.device() == logits.device(), "prompt_mask must be on ", logits.device(), ", got ",
              prompt_mask.device());
  TORCH_CHECK(prompt_mask.scalar_type() == torch::kBool || prompt_mask.scalar_type() == torch::kByte,
              "prompt_mask must be Bool or Byte, got ", prompt_mask.scalar_type());
  TORCH_CHECK(prompt_mask.sizes() == counts.sizes(), "prompt_mask must be counts' shape ", counts.sizes(), ", got ",
              prompt_mask.sizes());
  EPD_CHECK_LAST_DIM_CONTIGUOUS(prompt_mask);
  check_per_row(slots, "slots", torch::kLong, logits);
  check_per_row(presence, "presence", torch::kFloat, logits);
  check_per_row(frequency, "frequency", torch::kFloat, logits);
  check_per_row(repetition, "repetition", torch::kFloat, logits);
  TORCH_CHECK((vocab + 2047) / 2048 <= 65535, "logits has vocab size ", vocab, "; the limit is 65535 * 2048");
  const c10::cuda::CUDAGuard guard(logits.device());
  PenaltyParams p{out.data_ptr<float>(),
                  logits.data_ptr<float>(),
                  counts.data_ptr<int32_t>(),
                  static_cast<const uint8_t*>(prompt_mask.data_ptr()),
                  slots.data_ptr<int64_t>(),
                  presence.data_ptr<float>(),
                  frequency.data_ptr<float>(),
                  repetition.data_ptr<float>(),
                  batch,
                  vocab,
                  counts.size(0),
                  out.stride(0),
                  logits.stride(0),
                  counts.stride(0),
                  prompt_mask.stride(0)};
  launch_apply_penalties(p, current_stream(logits));
  EPD_CHECK_LAUNCH();
}

void record_tokens(torch::Tensor& counts, const torch::Tensor& slots, const torch::Tensor& tokens) {
  EPD_CHECK_CUDA(counts);
  TORCH_CHECK(counts.dim() == 2, "counts must be [S, V], got ", counts.sizes());
  check_counts(counts, counts.size(1), counts.device());
  TORCH_CHECK(slots.device() == counts.device(), "slots must be on ", counts.device(), ", got ", slots.device());
  TORCH_CHECK(slots.scalar_type() == torch::kLong, "slots must be Long, got ", slots.scalar_type());
  TORCH_CHECK(slots.dim() == 1 && slots.is_contiguous(), "slots must be a contiguous [B] tensor, got ",
              slots.sizes());
  TORCH_CHECK(slots.size(0) < (int64_t{1} << 31), "slots has ", slots.size(0), " rows; the limit is 2^31 - 1");
  TORCH_CHECK(tokens.device() == counts.device(), "tokens must be on ", counts.device(), ", got ", tokens.device());
  TORCH_CHECK(tokens.scalar_type() == torch::kLong, "tokens must be Long, got ", tokens.scalar_type());
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) == slots.size(0) && tokens.is_contiguous(),
              "tokens must be a contiguous [", slots.size(0), "] tensor, got ", tokens.sizes());
  const c10::cuda::CUDAGuard guard(counts.device());
  RecordParams p{counts.data_ptr<int32_t>(), slots.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(), slots.size(0),
                 counts.size(1), counts.size(0), counts.stride(0)};
  launch_record_tokens(p, current_stream(counts));
  EPD_CHECK_LAUNCH();
}

}  // namespace epd
