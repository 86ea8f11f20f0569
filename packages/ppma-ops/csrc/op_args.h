// Host-side argument contract of the CPU attention/scan ops, kept in one place so every op
// checks (and words its errors) the same way. Messages start with the op name; tests match on
// them. Only the op files include this (not the per-ISA kernels, not the CUDA sources, which
// have their own in cuda/cuda_common.cuh).
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace ppma {
namespace {

// Inputs are converted once to float32 (float64 stays float64) before the kernels run.
inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-op differences in what check_attention_args accepts (OR them together).
enum AttentionArgRule : unsigned {
  kAnyFloatingDtype = 1u,  // q may be any floating type (else float32, float64 or bfloat16)
  kCpuNonEmptyHead = 2u,   // q must also be on the CPU and have d > 0
};

// Shapes, dtypes and devices of (q, k, v, log_alpha, log_beta), naming the offending argument.
inline void check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& log_alpha,
                                 const at::Tensor& log_beta, unsigned rules = 0) {
  TORCH_CHECK(q.dim() == 5, op, ": q must have shape (B, heads, H, W, d), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have the shape of q ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.dim() == 5 && v.sizes().slice(0, 4) == q.sizes().slice(0, 4), op,
              ": v must have shape (B, heads, H, W, c) matching q's ", q.sizes().slice(0, 4),
              ", got ", v.sizes());
  const auto grid = q.sizes().slice(0, 4);
  TORCH_CHECK(log_alpha.sizes() == grid, op, ": log_alpha must have shape (B, heads, H, W) = ",
              grid, ", got ", log_alpha.sizes());
  TORCH_CHECK(log_beta.sizes() == grid, op, ": log_beta must have shape (B, heads, H, W) = ",
              grid, ", got ", log_beta.sizes());
  const auto dtype = q.scalar_type();
  if (rules & kAnyFloatingDtype) {
    TORCH_CHECK(at::isFloatingType(dtype), op, ": q must be a floating-point tensor, got ", dtype);
  } else {
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, op,
                ": q must be float32, float64 or bfloat16, got ", dtype);
  }
  if (rules & kCpuNonEmptyHead) {
    TORCH_CHECK(q.device().is_cpu(), op, ": the CPU kernel got q on ", q.device());
    TORCH_CHECK(q.size(4) > 0, op, ": q must have a non-empty head dimension d");
  }
  const std::pair<const char*, const at::Tensor*> args[] = {
      {"k", &k}, {"v", &v}, {"log_alpha", &log_alpha}, {"log_beta", &log_beta}};
  for (const auto& [name, t] : args) {
    TORCH_CHECK(t->scalar_type() == dtype, op, ": ", name, " has dtype ", t->scalar_type(),
                " but q has ", dtype);
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device(),
                " but q is on ", q.device());
  }
}

// Log decays must be NaN-free and <= 0 (decays in (0, 1]); the kernels assume it.
inline void check_log_decay_values(const char* op, const at::Tensor& log_alpha,
                                   const at::Tensor& log_beta) {
  const std::pair<const char*, const at::Tensor*> args[] = {{"log_alpha", &log_alpha},
                                                            {"log_beta", &log_beta}};
  for (const auto& [name, t] : args) {
    if (t->numel() == 0) continue;
    TORCH_CHECK(!at::isnan(*t).any().item<bool>(), op, ": ", name, " contains NaN");
    const double top = t->max().item<double>();
    TORCH_CHECK(top <= 0.0, op, ": ", name, " must be <= 0 (log of a decay in (0, 1]); max is ",
                top);
  }
}

// Cumsum tables (B·heads, H, W) in the accumulation dtype: Ca along each row, Cb along each
// column.
inline std::pair<at::Tensor, at::Tensor> cumsum_tables(const at::Tensor& log_alpha,
                                                       const at::Tensor& log_beta,
                                                       at::ScalarType acc) {
  const int64_t bh = log_alpha.size(0) * log_alpha.size(1);
  const int64_t H = log_alpha.size(2), W = log_alpha.size(3);
  return {at::cumsum(log_alpha.to(acc), -1).contiguous().view({bh, H, W}),
          at::cumsum(log_beta.to(acc), -2).contiguous().view({bh, H, W})};
}

}  // namespace
}  // namespace ppma
