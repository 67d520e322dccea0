// CUDA IPC for arenas: export a tensor's allocation as a handle, open a peer's handle as a tensor.
#pragma once
#include <torch/all.h>

#include <string>
#include <tuple>

namespace epd {

// (cudaIpcMemHandle_t bytes, byte offset of t's data within that allocation).
std::tuple<std::string, int64_t> ipc_export(const torch::Tensor& t);

// Map a peer's allocation (once per handle per process) and view it as a tensor shaped like
// `like` (sizes and dtype) on `device`. The mapping is closed when the tensor's storage dies.
torch::Tensor ipc_open(const std::string& handle, int64_t offset, const torch::Tensor& like, int64_t device);

}  // namespace epd
