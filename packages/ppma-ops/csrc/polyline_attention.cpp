// Vanilla polyline attention (docs/design.md §2.3): schemas and the host code, written once for
// CPU and CUDA tensors. The arithmetic lives in the kernels of polyline_attention_kernel.h.
//
//   ppma::polyline_attention(q, k, v, log_alpha, log_beta, scale) -> out
//       public op; CompositeImplicitAutograd over _polyline_attention_fwd, so autograd and
//       torch.compile see the fwd/bwd pair.
//   ppma::_polyline_attention_fwd(...) -> (out, parts, lse)
//       parts (B, heads, 2, H, W, c): O₁ and O₂ (the two normalised softmax outputs);
//       lse (B, heads, 2, H, W): their log-sum-exps. Both in the accumulation dtype (float32,
//       float64 for float64 inputs) and saved for the backward.
//   ppma::_polyline_attention_bwd(grad_out, q, k, v, log_alpha, log_beta, parts, lse, scale)
//       -> (dq, dk, dv, dlog_alpha, dlog_beta)
// Autograd and the fake kernels: ppma_ops/registration/polyline_attention.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "cpu_dispatch.h"
#include "decay_tables.h"
#include "device_dispatch.h"
#include "op_args.h"
#include "polyline_attention_kernel.h"

