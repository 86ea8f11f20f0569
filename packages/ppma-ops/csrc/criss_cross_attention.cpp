// Criss-cross polyline attention (DESIGN §2.4): schemas and CPU dispatch. The arithmetic lives
// in csrc/cpu/criss_cross_attention_kernel.cpp (one copy per ISA) and criss_cross_math.h.
//
//   ppma::criss_cross_attention(q, k, v, log_alpha, log_beta, scale) -> out
//       public op; CompositeImplicitAutograd over criss_cross_attention_fwd, so autograd and
//       torch.compile see the fwd/backward pair.
//   ppma::criss_cross_attention_fwd(...) -> (out, row_probs, col_probs, rows_v, cols_v)
//       row_probs (B, heads, H, W, W): the row softmaxes Â_i; col_probs (B, heads, W, H, H):
//       the column softmaxes B̂_l; rows_v = R(V), cols_v = Cc(V) (B, heads, H, W, c). All in
//       the accumulation dtype (float32; float64 for float64 inputs), saved for the backward.
//   ppma::criss_cross_attention_backward(grad_out, q, k, v, log_alpha, log_beta, row_probs,
//       col_probs, rows_v, cols_v, scale) -> (dq, dk, dv, dlog_alpha, dlog_beta)
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "criss_cross_attention_kernel.h"

namespace ppma {
namespace {

constexpr const char* kOp = "criss_cross_attention";

at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Shapes, dtypes and devices, naming the offending argument.
void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& log_alpha, const at::Tensor& log_beta) {
  TORCH_CHECK(q.dim() == 5, kOp, ": q must have shape (B, heads, H, W, d), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), kOp, ": k must have the shape of q ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.dim() == 5 && v.sizes().slice(0, 4) == q.sizes().slice(0, 4), kOp,
              ": v must have shape (B, heads, H, W, c) matching q's ", q.sizes().slice(0, 4),
              ", got ", v.sizes());
  const auto grid = q.sizes().slice(0, 4);
  TORCH_CHECK(log_alpha.sizes() == grid, kOp, ": log_alpha must have shape (B, heads, H, W) = ",
              grid, ", got ", log_alpha.sizes());
  TORCH_CHECK(log_beta.sizes() == grid, kOp, ": log_beta must have shape (B, heads, H, W) = ",
              grid, ", got ", log_beta.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), kOp, ": q must be a floating-point tensor, got ", dtype);
  TORCH_CHECK(q.device().is_cpu(), kOp, ": the CPU kernel got q on ", q.device());
  TORCH_CHECK(q.size(4) > 0, kOp, ": q must have a non-empty head dimension d");
  const std::pair<const char*, const at::Tensor*> args[] = {
      {"k", &k}, {"v", &v}, {"log_alpha", &log_alpha}, {"log_beta", &log_beta}};
  for (const auto& [name, t] : args) {
    TORCH_CHECK(t->scalar_type() == dtype, kOp, ": ", name, " has dtype ", t->scalar_type(),
                " but q has ", dtype);
    TORCH_CHECK(t->device() == q.device(), kOp, ": ", name, " is on ", t->device(),
                " but q is on ", q.device());
  }
}

void check_log_decay_values(const at::Tensor& log_alpha, const at::Tensor& log_beta) {
  const std::pair<const char*, const at::Tensor*> args[] = {{"log_alpha", &log_alpha},
                                                            {"log_beta", &log_beta}};
  for (const auto& [name, t] : args) {
    if (t->numel() == 0) continue;
    TORCH_CHECK(!at::isnan(*t).any().item<bool>(), kOp, ": ", name, " contains NaN");
    const double top = t->max().item<double>();
    TORCH_CHECK(top <= 0.0, kOp, ": ", name, " must be <= 0 (log of a decay in (0, 1]); max is ",
                top);
  }
}

