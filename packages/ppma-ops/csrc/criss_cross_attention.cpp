// Criss-cross polyline attention (docs/design.md §2.4): schemas and the host code, written once
// for CPU and CUDA tensors. The arithmetic lives in the kernels of
// criss_cross_attention_kernel.h.
//
//   ppma::criss_cross_attention(q, k, v, log_alpha, log_beta, scale) -> out
//       public op; CompositeImplicitAutograd over _criss_cross_attention_fwd, so autograd and
//       torch.compile see the fwd/bwd pair.
//   ppma::_criss_cross_attention_fwd(...) -> (out, row_probs, rows_v, cols_v)
//       row_probs (B, heads, H, W, W): the row softmaxes Â_i; rows_v = R(V), cols_v = Cc(V)
//       (B, heads, H, W, c). All in the accumulation dtype (float32; float64 for float64
//       inputs), saved for the backward, which recomputes the column softmaxes B̂_l.
//   ppma::_criss_cross_attention_bwd(grad_out, q, k, v, log_alpha, log_beta, row_probs,
//       rows_v, cols_v, scale) -> (dq, dk, dv, dlog_alpha, dlog_beta)
//   ppma::_criss_cross_attention_inference(q, k, v, log_alpha, log_beta, scale) -> out
//       the forward without the saved tensors (no autograd): what the public op runs when no
//       input needs a gradient.
// Autograd and the fake kernels: ppma_ops/registration/criss_cross_attention.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cpu_dispatch.h"
#include "criss_cross_attention_kernel.h"
#include "decay_tables.h"
#include "device_dispatch.h"
#include "fresh_memory.h"
#include "op_args.h"

namespace ppma {

void criss_cross_attention_fwd_kernel_cpu(const AttentionInputs& in, at::Tensor& out,
                                          const CrissCrossSaved& saved) {
  PPMA_DISPATCH_CPU_ISA(criss_cross_attention_fwd, in, out, saved)
}

void criss_cross_attention_bwd_kernel_cpu(const at::Tensor& grad_out, const AttentionInputs& in,
                                          const CrissCrossSaved& saved, CrissCrossGrads& grads) {
  PPMA_DISPATCH_CPU_ISA(criss_cross_attention_bwd, grad_out, in, saved, grads)
}

namespace {

constexpr const char* kFwd = "_criss_cross_attention_fwd";
constexpr const char* kBwd = "_criss_cross_attention_bwd";
constexpr const char* kInference = "_criss_cross_attention_inference";
// float16 is taken on the CPU too; d > 0.
constexpr unsigned kArgRules = kHalfOnCpu | kNonEmptyHead;

// (B, heads, H, W, x) → contiguous (B·heads, H, W, x) in the accumulation dtype.
at::Tensor per_head(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous().view({t.size(0) * t.size(1), t.size(2), t.size(3), t.size(4)});
}

AttentionInputs kernel_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& log_alpha, const at::Tensor& log_beta,
                              double scale) {
  const auto acc = accumulation_type(q.scalar_type());
  return {per_head(q, acc), per_head(k, acc), per_head(v, acc),
          decay_tables(log_alpha, log_beta, acc), scale};
}

// The forward: out, and with `keep` the saved tensors (row_probs, rows_v, cols_v; undefined
// otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& log_alpha, const at::Tensor& log_beta, double scale, bool keep) {
  check_attention_args(op, q, k, v, log_alpha, log_beta, kArgRules);
  const c10::OptionalDeviceGuard guard(q.device());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3), c = v.size(4);
  const int64_t BH = B * heads;
  const AttentionInputs in = kernel_inputs(q, k, v, log_alpha, log_beta, scale);
  const auto opts = in.q.options();
  at::Tensor out = empty_for_write({BH, H, W, c}, opts);
  CrissCrossSaved saved;
  if (keep) {
    saved = {empty_for_write({BH, H, W, W}, opts), empty_for_write({BH, H, W, c}, opts),
             empty_for_write({BH, H, W, c}, opts)};
  }
  if (out.numel() > 0) {
    PPMA_DISPATCH_DEVICE(q.device(), criss_cross_attention_fwd_kernel, in, out, saved);
  }
  out = out.view({B, heads, H, W, c}).to(v.scalar_type());
  if (!keep) return {out, at::Tensor(), at::Tensor(), at::Tensor()};
  return {out, saved.row_probs.view({B, heads, H, W, W}), saved.rows_v.view({B, heads, H, W, c}),
          saved.cols_v.view({B, heads, H, W, c})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> criss_cross_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_alpha,
    const at::Tensor& log_beta, double scale) {
  return forward(kFwd, q, k, v, log_alpha, log_beta, scale, /*keep=*/true);
}

