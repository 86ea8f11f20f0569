// ppma::polyline_scan: y = L·x (or Lᵀ·x) for the polyline mask L (docs/design.md §1), O(N·c):
// schemas and the host code, written once for CPU and CUDA tensors.
//
//   ppma::polyline_scan(x, log_alpha, log_beta, transpose) -> y
//   ppma::_polyline_scan_bwd(grad_y, x, log_alpha, log_beta, transpose)
//       -> (grad_x, grad_log_alpha, grad_log_beta)
//
// L = L_H·L_V (Theorem 1): y = L·x mixes every column with B_l, then every row with A_i;
// Lᵀ·x = L_V·L_H·x mixes rows first. Each 1-D mix is a forward plus a backward scan
// (scan_math.h, run by the kernels of polyline_scan_kernel.h). Backward: dx = Lᵀ·dy (resp.
// L·dy), and the decay gradients come from the forward/adjoint states of each 1-D mix,
// recomputing the intermediate grid (O(N·c), cheaper than keeping it). Autograd and the fake
// kernels: ppma_ops/registration/polyline_scan.py.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <tuple>

#include "device_dispatch.h"
#include "op_args.h"
#include "polyline_scan_kernel.h"

namespace ppma {
namespace {

// The scan's operands in the accumulation dtype, contiguous, (B·heads, H, W, ·).
struct ScanOperands {
  at::Tensor x, log_alpha, log_beta;
};

ScanOperands scan_operands(const at::Tensor& x, const at::Tensor& log_alpha,
                           const at::Tensor& log_beta) {
  const auto acc = accumulation_type(x.scalar_type());
  const int64_t BH = x.size(0) * x.size(1), H = x.size(2), W = x.size(3);
  return {x.to(acc).contiguous().view({BH, H, W, x.size(4)}),
          log_alpha.to(acc).contiguous().view({BH, H, W}),
          log_beta.to(acc).contiguous().view({BH, H, W})};
}

// out = M·x along the rows (decays log_alpha) or the columns (log_beta).
void mix(const at::Tensor& x, const ScanOperands& s, bool along_rows, at::Tensor& out) {
  const at::Tensor& decay = along_rows ? s.log_alpha : s.log_beta;
  PPMA_DISPATCH_DEVICE(x.device(), scan_mix_kernel, x, decay, along_rows, out);
}

// The gradients of y = M·u along the rows or the columns, given grad_y.
void mix_backward(const at::Tensor& u, const at::Tensor& grad_y, const ScanOperands& s,
                  bool along_rows, at::Tensor& grad_u, at::Tensor& grad_decay) {
  const at::Tensor& decay = along_rows ? s.log_alpha : s.log_beta;
  PPMA_DISPATCH_DEVICE(u.device(), scan_mix_backward_kernel, u, grad_y, decay, along_rows,
                       grad_u, grad_decay);
}

at::Tensor polyline_scan(const at::Tensor& x, const at::Tensor& log_alpha,
                         const at::Tensor& log_beta, bool transpose) {
  check_scan_args("polyline_scan", x, log_alpha, log_beta);
  const c10::OptionalDeviceGuard guard(x.device());
  const ScanOperands s = scan_operands(x, log_alpha, log_beta);
  at::Tensor out = at::empty_like(s.x);
  if (s.x.numel() > 0) {
    at::Tensor mid = at::empty_like(s.x);
    // L·x = L_H·(L_V·x): columns first; Lᵀ·x = L_V·(L_H·x): rows first.
    mix(s.x, s, /*along_rows=*/transpose, mid);
    mix(mid, s, /*along_rows=*/!transpose, out);
  }
  return out.view(x.sizes()).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> polyline_scan_bwd(const at::Tensor& grad_y,
                                                                 const at::Tensor& x,
                                                                 const at::Tensor& log_alpha,
                                                                 const at::Tensor& log_beta,
                                                                 bool transpose) {
  constexpr const char* op = "_polyline_scan_bwd";
  check_scan_args(op, x, log_alpha, log_beta);
  check_grad(op, "grad_y", grad_y, "x", x);
  const c10::OptionalDeviceGuard guard(x.device());
  const ScanOperands s = scan_operands(x, log_alpha, log_beta);
  const at::Tensor gy = grad_y.to(s.x.scalar_type()).contiguous().view(s.x.sizes());
  at::Tensor grad_x = at::zeros_like(s.x);
  at::Tensor grad_la = at::zeros_like(s.log_alpha), grad_lb = at::zeros_like(s.log_beta);
  if (s.x.numel() > 0) {
    // y = M₂·z with z = M₁·x, where M₁ mixes columns (L) or rows (Lᵀ) and M₂ the other lines.
    const bool first_rows = transpose;
    at::Tensor mid = at::empty_like(s.x);       // z, the intermediate grid of the forward
    at::Tensor grad_mid = at::empty_like(s.x);  // its gradient
    mix(s.x, s, first_rows, mid);
    mix_backward(mid, gy, s, !first_rows, grad_mid, first_rows ? grad_lb : grad_la);
    mix_backward(s.x, grad_mid, s, first_rows, grad_x, first_rows ? grad_la : grad_lb);
  }
  const auto dt = x.scalar_type();
  return {grad_x.view(x.sizes()).to(dt), grad_la.view(log_alpha.sizes()).to(dt),
          grad_lb.view(log_beta.sizes()).to(dt)};
}

}  // namespace
}  // namespace ppma

TORCH_LIBRARY_FRAGMENT(ppma, m) {
  m.def("polyline_scan(Tensor x, Tensor log_alpha, Tensor log_beta, bool transpose) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "_polyline_scan_bwd(Tensor grad_y, Tensor x, Tensor log_alpha, Tensor log_beta, "
      "bool transpose) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(ppma, CPU, m) {
  m.impl("polyline_scan", &ppma::polyline_scan);
  m.impl("_polyline_scan_bwd", &ppma::polyline_scan_bwd);
}

#if defined(PPMA_WITH_CUDA)
TORCH_LIBRARY_IMPL(ppma, CUDA, m) {
  m.impl("polyline_scan", &ppma::polyline_scan);
  m.impl("_polyline_scan_bwd", &ppma::polyline_scan_bwd);
}
#endif
