// Host-side helpers shared by every family's ops.cpp: input checks and dtype mapping.
#pragma once
#include <torch/all.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "epd_kernels/common.cuh"

#define EPD_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define EPD_CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must be " #dt ", got ", (x).scalar_type())
#define EPD_CHECK_LAST_DIM_CONTIGUOUS(x) TORCH_CHECK((x).stride(-1) == 1, #x " must have a contiguous last dim")
#define EPD_CHECK_SAME_DEVICE(x, y) TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on one device")

namespace epd {

inline DType half_dtype(const torch::Tensor& t, const char* name) {
  if (t.scalar_type() == torch::kHalf) return DType::kFloat16;
  if (t.scalar_type() == torch::kBFloat16) return DType::kBFloat16;
  TORCH_CHECK(false, name, " must be float16 or bfloat16, got ", t.scalar_type());
}

inline cudaStream_t current_stream(const torch::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

}  // namespace epd

// After a launch: surface launch errors at the call that caused them.
#define EPD_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
