// Python bindings of the attn_varlen family: paged prefill, paged decode, dense (vision) attention.
#pragma once
#include <torch/extension.h>

#include "epd_kernels/attn_varlen/decode_ops.h"
#include "epd_kernels/attn_varlen/ops.h"

namespace epd {

inline void bind_attn_varlen(pybind11::module& m) {
  namespace py = pybind11;
  m.def("paged_attention_prefill", &paged_attention_prefill,
        "Causal varlen attention over the paged KV arena; writes out [T, Hq, D]", py::arg("out"), py::arg("q"),
        py::arg("kv_arena"), py::arg("layer"), py::arg("cu_seqlens_q"), py::arg("seq_lens"), py::arg("block_tables"),
        py::arg("scale"), py::arg("max_seqlen_q"), py::arg("invariant") = false);
  m.def("paged_attention_decode", &paged_attention_decode,
        "One-query-per-sequence attention over the paged KV arena; writes out [B, Hq, D]", py::arg("out"),
        py::arg("q"), py::arg("kv_arena"), py::arg("layer"), py::arg("seq_lens"), py::arg("block_tables"),
        py::arg("scale"), py::arg("invariant") = false);
  m.def("attention_dense", &attention_dense, "Non-causal attention, q/k/v [B, N, H, D]; writes out [B, N, H, D]",
        py::arg("out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"));
}

}  // namespace epd