at::Tensor criss_cross_attention_inference(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& log_alpha,
                                           const at::Tensor& log_beta, double scale) {
  return std::get<0>(forward(kInference, q, k, v, log_alpha, log_beta, scale, /*keep=*/false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> criss_cross_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& log_alpha, const at::Tensor& log_beta, const at::Tensor& row_probs,
    const at::Tensor& rows_v, const at::Tensor& cols_v, double scale) {
  check_attention_args(kBwd, q, k, v, log_alpha, log_beta, kArgRules);
  check_grad(kBwd, "grad_out", grad_out, "v", v);
  const auto acc = accumulation_type(q.scalar_type());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t BH = B * heads, d = q.size(4), c = v.size(4);
  check_like(kBwd, "row_probs", row_probs, {B, heads, H, W, W}, acc, q.device(), kFwd);
  check_like(kBwd, "rows_v", rows_v, {B, heads, H, W, c}, acc, q.device(), kFwd);
  check_like(kBwd, "cols_v", cols_v, {B, heads, H, W, c}, acc, q.device(), kFwd);
  const c10::OptionalDeviceGuard guard(q.device());
  const AttentionInputs in = kernel_inputs(q, k, v, log_alpha, log_beta, scale);
  const CrissCrossSaved saved{row_probs.contiguous().view({BH, H, W, W}), per_head(rows_v, acc),
                              per_head(cols_v, acc)};
  const auto opts = in.q.options();
  // The kernels write every element; without work (c = 0) all gradients are zero.
  const bool work = BH * H * W > 0 && c > 0;
  const auto alloc = [&](at::IntArrayRef shape) {
    return work ? empty_for_write(shape, opts) : at::zeros(shape, opts);
  };
  CrissCrossGrads grads{alloc({BH, H, W, d}), alloc({BH, H, W, d}), alloc({BH, H, W, c}),
                        alloc({BH, H, W}), alloc({BH, H, W})};
  if (work) {
    PPMA_DISPATCH_DEVICE(q.device(), criss_cross_attention_bwd_kernel, per_head(grad_out, acc),
                         in, saved, grads);
  }
  finish_decay_grads(in.tables, log_alpha, log_beta, grads.d_log_alpha, grads.d_log_beta);
  const auto dt = q.scalar_type();
  return {grads.dq.view({B, heads, H, W, d}).to(dt), grads.dk.view({B, heads, H, W, d}).to(dt),
          grads.dv.view({B, heads, H, W, c}).to(v.scalar_type()),
          grads.d_log_alpha.view({B, heads, H, W}).to(dt),
          grads.d_log_beta.view({B, heads, H, W}).to(dt)};
}

// The public op: the output of _criss_cross_attention_fwd (whose autograd formula is
// registered in Python, ppma_ops/registration/criss_cross_attention.py) when a gradient may be
// asked for; otherwise _criss_cross_attention_inference, which keeps nothing for a backward.
// This kernel runs above autograd, so grad mode and requires_grad are the caller's.
at::Tensor criss_cross_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& log_alpha, const at::Tensor& log_beta,
                                 double scale) {
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("ppma::_criss_cross_attention_fwd", "")
                        .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, double)>();
  static auto inference = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("ppma::_criss_cross_attention_inference", "")
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
      "_criss_cross_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor log_alpha, "
      "Tensor log_beta, float scale) -> (Tensor out, Tensor row_probs, Tensor rows_v, "
      "Tensor cols_v)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_criss_cross_attention_inference(Tensor q, Tensor k, Tensor v, Tensor log_alpha, "
      "Tensor log_beta, float scale) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_criss_cross_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor log_alpha, Tensor log_beta, Tensor row_probs, Tensor rows_v, Tensor cols_v, "
      "float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(ppma, CompositeImplicitAutograd, m) {
  m.impl("criss_cross_attention", &ppma::criss_cross_composite);
}

TORCH_LIBRARY_IMPL(ppma, CPU, m) {
  m.impl("_criss_cross_attention_fwd", &ppma::criss_cross_attention_fwd);
  m.impl("_criss_cross_attention_bwd", &ppma::criss_cross_attention_bwd);
  m.impl("_criss_cross_attention_inference", &ppma::criss_cross_attention_inference);
}

#if defined(PPMA_WITH_CUDA)
TORCH_LIBRARY_IMPL(ppma, CUDA, m) {
  m.impl("_criss_cross_attention_fwd", &ppma::criss_cross_attention_fwd);
  m.impl("_criss_cross_attention_bwd", &ppma::criss_cross_attention_bwd);
  m.impl("_criss_cross_attention_inference", &ppma::criss_cross_attention_inference);
}
#endif
