// Host side of the rmsnorm_rope family: input checks, params, launch.
#include "epd_kernels/torch_utils.h"
#include "epd_kernels/rmsnorm_rope/ops.h"
#include "epd_kernels/rmsnorm_rope/params.h"

namespace epd {
namespace {

// torch's Python name of a dtype, as users write it.
const char* dtype_name(c10::ScalarType t) {
  switch (t) {
    case torch::kBFloat16: return "bfloat16";
    case torch::kHalf: return "float16";
    case torch::kFloat: return "float32";
    case torch::kInt: return "int32";
    case torch::kLong: return "int64";
    default: return c10::toString(t);
  }
}

// t is a CUDA tensor on ref's device with dtype `dtype` (`like` names where that dtype comes from).
void check_on(const torch::Tensor& t, const char* name, const torch::Tensor& ref, c10::ScalarType dtype,
              const char* like = nullptr) {
  EPD_CHECK_CUDA(t);
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype_name(dtype), like ? " like " : "", like ? like : "",
              ", got ", dtype_name(t.scalar_type()));
}

// A [T, H] operand: shape, contiguous last dim, non-overlapping rows, same device and dtype as x.
void check_rows(const torch::Tensor& t, const char* name, const torch::Tensor& x) {
  check_on(t, name, x, x.scalar_type(), "x");
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [T, H], got shape ", t.sizes());
  TORCH_CHECK(t.size(0) == x.size(0) && t.size(1) == x.size(1), name, " must have shape ", x.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have a contiguous last dim, got stride ", t.stride(1));
  TORCH_CHECK(t.size(0) <= 1 || t.stride(0) >= t.size(1), name, " rows must not overlap: row stride ", t.stride(0),
              " < hidden ", t.size(1));
}

// A [H] parameter vector (weight, bias) matching x.
void check_vector(const torch::Tensor& t, const char* name, const torch::Tensor& x) {
  check_on(t, name, x, x.scalar_type(), "x");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), name, " must have shape [", x.size(1), "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// A single row may carry any stride; report one that keeps the 16-byte path eligible.
int64_t row_stride(const torch::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

void check_hidden(int64_t hidden, bool vectorized) {
  TORCH_CHECK(hidden >= 1, "hidden size must be >= 1, got ", hidden);
  TORCH_CHECK(hidden <= max_norm_hidden(vectorized), "hidden size ", hidden, " exceeds the limit ",
              max_norm_hidden(vectorized),
              vectorized ? "" : " for rows that are not 16-byte aligned or whose size is not a multiple of 8");
}

// x (fp16/bf16, [T, H]), out and, for the add_ variants, residual; returns x's dtype.
DType check_norm_io(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight,
                    const torch::Tensor* residual) {
  EPD_CHECK_CUDA(x);
  const DType dtype = half_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [T, H], got shape ", x.sizes());
  check_rows(x, "x", x);
  check_rows(out, "out", x);
  check_vector(weight, "weight", x);
  if (residual != nullptr) {
    check_rows(*residual, "residual", x);
    TORCH_CHECK(out.data_ptr() != residual->data_ptr(), "out must not alias residual");
  }
  return dtype;
}

// residual == nullptr: plain RMSNorm.
void run_rms_norm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight, double eps,
                  torch::Tensor* residual) {
  const DType dtype = check_norm_io(out, x, weight, residual);
  const c10::cuda::CUDAGuard guard(x.device());
  RmsNormParams p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.residual = residual != nullptr ? residual->data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.rows = x.size(0);
  p.hidden = static_cast<int>(x.size(1));
  p.out_row_stride = row_stride(out);
  p.x_row_stride = row_stride(x);
  p.residual_row_stride = residual != nullptr ? row_stride(*residual) : 0;
  p.eps = static_cast<float>(eps);
  p.dtype = dtype;
  check_hidden(x.size(1), norm_vectorized(p));
  if (residual != nullptr) {
    launch_add_rms_norm(p, current_stream(x));
  } else {
    launch_rms_norm(p, current_stream(x));
  }
  EPD_CHECK_LAUNCH();
}

// residual == nullptr: plain LayerNorm.
void run_layer_norm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                    double eps, torch::Tensor* residual) {
  const DType dtype = check_norm_io(out, x, weight, residual);
  check_vector(bias, "bias", x);
  const c10::cuda::CUDAGuard guard(x.device());
  LayerNormParams p{};
  p.out = out.data_ptr();
  p.x = x.data_ptr();
  p.residual = residual != nullptr ? residual->data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.bias = bias.data_ptr();
  p.rows = x.size(0);
  p.hidden = static_cast<int>(x.size(1));
  p.out_row_stride = row_stride(out);
  p.x_row_stride = row_stride(x);
  p.residual_row_stride = residual != nullptr ? row_stride(*residual) : 0;
  p.eps = static_cast<float>(eps);
  p.dtype = dtype;
  check_hidden(x.size(1), norm_vectorized(p));
  if (residual != nullptr) {
    launch_add_layer_norm(p, current_stream(x));
  } else {
    launch_layer_norm(p, current_stream(x));
  }
  EPD_CHECK_LAUNCH();
}

}  // namespace

void rms_norm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  run_rms_norm(out, x, weight, eps, nullptr);
}

void add_rms_norm(torch::Tensor& out, torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& weight,
                  double eps) {
  run_rms_norm(out, x, weight, eps, &residual);
}

