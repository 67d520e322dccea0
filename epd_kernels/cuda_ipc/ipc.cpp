// CUDA IPC handles for the KV / MM arenas (see ipc/arena.py).
#include <ATen/cuda/PeerToPeerAccess.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "epd_kernels/cuda_ipc/ops.h"
#include "epd_kernels/torch_utils.h"

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

int64_t copy_blocks(torch::Tensor& dst, const std::vector<int64_t>& dst_ids, const torch::Tensor& src,
                    const std::vector<int64_t>& src_ids) {
  EPD_CHECK_CUDA(dst);
  EPD_CHECK_CUDA(src);
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous(), "copy_blocks: arenas must be contiguous");
  TORCH_CHECK(dst.dim() >= 1 && dst.sizes().slice(1) == src.sizes().slice(1) && dst.dtype() == src.dtype(),
              "copy_blocks: arenas' block shapes or dtypes differ");
  TORCH_CHECK(dst_ids.size() == src_ids.size(), "copy_blocks: ", src_ids.size(), " source blocks but ",
              dst_ids.size(), " destination blocks");
  const int64_t n_dst = dst.size(0), n_src = src.size(0);
  for (size_t i = 0; i < dst_ids.size(); ++i) {
    TORCH_CHECK(dst_ids[i] >= 0 && dst_ids[i] < n_dst, "copy_blocks: destination block ", dst_ids[i],
                " outside the arena's ", n_dst, " blocks");
    TORCH_CHECK(src_ids[i] >= 0 && src_ids[i] < n_src, "copy_blocks: source block ", src_ids[i],
                " outside the arena's ", n_src, " blocks");
  }
  const size_t block_bytes = dst.numel() / std::max<int64_t>(n_dst, 1) * dst.element_size();
  if (src.device() != dst.device()) {  // the copy runs in dst's context and reads src's memory
    TORCH_CHECK(at::cuda::get_p2p_access(dst.device().index(), src.device().index()),
                "copy_blocks: no peer access from ", dst.device(), " to ", src.device());
  }
  c10::cuda::CUDAGuard guard(dst.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dst.device().index()).stream();
  auto* d = static_cast<char*>(dst.data_ptr());
  const auto* s = static_cast<const char*>(src.data_ptr());
  int64_t copies = 0;
  for (size_t i = 0; i < dst_ids.size();) {
    size_t j = i + 1;  // extend the run while both sides stay consecutive
    while (j < dst_ids.size() && dst_ids[j] == dst_ids[j - 1] + 1 && src_ids[j] == src_ids[j - 1] + 1) ++j;
    C10_CUDA_CHECK(cudaMemcpyAsync(d + dst_ids[i] * block_bytes, s + src_ids[i] * block_bytes,
                                   (j - i) * block_bytes, cudaMemcpyDefault, stream));
    ++copies;
    i = j;
  }
  return copies;
}

}  // namespace epd
