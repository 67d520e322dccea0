// Python bindings of the small-batch GEMV family (registered into epd_kernels._epd_C by binding.cpp).
#pragma once
#include <torch/extension.h>

#include "epd_kernels/gemv/ops.h"

namespace epd {

inline void bind_gemv(pybind11::module& m) {
  namespace py = pybind11;
  m.def("linear", &linear,
        "out[M, N] (mutated) = x[M, K] @ w[N, K]^T for M <= 8, K % 8 == 0 (fp16 / bf16, contiguous, fp32 accumulation)",
        py::arg("out"), py::arg("x"), py::arg("w"));
  m.def("gate_up_silu", &gate_up_silu,
        "out[M, I] (mutated) = silu_and_mul(x @ w^T) for the fused gate | up weight w[2I, K]; same limits as linear",
        py::arg("out"), py::arg("x"), py::arg("w"));
}

}  // namespace epd
