// Criss-cross polyline attention (docs/design.md §2.4): schemas and CPU dispatch. The arithmetic lives
// in csrc/cpu/criss_cross_attention_kernel.cpp (one copy per ISA) and criss_cross_math.h.
//
//   ppma::criss_cross_attention(q, k, v, log_alpha, log_beta, scale) -> out
//       public op; CompositeImplicitAutograd over criss_cross_attention_fwd, so autograd and
//       torch.compile see the fwd/backward pair.
//   ppma::criss_cross_attention_fwd(...) -> (out, row_probs, rows_v, cols_v)
//       row_probs (B, heads, H, W, W): the row softmaxes Â_i; rows_v = R(V), cols_v = Cc(V)
//       (B, heads, H, W, c). All in the accumulation dtype (float32; float64 for float64
//       inputs), saved for the backward, which recomputes the column softmaxes B̂_l.
//   ppma::criss_cross_attention_backward(grad_out, q, k, v, log_alpha, log_beta, row_probs,
//       rows_v, cols_v, scale) -> (dq, dk, dv, dlog_alpha, dlog_beta)
//   ppma::criss_cross_attention_inference(q, k, v, log_alpha, log_beta, scale) -> out
//       the forward without the saved tensors (no autograd): what the public op runs when no
//       input needs a gradient.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu_dispatch.h"
#include "fresh_memory.h"
#include "criss_cross_attention_kernel.h"
#include "op_args.h"

namespace ppma {
namespace {

constexpr const char* kOp = "criss_cross_attention";
// Any floating dtype (fp16 included), checked on the CPU with d > 0.
constexpr unsigned kArgRules = kAnyFloatingDtype | kCpuNonEmptyHead;

// (B, heads, H, W, x) → contiguous (B·heads, H, W, x) in the accumulation dtype.
at::Tensor per_head(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous().view({t.size(0) * t.size(1), t.size(2), t.size(3), t.size(4)});
}

// The forward on the CPU: out, and with ``keep`` the saved tensors (row_probs, rows_v, cols_v;
// undefined otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_alpha,
    const at::Tensor& log_beta, double scale, bool keep) {
  check_attention_args(kOp, q, k, v, log_alpha, log_beta, kArgRules);
  check_log_decay_values(kOp, log_alpha, log_beta);
  const auto acc = accumulation_type(q.scalar_type());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3), c = v.size(4);
  const at::Tensor qh = per_head(q, acc), kh = per_head(k, acc), vh = per_head(v, acc);
  const DecayTables tables = decay_tables(kOp, log_alpha, log_beta, acc);
  const auto opts = qh.options();
  at::Tensor out = empty_for_write({B * heads, H, W, c}, opts);
  at::Tensor row_probs, rows_v, cols_v;
  if (keep) {
    row_probs = empty_for_write({B * heads, H, W, W}, opts);
    rows_v = empty_for_write({B * heads, H, W, c}, opts);
    cols_v = empty_for_write({B * heads, H, W, c}, opts);
  }
  if (out.numel() > 0) {
    PPMA_DISPATCH_CPU_ISA(criss_cross_forward, qh, kh, vh, tables.ca, tables.cb, tables.na,
                          tables.nb, scale, out, row_probs, rows_v, cols_v)
  }
  out = out.view({B, heads, H, W, c}).to(v.scalar_type());
  if (!keep) return {out, row_probs, rows_v, cols_v};
  return {out, row_probs.view({B, heads, H, W, W}), rows_v.view({B, heads, H, W, c}),
          cols_v.view({B, heads, H, W, c})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> criss_cross_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_alpha,
    const at::Tensor& log_beta, double scale) {
  return forward_cpu(q, k, v, log_alpha, log_beta, scale, /*keep=*/true);
}

at::Tensor criss_cross_inference_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& log_alpha, const at::Tensor& log_beta,
                                     double scale) {
  return std::get<0>(forward_cpu(q, k, v, log_alpha, log_beta, scale, /*keep=*/false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> criss_cross_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& log_alpha, const at::Tensor& log_beta, const at::Tensor& row_probs,
    const at::Tensor& rows_v, const at::Tensor& cols_v, double scale) {
  check_attention_args(kOp, q, k, v, log_alpha, log_beta, kArgRules);
  TORCH_CHECK(grad_out.sizes() == v.sizes(), "criss_cross_attention_backward: grad_out must ",
              "have the shape of v ", v.sizes(), ", got ", grad_out.sizes());
  const auto acc = accumulation_type(q.scalar_type());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t d = q.size(4), c = v.size(4);
  const std::tuple<const char*, const at::Tensor*, std::vector<int64_t>> saved[] = {
      {"row_probs", &row_probs, {B, heads, H, W, W}},
      {"rows_v", &rows_v, {B, heads, H, W, c}},
      {"cols_v", &cols_v, {B, heads, H, W, c}}};
  for (const auto& [name, t, shape] : saved) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef(shape) && t->scalar_type() == acc,
                "criss_cross_attention_backward: ", name, " must be the ", shape, " ", acc,
                " tensor returned by criss_cross_attention_fwd, got ", t->sizes(), " ",
                t->scalar_type());
  }
  const at::Tensor go = per_head(grad_out, acc);
  const DecayTables tables = decay_tables(kOp, log_alpha, log_beta, acc);
  const at::Tensor qh = per_head(q, acc), kh = per_head(k, acc), vh = per_head(v, acc);
  const at::Tensor rp = row_probs.contiguous().view({B * heads, H, W, W});
  const at::Tensor x1 = per_head(rows_v, acc), x2 = per_head(cols_v, acc);
  const auto opts = qh.options();
  // The kernel writes every element; without work (c = 0) all gradients are zero.
  const bool work = B * heads * H * W > 0 && d > 0 && c > 0;
  const auto alloc = [&](at::IntArrayRef shape) {
    return work ? empty_for_write(shape, opts) : at::zeros(shape, opts);
  };
  at::Tensor dq = alloc({B * heads, H, W, d}), dk = alloc({B * heads, H, W, d});
  at::Tensor dv = alloc({B * heads, H, W, c});
  at::Tensor dla = alloc({B * heads, H, W}), dlb = alloc({B * heads, H, W});
  if (work) {
    PPMA_DISPATCH_CPU_ISA(criss_cross_backward, go, qh, kh, vh, tables.ca, tables.cb,
                          tables.na, tables.nb, rp, x1, x2, scale, dq, dk, dv, dla, dlb)
  }
  finish_decay_grads(tables, log_alpha, log_beta, dla, dlb);
  const auto dt = q.scalar_type();
  return {dq.view({B, heads, H, W, d}).to(dt), dk.view({B, heads, H, W, d}).to(dt),
          dv.view({B, heads, H, W, c}).to(v.scalar_type()), dla.view({B, heads, H, W}).to(dt),
          dlb.view({B, heads, H, W}).to(dt)};
}

