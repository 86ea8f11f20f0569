// Vanilla polyline attention (docs/design.md §2.3): schemas and CPU dispatch. The arithmetic lives in
// csrc/cpu/polyline_attention_kernel.cpp (one copy per ISA) and polyline_attention_math.h.
//
//   ppma::polyline_attention(q, k, v, log_alpha, log_beta, scale) -> out
//       public op; CompositeImplicitAutograd over polyline_attention_fwd, so autograd and
//       torch.compile see the fwd/backward pair.
//   ppma::polyline_attention_fwd(...) -> (out, parts, lse)
//       parts (B, heads, 2, H, W, c): O₁ and O₂ (the two normalised softmax outputs);
//       lse (B, heads, 2, H, W): their log-sum-exps. Both in the accumulation dtype (float32,
//       float64 for float64 inputs) and saved for the backward.
//   ppma::polyline_attention_backward(grad_out, q, k, v, log_alpha, log_beta, parts, lse, scale)
//       -> (dq, dk, dv, dlog_alpha, dlog_beta)
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "cpu_dispatch.h"
#include "op_args.h"
#include "polyline_attention_kernel.h"

namespace ppma {
namespace {

constexpr const char* kOp = "polyline_attention";

// (B, heads, H, W, x) → contiguous (B·heads, H·W, x) in the accumulation dtype.
at::Tensor flat_tokens(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous().view({t.size(0) * t.size(1), t.size(2) * t.size(3), t.size(4)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> polyline_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_alpha,
    const at::Tensor& log_beta, double scale) {
  check_attention_args(kOp, q, k, v, log_alpha, log_beta);
  check_log_decay_values(kOp, log_alpha, log_beta);
  const auto acc = accumulation_type(q.scalar_type());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t N = H * W, c = v.size(4);
  const at::Tensor qf = flat_tokens(q, acc), kf = flat_tokens(k, acc), vf = flat_tokens(v, acc);
  const DecayTables tables = decay_tables(kOp, log_alpha, log_beta, acc);
  const auto opts = qf.options();
  at::Tensor out = at::empty({B * heads, N, c}, opts);
  at::Tensor parts = at::empty({B * heads, 2, N, c}, opts);
  at::Tensor lse = at::empty({B * heads, 2, N}, opts);
  if (B * heads * N > 0) {
    PPMA_DISPATCH_CPU_ISA(polyline_attention_forward, qf, kf, vf, tables.ca, tables.cb,
                          tables.na, tables.nb, scale, out, parts, lse)
  }
  return {out.view({B, heads, H, W, c}).to(v.scalar_type()),
          parts.view({B, heads, 2, H, W, c}), lse.view({B, heads, 2, H, W})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
polyline_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& log_alpha, const at::Tensor& log_beta,
                                const at::Tensor& parts, const at::Tensor& lse, double scale) {
  check_attention_args(kOp, q, k, v, log_alpha, log_beta);
  TORCH_CHECK(grad_out.sizes() == v.sizes(), "polyline_attention_backward: grad_out must have ",
              "the shape of v ", v.sizes(), ", got ", grad_out.sizes());
  const auto acc = accumulation_type(q.scalar_type());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t N = H * W, d = q.size(4), c = v.size(4);
  TORCH_CHECK(parts.sizes() == at::IntArrayRef({B, heads, 2, H, W, c}) &&
                  parts.scalar_type() == acc,
              "polyline_attention_backward: parts must be the (B, heads, 2, H, W, c) tensor ",
              "returned by polyline_attention_fwd");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, heads, 2, H, W}) && lse.scalar_type() == acc,
              "polyline_attention_backward: lse must be the (B, heads, 2, H, W) tensor ",
              "returned by polyline_attention_fwd");
  const at::Tensor go = flat_tokens(grad_out, acc);
  const at::Tensor qf = flat_tokens(q, acc), kf = flat_tokens(k, acc), vf = flat_tokens(v, acc);
  const DecayTables tables = decay_tables(kOp, log_alpha, log_beta, acc);
  const at::Tensor parts_f = parts.contiguous().view({B * heads, 2, N, c});
  // Softmax-backward row sums: delta_p,u = ½·dO_u·O_p,u.
  const at::Tensor delta = (go.unsqueeze(1) * parts_f).sum(-1).mul_(0.5).contiguous();
  const at::Tensor lse_f = lse.contiguous().view({B * heads, 2, N});
  const auto opts = qf.options();
  at::Tensor dq = at::empty({B * heads, N, d}, opts);
  at::Tensor dk = at::empty({B * heads, N, d}, opts);
  at::Tensor dv = at::empty({B * heads, N, c}, opts);
  at::Tensor dca = at::zeros({B * heads, H, W}, opts);
  at::Tensor dcb = at::zeros({B * heads, H, W}, opts);
  if (B * heads * N > 0) {
    PPMA_DISPATCH_CPU_ISA(polyline_attention_backward, go, qf, kf, vf, tables.ca, tables.cb,
                          tables.na, tables.nb, lse_f, delta, scale, dq, dk, dv, dca, dcb)
  }
  // Gradients of the cumsum tables → of the log decays: reverse cumsums (along W for Ca,
  // along H for Cb).
  at::Tensor dla = dca.flip(-1).cumsum(-1).flip(-1).view({B, heads, H, W});
  at::Tensor dlb = dcb.flip(-2).cumsum(-2).flip(-2).view({B, heads, H, W});
  finish_decay_grads(tables, log_alpha, log_beta, dla, dlb);
  return {dq.view({B, heads, H, W, d}).to(q.scalar_type()),
          dk.view({B, heads, H, W, d}).to(k.scalar_type()),
          dv.view({B, heads, H, W, c}).to(v.scalar_type()),
          dla.to(log_alpha.scalar_type()), dlb.to(log_beta.scalar_type())};
}

// The public op: the output of polyline_attention_fwd (whose autograd formula is registered in
// Python, ppma_ops/registration/polyline_attention.py).
at::Tensor polyline_attention_composite(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& log_alpha,
                                        const at::Tensor& log_beta, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ppma::polyline_attention_fwd", "")
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
      "polyline_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor log_alpha, "
      "Tensor log_beta, float scale) -> (Tensor out, Tensor parts, Tensor lse)");
  m.def(
      "polyline_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor log_alpha, Tensor log_beta, Tensor parts, Tensor lse, float scale) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ppma, CompositeImplicitAutograd, m) {
  m.impl("polyline_attention", &ppma::polyline_attention_composite);
}

TORCH_LIBRARY_IMPL(ppma, CPU, m) {
  m.impl("polyline_attention_fwd", &ppma::polyline_attention_fwd_cpu);
  m.impl("polyline_attention_backward", &ppma::polyline_attention_backward_cpu);
}
