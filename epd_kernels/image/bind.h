// Python bindings of the image family (registered into epd_kernels._epd_C by binding.cpp).
#pragma once
#include <torch/extension.h>

#include "epd_kernels/image/ops.h"

namespace epd {

inline void bind_image(pybind11::module& m) {
  namespace py = pybind11;
  m.def("resample_horizontal", &resample_horizontal,
        "out[H, L, 3] uint8 (mutated) = Pillow's 8-bit horizontal resample pass of src[H, W, 3] uint8",
        py::arg("out"), py::arg("src"), py::arg("bounds"), py::arg("coeffs"), py::arg("offset") = 0);
  m.def("resample_vertical", &resample_vertical,
        "out[L, W, 3] uint8 (mutated) = Pillow's 8-bit vertical resample pass of src[H, W, 3] uint8",
        py::arg("out"), py::arg("src"), py::arg("bounds"), py::arg("coeffs"), py::arg("offset") = 0);
  m.def("crop_normalize", &crop_normalize,
        "out[N, 3, S, S] (mutated) = lut[c][center crop (zero pad) of image n], images packed in flat uint8 src",
        py::arg("out"), py::arg("src"), py::arg("meta"), py::arg("lut"));
}

}  // namespace epd
