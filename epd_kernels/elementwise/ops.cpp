// Host side of the elementwise family: input checks, params, launch.
#include "epd_kernels/elementwise/ops.h"

#include "epd_kernels/elementwise/params.h"
#include "epd_kernels/torch_utils.h"

namespace epd {

void launch_silu_and_mul(const SiluAndMulParams& p, cudaStream_t stream);
void launch_gelu(const ActivationParams& p, cudaStream_t stream);
void launch_quick_gelu(const ActivationParams& p, cudaStream_t stream);
void launch_embed_tokens(const EmbedParams& p, cudaStream_t stream);

namespace {

DType float_dtype(const torch::Tensor& t, const char* name) {
  if (t.scalar_type() == torch::kFloat) return DType::kFloat32;
  if (t.scalar_type() == torch::kHalf) return DType::kFloat16;
  if (t.scalar_type() == torch::kBFloat16) return DType::kBFloat16;
  TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

ActivationParams activation_params(torch::Tensor& out, const torch::Tensor& x) {
  EPD_CHECK_CUDA(x);
  EPD_CHECK_SAME_DEVICE(out, x);
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  TORCH_CHECK(out.sizes() == x.sizes(), "out must have x's shape ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out must have x's dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  return ActivationParams{out.data_ptr(), x.data_ptr(), x.numel(), float_dtype(x, "x")};
}

}  // namespace

void silu_and_mul(torch::Tensor& out, const torch::Tensor& x) {
  EPD_CHECK_CUDA(x);
  EPD_CHECK_SAME_DEVICE(out, x);
  TORCH_CHECK(x.dim() == 2, "x must be [T, 2I], got ", x.sizes());
  TORCH_CHECK(x.size(1) % 2 == 0, "x.size(1) must be even (gate | up), got ", x.size(1));
  EPD_CHECK_LAST_DIM_CONTIGUOUS(x);
  EPD_CHECK_LAST_DIM_CONTIGUOUS(out);
  const int64_t inter = x.size(1) / 2;
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == inter, "out must be [", x.size(0), ", ",
              inter, "], got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out must have x's dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  SiluAndMulParams p{out.data_ptr(), x.data_ptr(), x.size(0), inter, x.stride(0), out.stride(0), float_dtype(x, "x")};
  launch_silu_and_mul(p, current_stream(x));
  EPD_CHECK_LAUNCH();
}

void gelu(torch::Tensor& out, const torch::Tensor& x) {
  const ActivationParams p = activation_params(out, x);
  const c10::cuda::CUDAGuard guard(x.device());
  launch_gelu(p, current_stream(x));
  EPD_CHECK_LAUNCH();
}

void quick_gelu(torch::Tensor& out, const torch::Tensor& x) {
  const ActivationParams p = activation_params(out, x);
  const c10::cuda::CUDAGuard guard(x.device());
  launch_quick_gelu(p, current_stream(x));
  EPD_CHECK_LAUNCH();
}

void embed_tokens(torch::Tensor& out, const torch::Tensor& input_ids, const torch::Tensor& weight,
                  const std::optional<torch::Tensor>& image_index, const std::optional<torch::Tensor>& image_embeds) {
  EPD_CHECK_CUDA(weight);
  EPD_CHECK_SAME_DEVICE(input_ids, weight);
  EPD_CHECK_SAME_DEVICE(out, weight);
  EPD_CHECK_DTYPE(input_ids, torch::kLong);
  TORCH_CHECK(input_ids.dim() == 1 && input_ids.is_contiguous(), "input_ids must be a contiguous [T] tensor, got ",
              input_ids.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous [V, H] tensor, got ",
              weight.sizes());
  const int64_t tokens = input_ids.size(0), hidden = weight.size(1);
  TORCH_CHECK(tokens < (int64_t{1} << 31), "input_ids has ", tokens, " tokens; the limit is 2^31 - 1");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == tokens && out.size(1) == hidden && out.is_contiguous(),
              "out must be a contiguous [", tokens, ", ", hidden, "] tensor, got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == weight.scalar_type(), "out must have weight's dtype ", weight.scalar_type(),
              ", got ", out.scalar_type());
  const bool images = image_index.has_value() && image_embeds.has_value();
  if (images) {
    const torch::Tensor& index = *image_index;
    const torch::Tensor& embeds = *image_embeds;
    EPD_CHECK_SAME_DEVICE(index, weight);
    EPD_CHECK_SAME_DEVICE(embeds, weight);
    EPD_CHECK_DTYPE(index, torch::kLong);
    TORCH_CHECK(index.dim() == 1 && index.size(0) == tokens && index.is_contiguous(),
                "image_index must be a contiguous [", tokens, "] tensor, got ", index.sizes());
    TORCH_CHECK(embeds.dim() == 2 && embeds.size(1) == hidden && embeds.is_contiguous(),
                "image_embeds must be a contiguous [N, ", hidden, "] tensor, got ", embeds.sizes());
    TORCH_CHECK(embeds.scalar_type() == weight.scalar_type(), "image_embeds must have weight's dtype ",
                weight.scalar_type(), ", got ", embeds.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(weight.device());
  EmbedParams p{out.data_ptr(),
                input_ids.data_ptr<int64_t>(),
                weight.data_ptr(),
                images ? image_index->data_ptr<int64_t>() : nullptr,
                images ? image_embeds->data_ptr() : nullptr,
                tokens,
                hidden,
                weight.size(0),
                images ? image_embeds->size(0) : 0,
                float_dtype(weight, "weight")};
  launch_embed_tokens(p, current_stream(weight));
  EPD_CHECK_LAUNCH();
}

}  // namespace epd
