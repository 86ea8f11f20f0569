// Host-side argument contract of the CPU attention/scan ops, kept in one place so every op
// checks (and words its errors) the same way. Messages start with the op name; tests match on
// them. Only the op files include this (not the per-ISA kernels, not the CUDA sources, which
// have their own in cuda/cuda_common.cuh).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
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

// Log decays must be NaN-free and <= 0 (decays in [0, 1]; −inf is a decay of 0, which blocks
// paths, docs/design.md §2.7); the kernels assume it.
inline void check_log_decay_values(const char* op, const at::Tensor& log_alpha,
                                   const at::Tensor& log_beta) {
  const std::pair<const char*, const at::Tensor*> args[] = {{"log_alpha", &log_alpha},
                                                            {"log_beta", &log_beta}};
  for (const auto& [name, t] : args) {
    if (t->numel() == 0) continue;
    TORCH_CHECK(!at::isnan(*t).any().item<bool>(), op, ": ", name, " contains NaN");
    const double top = t->max().item<double>();
    TORCH_CHECK(top <= 0.0, op, ": ", name, " must be <= 0 (log of a decay in [0, 1]); max is ",
                top);
  }
}

// The cumsum tables of docs/design.md §1, (B·heads, H, W) in the accumulation dtype: Ca along
// each row, Cb along each column, without each line's first log decay. When a log decay is
// −inf (§2.7) Ca and Cb hold the sums of the finite log decays only and Na, Nb count the −inf
// ones so far along the row / column: a path is open exactly where the counts at both ends of
// each leg agree. Without −inf, Na and Nb are undefined and the kernels run their plain mask.
struct DecayTables {
  at::Tensor ca, cb, na, nb;
  bool blocked() const { return na.defined(); }
};

// One head's (H, W) log decays a → the running sums of the finite ones along each row
// (along_rows) or column, each line's first log decay left out: it never enters the mask
// (§1), and summing it would offset the whole line (a huge one drowning the others'
// differences, a −inf one needing a count). counts: the running number of −inf log decays.
// Sets *blocked when a −inf was counted and *overflow when a line's sum left the dtype. Sums
// run in double and are rounded once per entry, as ATen's CPU cumsum does.
template <typename T>
void head_line_sums(const T* a, int64_t H, int64_t W, bool along_rows, T* sums, T* counts,
                    bool* blocked, bool* overflow) {
  const int64_t lines = along_rows ? H : W, steps = along_rows ? W : H;
  const int64_t line_stride = along_rows ? W : 1, step_stride = along_rows ? 1 : W;
  for (int64_t line = 0; line < lines; ++line) {
    double sum = 0;
    T count = 0, last = 0;
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t e = line * line_stride + t * step_stride;
      if (t > 0 && a[e] == -std::numeric_limits<T>::infinity()) {
        count += T(1);
      } else if (t > 0) {
        sum += static_cast<double>(a[e]);
      }
      last = sums[e] = static_cast<T>(sum);
      counts[e] = count;
    }
    *blocked = *blocked || count > T(0);
    *overflow = *overflow || std::isinf(last);
  }
}

// The tables of both decays, (B·heads, H, W) in the accumulation dtype; refuses sums that left
// the dtype's range (they would turn the masks into NaN), naming the argument and the limit.
inline DecayTables decay_tables(const char* op, const at::Tensor& log_alpha,
                                const at::Tensor& log_beta, at::ScalarType acc) {
  const int64_t bh = log_alpha.size(0) * log_alpha.size(1);
  const int64_t H = log_alpha.size(2), W = log_alpha.size(3);
  const at::Tensor la = log_alpha.to(acc).contiguous(), lb = log_beta.to(acc).contiguous();
  DecayTables t{at::empty({bh, H, W}, la.options()), at::empty({bh, H, W}, la.options()),
                at::empty({bh, H, W}, la.options()), at::empty({bh, H, W}, la.options())};
  bool blocked[2] = {false, false}, overflow[2] = {false, false};
  AT_DISPATCH_FLOATING_TYPES(acc, "ppma_decay_tables", [&] {
    // Sequential and small (O(H·W) per head): cheaper than the ATen ops it replaces.
    for (int64_t h = 0; h < bh; ++h) {
      const int64_t o = h * H * W;
      head_line_sums(la.const_data_ptr<scalar_t>() + o, H, W, true,
                     t.ca.mutable_data_ptr<scalar_t>() + o, t.na.mutable_data_ptr<scalar_t>() + o,
                     &blocked[0], &overflow[0]);
      head_line_sums(lb.const_data_ptr<scalar_t>() + o, H, W, false,
                     t.cb.mutable_data_ptr<scalar_t>() + o, t.nb.mutable_data_ptr<scalar_t>() + o,
                     &blocked[1], &overflow[1]);
    }
  });
  const char* names[2] = {"log_alpha", "log_beta"};
  const char* lines[2] = {"row", "column"};
  const double limit = acc == at::kDouble ? std::numeric_limits<double>::max()
                                          : std::numeric_limits<float>::max();
  for (int x = 0; x < 2; ++x) {
    TORCH_CHECK(!overflow[x], op, ": ", names[x], ": the finite log decays of a ", lines[x],
                " sum below ", -limit, ", the ", acc,
                " limit of the cumulative sums; use -inf for a decay of exactly 0");
  }
  if (!blocked[0] && !blocked[1]) t.na = t.nb = at::Tensor();  // the kernels' plain path
  return t;
}

// d/d log decay = 0 at a log decay of −inf (the decay e^a = 0 scales every path through it)
// and at a line's first log decay (it never enters the mask); the reverse cumsum of the table
// gradients leaves rounding residue there instead. dla, dlb: (…, H, W), fresh tensors.
inline void finish_decay_grads(const DecayTables& t, const at::Tensor& log_alpha,
                               const at::Tensor& log_beta, at::Tensor& dla, at::Tensor& dlb) {
  if (t.blocked()) {
    dla = dla.masked_fill(at::isneginf(log_alpha).reshape(dla.sizes()), 0);
    dlb = dlb.masked_fill(at::isneginf(log_beta).reshape(dlb.sizes()), 0);
  }
  if (dla.numel() == 0) return;
  dla.select(-1, 0).zero_();
  dlb.select(-2, 0).zero_();
}

}  // namespace
}  // namespace ppma
