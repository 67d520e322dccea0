// Python bindings of the sampling family (registered into kernels._epd_C by binding.cpp).
#pragma once
#include <torch/extension.h>

#include "kernels/sampling/ops.h"

namespace epd {

inline void bind_sampling(pybind11::module& m) {
  namespace py = pybind11;
  m.def("sample", &sample,
        "out[B] int64 (mutated): one token per row of logits [B, V] fp32 (greedy where temperature <= 0; "
        "else top_k, top_p and an inverse-CDF draw with random_uniform(seed, step))",
        py::arg("out"), py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("seeds"), py::arg("steps"));
}

}  // namespace epd
