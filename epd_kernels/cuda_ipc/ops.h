// CUDA IPC for arenas: export a tensor's allocation as a handle, open a peer's handle as a tensor.
#pragma once
#include <torch/all.h>

#include <string>
#include <tuple>
#include <vector>

namespace epd {

// (cudaIpcMemHandle_t bytes, byte offset of t's data within that allocation).
std::tuple<std::string, int64_t> ipc_export(const torch::Tensor& t);

// Map a peer's allocation (once per handle per process) and view it as a tensor shaped like
// `like` (sizes and dtype) on `device`: the opener's GPU, which reaches memory on another GPU
// over peer access (enabled lazily by the mapping). Closed when the tensor's storage dies.
torch::Tensor ipc_open(const std::string& handle, int64_t offset, const torch::Tensor& like, int64_t device);

// dst[dst_ids[i]] = src[src_ids[i]] for block-major arenas (dim 0 = block), on dst's device's
// current stream: one cudaMemcpyAsync per run of blocks consecutive on both sides (a peer copy
// when the arenas sit on different GPUs). Returns the number of copies issued.
int64_t copy_blocks(torch::Tensor& dst, const std::vector<int64_t>& dst_ids, const torch::Tensor& src,
                    const std::vector<int64_t>& src_ids);

}  // namespace epd
