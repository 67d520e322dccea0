// Python bindings of the sampling family (registered into epd_kernels._epd_C by binding.cpp).
#pragma once
#include <torch/extension.h>

#include "epd_kernels/sampling/ops.h"

namespace epd {

inline void bind_sampling(pybind11::module& m) {
  namespace py = pybind11;
  m.def("sample", &sample,
        "out[B] int64 (mutated): one token per row of logits [B, V] fp32 (greedy where temperature <= 0; "
        "else top_k, top_p and an inverse-CDF draw with random_uniform(seed, step))",
        py::arg("out"), py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("seeds"), py::arg("steps"));
  m.def("apply_penalties", &apply_penalties,
        "out[B, V] fp32 (mutated; may be logits) = logits with presence / frequency / repetition penalties from "
        "the state of slot slots[b] (counts [S, V] int32, prompt_mask [S, V]); slots outside [0, S): unchanged",
        py::arg("out"), py::arg("logits"), py::arg("counts"), py::arg("prompt_mask"), py::arg("slots"),
        py::arg("presence"), py::arg("frequency"), py::arg("repetition"));
  m.def("record_tokens", &record_tokens,
        "counts[S, V] int32 (mutated): counts[slots[b], tokens[b]] += 1 where 0 <= slot < S and 0 <= token < V",
        py::arg("counts"), py::arg("slots"), py::arg("tokens"));
}

}  // namespace epd
