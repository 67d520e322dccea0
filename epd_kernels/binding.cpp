// The extension module epd_kernels._epd_C: each family registers its ops from its bind.h.
#include <torch/extension.h>

#include "epd_kernels/attn_varlen/bind.h"
#include "epd_kernels/cuda_ipc/bind.h"
#include "epd_kernels/elementwise/bind.h"
#include "epd_kernels/gemv/bind.h"
#include "epd_kernels/image/bind.h"
#include "epd_kernels/rmsnorm_rope/bind.h"
#include "epd_kernels/sampling/bind.h"

PYBIND11_MODULE(_epd_C, m) {
  m.doc() = "EPD engine CUDA kernels";
  epd::bind_rmsnorm_rope(m);
  epd::bind_attn_varlen(m);
  epd::bind_elementwise(m);
  epd::bind_gemv(m);
  epd::bind_sampling(m);
  epd::bind_cuda_ipc(m);
  epd::bind_image(m);
}
