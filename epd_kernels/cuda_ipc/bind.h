#pragma once
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "epd_kernels/cuda_ipc/ops.h"

namespace epd {
inline void bind_cuda_ipc(pybind11::module& m) {
  m.def(
      "ipc_export",
      [](const torch::Tensor& t) {
        auto [handle, offset] = ipc_export(t);
        return pybind11::make_tuple(pybind11::bytes(handle), offset);
      },
      "(handle bytes, byte offset) of a CUDA tensor's allocation", pybind11::arg("tensor"));
  m.def(
      "ipc_open",
      [](pybind11::bytes handle, int64_t offset, const torch::Tensor& like, int64_t device) {
        return ipc_open(std::string(handle), offset, like, device);
      },
      "map a peer's allocation as a tensor shaped like `like`", pybind11::arg("handle"), pybind11::arg("offset"),
      pybind11::arg("like"), pybind11::arg("device"));
  m.def("copy_blocks", &copy_blocks, "dst[dst_ids] = src[src_ids] for block-major arenas, one copy per run",
        pybind11::arg("dst"), pybind11::arg("dst_ids"), pybind11::arg("src"), pybind11::arg("src_ids"));
}
}  // namespace epd
