// Host side of the image family: input checks, params, launch.
#include "epd_kernels/image/ops.h"

#include <limits>

#include "epd_kernels/image/params.h"
#include "epd_kernels/torch_utils.h"

namespace epd {

void launch_resample(const ResampleParams& p, bool horizontal, cudaStream_t stream);
void launch_crop_normalize(const CropNormalizeParams& p, cudaStream_t stream);

namespace {

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

void check_rgb(const torch::Tensor& t, const char* name) {
  EPD_CHECK_CUDA(t);
  TORCH_CHECK(t.scalar_type() == torch::kByte, name, " must be uint8, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(2) == 3, name, " must be [H, W, 3], got ", t.sizes());
  TORCH_CHECK(t.size(0) <= kIntMax && t.size(1) <= kIntMax, name, " is ", t.sizes(), "; sides must be < 2^31");
}

void resample(torch::Tensor& out, const torch::Tensor& src, const torch::Tensor& bounds, const torch::Tensor& coeffs,
              int64_t offset, bool horizontal) {
  check_rgb(src, "src");
  check_rgb(out, "out");
  EPD_CHECK_SAME_DEVICE(out, src);
  EPD_CHECK_SAME_DEVICE(bounds, src);
  EPD_CHECK_SAME_DEVICE(coeffs, src);
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  EPD_CHECK_DTYPE(bounds, torch::kInt);
  EPD_CHECK_DTYPE(coeffs, torch::kInt);
  TORCH_CHECK(bounds.dim() == 2 && bounds.size(1) == 2 && bounds.is_contiguous(),
              "bounds must be a contiguous [L, 2] tensor, got ", bounds.sizes());
  const int64_t len = bounds.size(0);
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(0) == len && coeffs.size(1) >= 1 && coeffs.is_contiguous(),
              "coeffs must be a contiguous [", len, ", K] tensor, got ", coeffs.sizes());
  TORCH_CHECK(coeffs.size(1) <= kIntMax, "coeffs has ", coeffs.size(1), " taps; the limit is 2^31 - 1");
  TORCH_CHECK(src.stride(0) >= 0 && src.stride(1) >= 0 && src.stride(2) >= 0, "src strides must be non-negative");
  TORCH_CHECK(offset >= 0 && offset <= kIntMax, "offset = ", offset, "; must be in [0, 2^31)");
  if (horizontal) {
    TORCH_CHECK(out.size(0) == src.size(0) && out.size(1) == len, "out must be [", src.size(0), ", ", len,
                ", 3] (src rows x bounds), got ", out.sizes());
  } else {
    TORCH_CHECK(out.size(0) == len && out.size(1) == src.size(1), "out must be [", len, ", ", src.size(1),
                ", 3] (bounds x src columns), got ", out.sizes());
  }
  if (out.numel() == 0) return;
  TORCH_CHECK(src.numel() > 0, "src is empty (", src.sizes(), ") but out is not");
  const c10::cuda::CUDAGuard guard(src.device());
  ResampleParams p{out.data_ptr<uint8_t>(),
                   src.data_ptr<uint8_t>(),
                   bounds.data_ptr<int32_t>(),
                   coeffs.data_ptr<int32_t>(),
                   src.stride(0),
                   src.stride(1),
                   src.stride(2),
                   static_cast<int32_t>(src.size(0)),
                   static_cast<int32_t>(src.size(1)),
                   static_cast<int32_t>(out.size(0)),
                   static_cast<int32_t>(out.size(1)),
                   static_cast<int32_t>(coeffs.size(1)),
                   static_cast<int32_t>(offset)};
  launch_resample(p, horizontal, current_stream(src));
  EPD_CHECK_LAUNCH();
}

}  // namespace

void resample_horizontal(torch::Tensor& out, const torch::Tensor& src, const torch::Tensor& bounds,
                         const torch::Tensor& coeffs, int64_t offset) {
  resample(out, src, bounds, coeffs, offset, true);
}

void resample_vertical(torch::Tensor& out, const torch::Tensor& src, const torch::Tensor& bounds,
                       const torch::Tensor& coeffs, int64_t offset) {
  resample(out, src, bounds, coeffs, offset, false);
}

void crop_normalize(torch::Tensor& out, const torch::Tensor& src, const torch::Tensor& meta,
                    const torch::Tensor& lut) {
  EPD_CHECK_CUDA(src);
  EPD_CHECK_SAME_DEVICE(out, src);
  EPD_CHECK_SAME_DEVICE(meta, src);
  EPD_CHECK_SAME_DEVICE(lut, src);
  TORCH_CHECK(src.scalar_type() == torch::kByte && src.dim() == 1 && src.is_contiguous(),
              "src must be a contiguous 1-D uint8 tensor, got ", src.scalar_type(), " ", src.sizes());
  EPD_CHECK_DTYPE(meta, torch::kLong);
  EPD_CHECK_DTYPE(lut, torch::kFloat);
  TORCH_CHECK(lut.dim() == 2 && lut.size(0) == 3 && lut.size(1) == 256 && lut.is_contiguous(),
              "lut must be a contiguous [3, 256] tensor, got ", lut.sizes());
  TORCH_CHECK(out.dim() == 4 && out.size(1) == 3 && out.size(2) == out.size(3) && out.is_contiguous(),
              "out must be a contiguous [N, 3, S, S] tensor, got ", out.sizes());
  const int64_t num = out.size(0), size = out.size(2);
  TORCH_CHECK(num <= 65535, "crop_normalize got ", num, " images; the limit per call is 65535");
  TORCH_CHECK(size <= 46340, "crop size ", size, " is too large (size^2 must fit in int32)");
  TORCH_CHECK(meta.dim() == 2 && meta.size(0) == num && meta.size(1) == 3 && meta.is_contiguous(),
              "meta must be a contiguous [", num, ", 3] tensor, got ", meta.sizes());
  DType dtype = DType::kFloat32;
  if (out.scalar_type() == torch::kFloat) {
    dtype = DType::kFloat32;
  } else if (out.scalar_type() == torch::kHalf) {
    dtype = DType::kFloat16;
  } else if (out.scalar_type() == torch::kBFloat16) {
    dtype = DType::kBFloat16;
  } else {
    TORCH_CHECK(false, "out must be float32, float16 or bfloat16, got ", out.scalar_type());
  }
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(src.device());
  CropNormalizeParams p{out.data_ptr(),
                        src.data_ptr<uint8_t>(),
                        meta.data_ptr<int64_t>(),
                        lut.data_ptr<float>(),
                        src.numel(),
                        static_cast<int32_t>(num),
                        static_cast<int32_t>(size),
                        dtype};
  launch_crop_normalize(p, current_stream(src));
  EPD_CHECK_LAUNCH();
}

}  // namespace epd
