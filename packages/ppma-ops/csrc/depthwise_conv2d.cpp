// Depthwise 2-D convolution on channels-last maps: schemas and CPU host code. The arithmetic
// lives in csrc/cpu/depthwise_conv2d_kernel.cpp (one copy per ISA).
//
//   ppma::depthwise_conv2d(x, weight, bias) -> out
//       x (B, H, W, C); weight (C, 1, kh, kw) as nn.Conv2d(C, C, k, groups=C) stores it, with
//       kh and kw odd; bias (C) or None. Stride 1, "same" zero padding: out (B, H, W, C) equals
//       F.conv2d on the NCHW view of x, permuted back.
//   ppma::_depthwise_conv2d_bwd(grad_out, x, weight) -> (grad_x, grad_weight)
//       The bias gradient (grad_out summed over B, H, W) is left to the autograd formula.
// Autograd and the fake kernels: ppma_ops/registration/depthwise_conv2d.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu_dispatch.h"
#include "depthwise_conv2d_kernel.h"
#include "op_args.h"

namespace ppma {
namespace {

// (C, 1, kh, kw) → (kh, kw, C): a tap's weights contiguous over channels.
at::Tensor channels_last_taps(const at::Tensor& weight) {
  const int64_t C = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  return weight.reshape({C, kh * kw}).t().contiguous().view({kh, kw, C});
}

at::Tensor depthwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  check_depthwise_args("depthwise_conv2d", x, weight, b);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  if (xc.numel() > 0) {
    const at::Tensor taps = channels_last_taps(weight);
    const at::Tensor bc = b.defined() ? b.contiguous() : b;
    PPMA_DISPATCH_CPU_ISA(depthwise_correlate, xc, taps, bc, out)
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> depthwise_conv2d_bwd_cpu(const at::Tensor& grad_out,
                                                            const at::Tensor& x,
                                                            const at::Tensor& weight) {
  constexpr const char* op = "_depthwise_conv2d_bwd";
  check_depthwise_args(op, x, weight, at::Tensor());
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(), op,
              ": grad_out must have the shape and dtype of x ", x.sizes(), ", got ",
              grad_out.sizes(), " ", grad_out.scalar_type());
  const int64_t C = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  const at::Tensor gy = grad_out.contiguous(), xc = x.contiguous();
  at::Tensor grad_x = at::empty_like(xc);
  at::Tensor grad_taps = at::zeros({kh, kw, C}, xc.options());
  if (xc.numel() > 0) {
    // Stride 1 with "same" padding and an odd kernel: the adjoint of the correlation is the
    // correlation with the kernel flipped in both directions.
    const at::Tensor flipped = channels_last_taps(weight.flip({2, 3}));
    const at::Tensor no_bias;
    PPMA_DISPATCH_CPU_ISA(depthwise_correlate, gy, flipped, no_bias, grad_x)
    PPMA_DISPATCH_CPU_ISA(depthwise_taps_grad, gy, xc, grad_taps)
  }
  at::Tensor grad_weight = grad_taps.view({kh * kw, C}).t().contiguous().view({C, 1, kh, kw});
  return {grad_x, grad_weight};
}

}  // namespace
}  // namespace ppma

TORCH_LIBRARY_FRAGMENT(ppma, m) {
  m.def("depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "_depthwise_conv2d_bwd(Tensor grad_out, Tensor x, Tensor weight) -> "
      "(Tensor grad_x, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(ppma, CPU, m) {
  m.impl("depthwise_conv2d", &ppma::depthwise_conv2d_cpu);
  m.impl("_depthwise_conv2d_bwd", &ppma::depthwise_conv2d_bwd_cpu);
}