// The public op: the output of criss_cross_attention_fwd (whose autograd formula is registered
// in Python, ppma_ops/registration/criss_cross_attention.py) when a gradient may be asked for;
// otherwise criss_cross_attention_inference, which keeps nothing for a backward. This kernel
// runs above autograd, so grad mode and requires_grad are the caller's.
at::Tensor criss_cross_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& log_alpha, const at::Tensor& log_beta,
                                 double scale) {
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("ppma::criss_cross_attention_fwd", "")
                        .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, double)>();
  static auto inference = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("ppma::criss_cross_attention_inference", "")
                              .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, double)>();
  const bool needs_grad =
      at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() ||
                                     v.requires_grad() || log_alpha.requires_grad() ||
                                     log_beta.requires_grad());
  if (!needs_grad) return inference.call(q, k, v, log_alpha, log_beta, scale);
  return std::get<0>(fwd.call(q, k, v, log_alpha, log_beta, scale));
}

}  // namespace
}  // namespace ppma

TORCH_LIBRARY_FRAGMENT(ppma, m) {
  m.def(
      "criss_cross_attention(Tensor q, Tensor k, Tensor v, Tensor log_alpha, Tensor log_beta, "
      "float scale) -> Tensor");
  m.def(
      "criss_cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor log_alpha, "
      "Tensor log_beta, float scale) -> (Tensor out, Tensor row_probs, Tensor rows_v, "
      "Tensor cols_v)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "criss_cross_attention_inference(Tensor q, Tensor k, Tensor v, Tensor log_alpha, "
      "Tensor log_beta, float scale) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "criss_cross_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor log_alpha, Tensor log_beta, Tensor row_probs, Tensor rows_v, Tensor cols_v, "
      "float scale) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(ppma, CompositeImplicitAutograd, m) {
  m.impl("criss_cross_attention", &ppma::criss_cross_composite);
}

TORCH_LIBRARY_IMPL(ppma, CPU, m) {
  m.impl("criss_cross_attention_fwd", &ppma::criss_cross_fwd_cpu);
  m.impl("criss_cross_attention_backward", &ppma::criss_cross_backward_cpu);
  m.impl("criss_cross_attention_inference", &ppma::criss_cross_inference_cpu);
}
