// CUDA IPC handles for the KV / MM arenas (see ipc/arena.py).
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime.h>

#include <cstring>

#include "kernels/cuda_ipc/ops.h"
#include "kernels/torch_utils.h"

namespace epd {

std::tuple<std::string, int64_t> ipc_export(const torch::Tensor& t) {
  EPD_CHECK_CUDA(t);
  TORCH_CHECK(t.is_contiguous(), "ipc_export: the arena must be contiguous");
  c10::cuda::CUDAGuard guard(t.device());
  size_t size = 0;
  // The caching allocator hands out pieces of larger cudaMalloc segments: a handle names the
  // segment, so the offset of our data inside it travels with the handle.
  void* base = c10::cuda::CUDACachingAllocator::getBaseAllocation(t.data_ptr(), &size);
  cudaIpcMemHandle_t handle;
  C10_CUDA_CHECK(cudaIpcGetMemHandle(&handle, base));
  std::string bytes(reinterpret_cast<const char*>(&handle), sizeof(handle));
  return {bytes, static_cast<const char*>(t.data_ptr()) - static_cast<const char*>(base)};
}

torch::Tensor ipc_open(const std::string& handle, int64_t offset, const torch::Tensor& like, int64_t device) {
  TORCH_CHECK(handle.size() == sizeof(cudaIpcMemHandle_t), "ipc_open: handle must be ", sizeof(cudaIpcMemHandle_t),
              " bytes, got ", handle.size());
  TORCH_CHECK(offset >= 0, "ipc_open: offset must be >= 0, got ", offset);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  void* base = nullptr;
  C10_CUDA_CHECK(cudaIpcOpenMemHandle(&base, h, cudaIpcMemLazyEnablePeerAccess));
  auto options = torch::TensorOptions().dtype(like.dtype()).device(torch::kCUDA, device);
  return torch::from_blob(
      static_cast<char*>(base) + offset, like.sizes(), [base](void*) { cudaIpcCloseMemHandle(base); }, options);
}

}  // namespace epd