namespace ppma {

void polyline_attention_fwd_kernel_cpu(const AttentionInputs& in, PolylineForward& fwd) {
  PPMA_DISPATCH_CPU_ISA(polyline_attention_fwd, in, fwd)
}

void polyline_attention_bwd_kernel_cpu(const at::Tensor& grad_out, const AttentionInputs& in,
                                       const at::Tensor& lse, const at::Tensor& delta,
                                       PolylineGrads& grads) {
  PPMA_DISPATCH_CPU_ISA(polyline_attention_bwd, grad_out, in, lse, delta, grads)
}

namespace {

constexpr const char* kFwd = "_polyline_attention_fwd";
constexpr const char* kBwd = "_polyline_attention_bwd";

// (B, heads, H, W, x) → contiguous (B·heads, H·W, x) in the accumulation dtype.
at::Tensor flat_tokens(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous().view({t.size(0) * t.size(1), t.size(2) * t.size(3), t.size(4)});
}

AttentionInputs kernel_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& log_alpha, const at::Tensor& log_beta,
                              double scale) {
  const auto acc = accumulation_type(q.scalar_type());
  return {flat_tokens(q, acc), flat_tokens(k, acc), flat_tokens(v, acc),
          decay_tables(log_alpha, log_beta, acc), scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> polyline_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_alpha,
    const at::Tensor& log_beta, double scale) {
  check_attention_args(kFwd, q, k, v, log_alpha, log_beta);
  const c10::OptionalDeviceGuard guard(q.device());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t BH = B * heads, N = H * W, c = v.size(4);
  const AttentionInputs in = kernel_inputs(q, k, v, log_alpha, log_beta, scale);
  const auto opts = in.q.options();
  PolylineForward fwd{at::empty({BH, N, c}, opts), at::empty({BH, 2, N, c}, opts),
                      at::empty({BH, 2, N}, opts)};
  if (BH * N > 0) PPMA_DISPATCH_DEVICE(q.device(), polyline_attention_fwd_kernel, in, fwd);
  return {fwd.out.view({B, heads, H, W, c}).to(v.scalar_type()),
          fwd.parts.view({B, heads, 2, H, W, c}), fwd.lse.view({B, heads, 2, H, W})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> polyline_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& log_alpha, const at::Tensor& log_beta, const at::Tensor& parts,
    const at::Tensor& lse, double scale) {
  check_attention_args(kBwd, q, k, v, log_alpha, log_beta);
  check_grad(kBwd, "grad_out", grad_out, "v", v);
  const auto acc = accumulation_type(q.scalar_type());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t BH = B * heads, N = H * W, d = q.size(4), c = v.size(4);
  check_like(kBwd, "parts", parts, {B, heads, 2, H, W, c}, acc, q.device(), kFwd);
  check_like(kBwd, "lse", lse, {B, heads, 2, H, W}, acc, q.device(), kFwd);
  const c10::OptionalDeviceGuard guard(q.device());
  const AttentionInputs in = kernel_inputs(q, k, v, log_alpha, log_beta, scale);
  const at::Tensor go = flat_tokens(grad_out, acc);
  // Softmax-backward row sums: delta_p,u = ½·dO_u·O_p,u.
  const at::Tensor delta =
      (go.unsqueeze(1) * parts.contiguous().view({BH, 2, N, c})).sum(-1).mul_(0.5).contiguous();
  const auto opts = in.q.options();
  PolylineGrads grads{at::empty({BH, N, d}, opts), at::empty({BH, N, d}, opts),
                      at::empty({BH, N, c}, opts), at::zeros({BH, H, W}, opts),
                      at::zeros({BH, H, W}, opts)};
  if (BH * N > 0) {
    PPMA_DISPATCH_DEVICE(q.device(), polyline_attention_bwd_kernel, go, in,
                         lse.contiguous().view({BH, 2, N}), delta, grads);
  }
  // Ca[i,j] = Σ_{t≤j} log_alpha[i,t] → d log_alpha[i,t] = Σ_{j≥t} dCa[i,j] (likewise along H).
  at::Tensor dla = reverse_line_cumsum(grads.dca, /*along_rows=*/true).view({B, heads, H, W});
  at::Tensor dlb = reverse_line_cumsum(grads.dcb, /*along_rows=*/false).view({B, heads, H, W});
  finish_decay_grads(in.tables, log_alpha, log_beta, dla, dlb);
  return {grads.dq.view({B, heads, H, W, d}).to(q.scalar_type()),
          grads.dk.view({B, heads, H, W, d}).to(k.scalar_type()),
          grads.dv.view({B, heads, H, W, c}).to(v.scalar_type()),
          dla.to(log_alpha.scalar_type()), dlb.to(log_beta.scalar_type())};
}

// The public op: the output of _polyline_attention_fwd, whose autograd formula is registered in
// Python (ppma_ops/registration/polyline_attention.py).
at::Tensor polyline_attention_composite(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& log_alpha,
                                        const at::Tensor& log_beta, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ppma::_polyline_attention_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, double)>();
  return std::get<0>(op.call(q, k, v, log_alpha, log_beta, scale));
}

}  // namespace

int polyline_attention_parallel_threads_used() {
  switch (selected_cpu_isa()) {
#if defined(PPMA_BUILT_AVX512)
    case CpuIsa::Avx512:
      return AVX512::parallel_threads_used();
#endif
#if defined(PPMA_BUILT_AVX2)
    case CpuIsa::Avx2:
      return AVX2::parallel_threads_used();
#endif
    default:
      return DEFAULT::parallel_threads_used();
  }
}

}  // namespace ppma

TORCH_LIBRARY_FRAGMENT(ppma, m) {
  m.def(
      "polyline_attention(Tensor q, Tensor k, Tensor v, Tensor log_alpha, Tensor log_beta, "
      "float scale) -> Tensor");
  m.def(
      "_polyline_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor log_alpha, "
      "Tensor log_beta, float scale) -> (Tensor out, Tensor parts, Tensor lse)");
  m.def(
      "_polyline_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor log_alpha, Tensor log_beta, Tensor parts, Tensor lse, float scale) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ppma, CompositeImplicitAutograd, m) {
  m.impl("polyline_attention", &ppma::polyline_attention_composite);
}

TORCH_LIBRARY_IMPL(ppma, CPU, m) {
  m.impl("_polyline_attention_fwd", &ppma::polyline_attention_fwd);
  m.impl("_polyline_attention_bwd", &ppma::polyline_attention_bwd);
}

#if defined(PPMA_WITH_CUDA)
TORCH_LIBRARY_IMPL(ppma, CUDA, m) {
  m.impl("_polyline_attention_fwd", &ppma::polyline_attention_fwd);
  m.impl("_polyline_attention_bwd", &ppma::polyline_attention_bwd);
}
#endif