// (B, heads, H, W, x) → contiguous (B·heads, H, W, x) in the accumulation dtype.
at::Tensor per_head(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous().view({t.size(0) * t.size(1), t.size(2), t.size(3), t.size(4)});
}

#define PPMA_CRISS_CROSS_DISPATCH(FN, ...)       \
  switch (selected_cpu_isa()) {                  \
    case CpuIsa::Avx512:                         \
      PPMA_CALL_IF_BUILT_AVX512(FN, __VA_ARGS__) \
    case CpuIsa::Avx2:                           \
      PPMA_CALL_IF_BUILT_AVX2(FN, __VA_ARGS__)   \
    default:                                     \
      DEFAULT::FN(__VA_ARGS__);                  \
  }

#if defined(PPMA_BUILT_AVX512)
#define PPMA_CALL_IF_BUILT_AVX512(FN, ...) \
  AVX512::FN(__VA_ARGS__);                 \
  break;
#else
#define PPMA_CALL_IF_BUILT_AVX512(FN, ...) [[fallthrough]];
#endif
#if defined(PPMA_BUILT_AVX2)
#define PPMA_CALL_IF_BUILT_AVX2(FN, ...) \
  AVX2::FN(__VA_ARGS__);                 \
  break;
#else
#define PPMA_CALL_IF_BUILT_AVX2(FN, ...) [[fallthrough]];
#endif

// Cumsum tables (B·heads, H, W) in float32 or wider: Ca along each row, Cb along each column.
std::pair<at::Tensor, at::Tensor> cumsum_tables(const at::Tensor& log_alpha,
                                                const at::Tensor& log_beta, at::ScalarType acc) {
  const int64_t bh = log_alpha.size(0) * log_alpha.size(1);
  const int64_t H = log_alpha.size(2), W = log_alpha.size(3);
  return {at::cumsum(log_alpha.to(acc), -1).contiguous().view({bh, H, W}),
          at::cumsum(log_beta.to(acc), -2).contiguous().view({bh, H, W})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> criss_cross_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_alpha,
    const at::Tensor& log_beta, double scale) {
  check_args(q, k, v, log_alpha, log_beta);
  check_log_decay_values(log_alpha, log_beta);
  const auto acc = accumulation_type(q.scalar_type());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3), c = v.size(4);
  const at::Tensor qh = per_head(q, acc), kh = per_head(k, acc), vh = per_head(v, acc);
  const auto [ca, cb] = cumsum_tables(log_alpha, log_beta, acc);
  const auto opts = qh.options();
  at::Tensor out = at::empty({B * heads, H, W, c}, opts);
  at::Tensor row_probs = at::empty({B * heads, H, W, W}, opts);
  at::Tensor col_probs = at::empty({B * heads, W, H, H}, opts);
  at::Tensor rows_v = at::empty({B * heads, H, W, c}, opts);
  at::Tensor cols_v = at::empty({B * heads, H, W, c}, opts);
  if (out.numel() > 0) {
    PPMA_CRISS_CROSS_DISPATCH(criss_cross_forward, qh, kh, vh, ca, cb, scale, out, row_probs,
                              col_probs, rows_v, cols_v)
  }
  return {out.view({B, heads, H, W, c}).to(v.scalar_type()),
          row_probs.view({B, heads, H, W, W}), col_probs.view({B, heads, W, H, H}),
          rows_v.view({B, heads, H, W, c}), cols_v.view({B, heads, H, W, c})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> criss_cross_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& log_alpha, const at::Tensor& log_beta, const at::Tensor& row_probs, const at::Tensor& col_probs, const at::Tensor& rows_v,
    const at::Tensor& cols_v, double scale) {
  check_args(q, k, v, log_alpha, log_beta);
  TORCH_CHECK(grad_out.sizes() == v.sizes(), "criss_cross_attention_backward: grad_out must ",
              "have the shape of v ", v.sizes(), ", got ", grad_out.sizes());
  const auto acc = accumulation_type(q.scalar_type());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t d = q.size(4), c = v.size(4);
  const std::tuple<const char*, const at::Tensor*, std::vector<int64_t>> saved[] = {
      {"row_probs", &row_probs, {B, heads, H, W, W}},
      {"col_probs", &col_probs, {B, heads, W, H, H}},
      {"rows_v", &rows_v, {B, heads, H, W, c}},
      {"cols_v", &cols_v, {B, heads, H, W, c}}};
  for (const auto& [name, t, shape] : saved) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape) && t->scalar_type() == acc,
                "criss_cross_attention_backward: ", name, " must be the ", shape, " ", acc,
                " tensor returned by criss_cross_attention_fwd, got ", t->sizes(), " ",
                t->scalar_type());
  }
  const at::Tensor go = per_head(grad_out, acc);
  const auto [ca, cb] = cumsum_tables(log_alpha, log_beta, acc);
  const at::Tensor qh = per_head(q, acc), kh = per_head(k, acc), vh = per_head(v, acc);
  const at::Tensor rp = row_probs.contiguous().view({B * heads, H, W, W});
  const at::Tensor cp = col_probs.contiguous().view({B * heads, W, H, H});
  const at::Tensor x1 = per_head(rows_v, acc), x2 = per_head(cols_v, acc);
  const auto opts = qh.options();
  // The kernel writes every element; without work (c = 0) all gradients are zero.
  const bool work = B * heads * H * W > 0 && d > 0 && c > 0;
  const auto alloc = [&](at::IntArrayRef shape) {
    return work ? at::empty(shape, opts) : at::zeros(shape, opts);
  };
  at::Tensor dq = alloc({B * heads, H, W, d}), dk = alloc({B * heads, H, W, d});
  at::Tensor dv = alloc({B * heads, H, W, c});
  at::Tensor dla = alloc({B * heads, H, W}), dlb = alloc({B * heads, H, W});
  if (work) {
    PPMA_CRISS_CROSS_DISPATCH(criss_cross_backward, go, qh, kh, vh, ca, cb, rp, cp, x1, x2, scale, dq, dk,
                              dv, dla, dlb)
  }
  const auto dt = q.scalar_type();
  return {dq.view({B, heads, H, W, d}).to(dt), dk.view({B, heads, H, W, d}).to(dt),
          dv.view({B, heads, H, W, c}).to(v.scalar_type()), dla.view({B, heads, H, W}).to(dt),
          dlb.view({B, heads, H, W}).to(dt)};
}

