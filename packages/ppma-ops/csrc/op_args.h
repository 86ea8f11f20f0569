// The argument contract of every op: shapes, dtypes and devices, checked once by the op's host
// code (csrc/<op>.cpp), which runs for CPU and CUDA tensors alike. Each error names the
// offending argument and starts with the op name; tests match on the messages. The fake kernels
// (ppma_ops/registration/) raise the same errors for meta tensors and under torch.compile, from
// the rules in ppma_ops/validation.py. Values (NaN, positive log decays, overflowing sums) are
// not checked here: ppma_ops/value_checks.py checks them once per public call, where that costs
// no device sync (docs/design.md §2.7).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <utility>

namespace ppma {

// Inputs are converted once to float32 (float64 stays float64) before the kernels run; every
// kernel computes in this dtype. ppma_ops.dtypes.accumulation_dtype is the Python twin.
inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// Per-op differences in what check_attention_args accepts (OR them together).
enum AttentionArgRule : unsigned {
  kHalfOnCpu = 1u,     // float16 inputs also on the CPU (the CUDA kernels always take them)
  kNonEmptyHead = 2u,  // q must have d > 0
};

// float32, float64 and bfloat16 everywhere; float16 where `half` allows it.
inline void check_input_dtype(const char* op, const char* name, const at::Tensor& t, bool half) {
  const auto dt = t.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 ||
                  (half && dt == at::kHalf);
  TORCH_CHECK(ok, op, ": ", name, " must be ",
              half ? "float32, float64, float16 or bfloat16" : "float32, float64 or bfloat16",
              ", got ", dt);
}

// Every tensor of `others` has the dtype and the device of `first`.
inline void check_same_kind(const char* op, const NamedTensor& first,
                            std::initializer_list<NamedTensor> others) {
  const auto& [first_name, f] = first;
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->scalar_type() == f->scalar_type(), op, ": ", name, " has dtype ",
                t->scalar_type(), " but ", first_name, " has ", f->scalar_type());
    TORCH_CHECK(t->device() == f->device(), op, ": ", name, " is on ", t->device(), " but ",
                first_name, " is on ", f->device());
  }
}

// log_alpha, log_beta: (B, heads, H, W) = `grid`.
inline void check_log_decay_shapes(const char* op, at::IntArrayRef grid,
                                   const at::Tensor& log_alpha, const at::Tensor& log_beta) {
  for (const auto& [name, t] : {NamedTensor{"log_alpha", &log_alpha}, {"log_beta", &log_beta}}) {
    TORCH_CHECK(t->sizes() == grid, op, ": ", name, " must have shape (B, heads, H, W) = ", grid,
                ", got ", t->sizes());
  }
}

// q, k (B, heads, H, W, d); v (B, heads, H, W, c); log_alpha, log_beta (B, heads, H, W).
inline void check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& log_alpha,
                                 const at::Tensor& log_beta, unsigned rules = 0) {
  TORCH_CHECK(q.dim() == 5, op, ": q must have shape (B, heads, H, W, d), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have the shape of q ", q.sizes(), ", got ",
              k.sizes());
  const auto grid = q.sizes().slice(0, 4);
  TORCH_CHECK(v.dim() == 5 && v.sizes().slice(0, 4) == grid, op,
              ": v must have shape (B, heads, H, W, c) matching q's ", grid, ", got ", v.sizes());
  check_log_decay_shapes(op, grid, log_alpha, log_beta);
  check_input_dtype(op, "q", q, (rules & kHalfOnCpu) || q.is_cuda());
  if (rules & kNonEmptyHead) {
    TORCH_CHECK(q.size(4) > 0, op, ": q must have a non-empty head dimension d");
  }
  check_same_kind(op, {"q", &q},
                  {{"k", &k}, {"v", &v}, {"log_alpha", &log_alpha}, {"log_beta", &log_beta}});
}

// x (B, heads, H, W, c); log_alpha, log_beta (B, heads, H, W).
inline void check_scan_args(const char* op, const at::Tensor& x, const at::Tensor& log_alpha,
                            const at::Tensor& log_beta) {
  TORCH_CHECK(x.dim() == 5, op, ": x must have shape (B, heads, H, W, c), got ", x.sizes());
  check_log_decay_shapes(op, x.sizes().slice(0, 4), log_alpha, log_beta);
  check_input_dtype(op, "x", x, /*half=*/true);
  check_same_kind(op, {"x", &x}, {{"log_alpha", &log_alpha}, {"log_beta", &log_beta}});
}

// A tensor handed back to a backward op: a gradient, or one that `origin` returned.
inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       at::IntArrayRef shape, at::ScalarType dtype, const at::Device& device,
                       const char* origin) {
  TORCH_CHECK(t.sizes() == shape && t.scalar_type() == dtype && t.device() == device, op, ": ",
              name, " must be the ", shape, " ", dtype, " tensor on ", device, " that ", origin,
              " gives, got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

// A gradient of an op's output: its shape and device (any dtype: it is converted).
inline void check_grad(const char* op, const char* name, const at::Tensor& grad,
                       const char* like_name, const at::Tensor& like) {
  TORCH_CHECK(grad.sizes() == like.sizes() && grad.device() == like.device(), op, ": ", name,
              " must have the shape of ", like_name, " ", like.sizes(), " on ", like.device(),
              ", got ", grad.sizes(), " on ", grad.device());
}

// Depthwise convolution: x (B, H, W, C) float32/float64; weight (C, 1, kh, kw), kh and kw odd,
// of x's dtype and device; bias (C) or undefined.
inline void check_depthwise_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape (B, H, W, C), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": the CPU kernel takes float32 or float64, got ", x.scalar_type());
  const int64_t C = x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1, op,
              ": weight must have shape (C, 1, kh, kw) with C = ", C, ", got ", weight.sizes());
  TORCH_CHECK(weight.size(2) % 2 == 1 && weight.size(3) % 2 == 1, op,
              ": the kernel size must be odd (\"same\" padding), got ", weight.size(2), "x",
              weight.size(3));
  check_same_kind(op, {"x", &x}, {{"weight", &weight}});
  if (!bias.defined()) return;
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, op, ": bias must have shape (C,) = (", C,
              ",), got ", bias.sizes());
  check_same_kind(op, {"x", &x}, {{"bias", &bias}});
}

}  // namespace ppma
