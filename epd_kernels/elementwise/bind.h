// Python bindings of the elementwise family (registered into epd_kernels._epd_C by binding.cpp).
#pragma once
#include <torch/extension.h>

#include "epd_kernels/elementwise/ops.h"

namespace epd {

inline void bind_elementwise(pybind11::module& m) {
  namespace py = pybind11;
  m.def("silu_and_mul", &silu_and_mul, "out[T, I] (mutated) = silu(x[:, :I]) * x[:, I:] for x [T, 2I]",
        py::arg("out"), py::arg("x"));
  m.def("gelu", &gelu, "out (mutated) = exact erf GELU of x (contiguous)", py::arg("out"), py::arg("x"));
  m.def("quick_gelu", &quick_gelu, "out (mutated) = x * sigmoid(1.702 x) (contiguous)", py::arg("out"),
        py::arg("x"));
  m.def("embed_tokens", &embed_tokens,
        "out[T, H] (mutated): image_embeds[image_index[t]] where image_index[t] >= 0, else weight[input_ids[t]]; "
        "out-of-range indices give zero rows",
        py::arg("out"), py::arg("input_ids"), py::arg("weight"), py::arg("image_index") = py::none(),
        py::arg("image_embeds") = py::none());
}

}  // namespace epd