// The public op: the output of criss_cross_attention_fwd (whose autograd formula is registered
// in Python, ppma_ops/registration/criss_cross_attention.py).
at::Tensor criss_cross_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& log_alpha, const at::Tensor& log_beta,
                                 double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ppma::criss_cross_attention_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                         at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, double)>();
  return std::get<0>(op.call(q, k, v, log_alpha, log_beta, scale));
}

}  // namespace
}  // namespace ppma

TORCH_LIBRARY_FRAGMENT(ppma, m) {
  m.def(
      "criss_cross_attention(Tensor q, Tensor k, Tensor v, Tensor log_alpha, Tensor log_beta, "
      "float scale) -> Tensor");
  m.def(
      "criss_cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor log_alpha, "
      "Tensor log_beta, float scale) -> (Tensor out, Tensor row_probs, Tensor col_probs, "
      "Tensor rows_v, Tensor cols_v)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "criss_cross_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor log_alpha, Tensor log_beta, Tensor row_probs, Tensor col_probs, Tensor rows_v, Tensor cols_v, float scale) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(ppma, CompositeImplicitAutograd, m) {
  m.impl("criss_cross_attention", &ppma::criss_cross_composite);
}

TORCH_LIBRARY_IMPL(ppma, CPU, m) {
  m.impl("criss_cross_attention_fwd", &ppma::criss_cross_fwd_cpu);
  m.impl("criss_cross_attention_backward", &ppma::criss_cross_backward_cpu);
}
