// Python bindings of the rmsnorm_rope family (registered into epd_kernels._epd_C by binding.cpp).
#pragma once
#include <torch/extension.h>

#include "epd_kernels/rmsnorm_rope/ops.h"

namespace epd {

inline void bind_rmsnorm_rope(pybind11::module& m) {
  namespace py = pybind11;
  m.def("rms_norm", &rms_norm, "out[T,H] (mutated) = RMSNorm(x[T,H]) * weight[H]", py::arg("out"), py::arg("x"),
        py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm", &add_rms_norm,
        "residual[T,H] (mutated) = x + residual; out[T,H] (mutated) = RMSNorm(residual) * weight[H]", py::arg("out"),
        py::arg("residual"), py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("layer_norm", &layer_norm, "out[T,H] (mutated) = LayerNorm(x[T,H]) * weight[H] + bias[H]", py::arg("out"),
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("add_layer_norm", &add_layer_norm,
        "residual[T,H] (mutated) = x + residual; out[T,H] (mutated) = LayerNorm(residual) * weight[H] + bias[H]",
        py::arg("out"), py::arg("residual"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("rope_and_cache_write", &rope_and_cache_write,
        "q_rot[T,Hq,D] (mutated) = RoPE(q); kv_arena (mutated) gets RoPE(k) and v at slot_mapping",
        py::arg("q_rot"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("positions"), py::arg("cos_sin"),
        py::arg("kv_arena"), py::arg("layer"), py::arg("slot_mapping"));
}

}  // namespace epd