void layer_norm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                double eps) {
  run_layer_norm(out, x, weight, bias, eps, nullptr);
}

void add_layer_norm(torch::Tensor& out, torch::Tensor& residual, const torch::Tensor& x, const torch::Tensor& weight,
                    const torch::Tensor& bias, double eps) {
  run_layer_norm(out, x, weight, bias, eps, &residual);
}

namespace {

// q/k/v [T, heads, D]: heads contiguous (stride D, 1), rows 16-byte aligned.
void check_heads(const torch::Tensor& t, const char* name, const torch::Tensor& q, int64_t tokens, int64_t head_dim) {
  check_on(t, name, q, q.scalar_type(), "q");
  TORCH_CHECK(t.dim() == 3 && t.size(0) == tokens && t.size(2) == head_dim, name, " must be [", tokens, ", heads, ",
              head_dim, "], got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1 && (t.size(1) <= 1 || t.stride(1) == head_dim), name,
              " must have contiguous heads (strides [row, ", head_dim, ", 1]), got strides ", t.strides());
  TORCH_CHECK(tokens <= 1 || t.stride(0) % 8 == 0, name, " row stride must be a multiple of 8 elements, got ",
              t.stride(0));
  TORCH_CHECK(aligned16(t.data_ptr()), name, " must be 16-byte aligned");
}

void check_index(const torch::Tensor& t, const char* name, const torch::Tensor& q, int64_t tokens) {
  check_on(t, name, q, torch::kInt64);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == tokens, name, " must have shape [", tokens, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

void rope_and_cache_write(torch::Tensor& q_rot, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          const torch::Tensor& positions, const torch::Tensor& cos_sin, torch::Tensor& kv_arena,
                          int64_t layer, const torch::Tensor& slot_mapping) {
  EPD_CHECK_CUDA(q);
  TORCH_CHECK(q.dim() == 3, "q must be 3-D [T, Hq, D], got shape ", q.sizes());
  const int64_t tokens = q.size(0), num_q_heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128,
              "head_dim must be 64, 80, 96 or 128, got ", head_dim);
  const DType dtype = half_dtype(q, "q");
  check_heads(q, "q", q, tokens, head_dim);
  check_heads(k, "k", q, tokens, head_dim);
  check_heads(v, "v", q, tokens, head_dim);
  const int64_t num_kv_heads = k.size(1);
  TORCH_CHECK(v.size(1) == num_kv_heads, "v must have ", num_kv_heads, " heads like k, got ", v.size(1));
  TORCH_CHECK(num_kv_heads >= 1 && num_q_heads % num_kv_heads == 0, "q heads (", num_q_heads,
              ") must be a multiple of kv heads (", num_kv_heads, ")");
  check_heads(q_rot, "q_rot", q, tokens, head_dim);
  TORCH_CHECK(q_rot.sizes() == q.sizes() && q_rot.is_contiguous(), "q_rot must be contiguous with shape ", q.sizes());
  check_index(positions, "positions", q, tokens);
  check_index(slot_mapping, "slot_mapping", q, tokens);
  check_on(cos_sin, "cos_sin", q, torch::kFloat32);
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.size(1) == head_dim, "cos_sin must be [max_positions, ", head_dim,
              "], got ", cos_sin.sizes());
  TORCH_CHECK(cos_sin.is_contiguous() && aligned16(cos_sin.data_ptr()), "cos_sin must be contiguous, 16-byte aligned");
  check_on(kv_arena, "kv_arena", q, q.scalar_type(), "q");
  TORCH_CHECK(kv_arena.dim() == 6 && kv_arena.size(2) == 2 && kv_arena.size(4) == num_kv_heads &&
                  kv_arena.size(5) == head_dim,
              "kv_arena must be [num_blocks, num_layers, 2, block_size, ", num_kv_heads, ", ", head_dim, "], got ",
              kv_arena.sizes());
  TORCH_CHECK(kv_arena.is_contiguous() && aligned16(kv_arena.data_ptr()),
              "kv_arena must be contiguous, 16-byte aligned");
  TORCH_CHECK(layer >= 0 && layer < kv_arena.size(1), "layer must be in [0, ", kv_arena.size(1), "), got ", layer);
  TORCH_CHECK(kv_arena.size(3) >= 1, "kv_arena block_size must be >= 1");

  const c10::cuda::CUDAGuard guard(q.device());
  RopeCacheParams p{};
  p.q_rot = q_rot.data_ptr();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.positions = positions.data_ptr<int64_t>();
  p.cos_sin = cos_sin.data_ptr<float>();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.kv_arena = kv_arena.data_ptr();
  p.num_tokens = tokens;
  p.num_q_heads = static_cast<int>(num_q_heads);
  p.num_kv_heads = static_cast<int>(num_kv_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.q_row_stride = q.stride(0);
  p.k_row_stride = k.stride(0);
  p.v_row_stride = v.stride(0);
  p.arena_block_stride = kv_arena.stride(0);
  p.arena_layer_stride = kv_arena.stride(1);
  p.arena_kv_stride = kv_arena.stride(2);
  p.arena_slot_stride = kv_arena.stride(3);
  p.layer = static_cast<int>(layer);
  p.block_size = static_cast<int>(kv_arena.size(3));
  p.dtype = dtype;
  launch_rope_and_cache_write(p, current_stream(q));
  EPD_CHECK_LAUNCH();
}

}  // namespace epd
