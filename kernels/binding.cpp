// The extension module kernels._epd_C: each family registers its ops from its bind.h.
#include <torch/extension.h>

#include <atomic>

#include "kernels/attn_varlen/bind.h"
#include "kernels/cuda_ipc/bind.h"
#include "kernels/elementwise/bind.h"
#include "kernels/gemv/bind.h"
#include "kernels/rmsnorm_rope/bind.h"
#include "kernels/sampling/bind.h"

namespace epd {
namespace {
std::atomic<bool> g_pdl{true};
}  // namespace
bool pdl_enabled() { return g_pdl.load(std::memory_order_relaxed); }
void set_pdl_enabled(bool on) { g_pdl.store(on, std::memory_order_relaxed); }
}  // namespace epd

PYBIND11_MODULE(_epd_C, m) {
  m.doc() = "EPD engine CUDA kernels";
  epd::bind_rmsnorm_rope(m);
  epd::bind_attn_varlen(m);
  epd::bind_elementwise(m);
  epd::bind_gemv(m);
  epd::bind_sampling(m);
  epd::bind_cuda_ipc(m);
  m.def("set_pdl", &epd::set_pdl_enabled, "Programmatic dependent launch for the decode-path kernels (default on)");
  m.def("pdl_enabled", &epd::pdl_enabled);
}
