// Depthwise 2-D convolution on channels-last maps: schemas, argument checks and CPU dispatch.
// The arithmetic lives in csrc/cpu/depthwise_conv2d_kernel.cpp (one copy per ISA).
//
//   ppma::depthwise_conv2d(x, weight, bias) -> out
//       x (B, H, W, C); weight (C, 1, kh, kw) as nn.Conv2d(C, C, k, groups=C) stores it, with
//       kh and kw odd; bias (C) or None. Stride 1, "same" zero padding: out (B, H, W, C) equals
//       F.conv2d on the NCHW view of x, permuted back.
//   ppma::depthwise_conv2d_backward(grad_out, x, weight) -> (grad_x, grad_weight)
//       The bias gradient (grad_out summed over B, H, W) is left to the autograd formula.
//
// The autograd formula is registered here in C++ (not with torch.library.register_autograd as
// for the attention ops): a model runs this op three times per block on small maps, where the
// Python backward wrapper cost as much as the kernels. When the backward itself is recorded
// (create_graph=True) it runs ATen's convolution backward instead, whose own derivative gives
// correct second derivatives; the native backward op has none.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <vector>

#include "cpu_dispatch.h"
#include "depthwise_conv2d_kernel.h"

namespace ppma {
namespace {

constexpr const char* kOp = "depthwise_conv2d";

void check_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4, kOp, ": x must have shape (B, H, W, C), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kOp,
              ": the CPU kernel takes float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), kOp, ": the CPU kernel got x on ", x.device());
  const int64_t C = x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1, kOp,
              ": weight must have shape (C, 1, kh, kw) with C = ", C, ", got ", weight.sizes());
  TORCH_CHECK(weight.size(2) % 2 == 1 && weight.size(3) % 2 == 1, kOp,
              ": the kernel size must be odd (\"same\" padding), got ", weight.size(2), "x",
              weight.size(3));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), kOp, ": weight has dtype ",
              weight.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), kOp, ": weight is on ", weight.device(),
              " but x is on ", x.device());
}

// (C, 1, kh, kw) → (kh, kw, C): a tap's weights contiguous over channels.
at::Tensor channels_last_taps(const at::Tensor& weight) {
  const int64_t C = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  return weight.reshape({C, kh * kw}).t().contiguous().view({kh, kw, C});
}

at::Tensor depthwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  check_args(x, weight);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == x.size(3), kOp, ": bias must have shape (C,) = (",
                x.size(3), ",), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type() && b.device() == x.device(), kOp,
                ": bias must have x's dtype and device");
    b = b.contiguous();
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  if (xc.numel() > 0) {
    const at::Tensor taps = channels_last_taps(weight);
    PPMA_DISPATCH_CPU_ISA(depthwise_correlate, xc, taps, b, out)
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> depthwise_conv2d_backward_cpu(const at::Tensor& grad_out,
                                                                 const at::Tensor& x,
                                                                 const at::Tensor& weight) {
  check_args(x, weight);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(), kOp,
              "_backward: grad_out must have the shape and dtype of x ", x.sizes(), ", got ",
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

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The gradients as ATen's convolution backward, which autograd can differentiate again: the
// native backward op has no derivative of its own, so a graph built through it (create_graph)
// would silently give zero second derivatives.
std::tuple<at::Tensor, at::Tensor> differentiable_backward(const at::Tensor& grad_out,
                                                           const at::Tensor& x,
                                                           const at::Tensor& weight) {
  const int64_t C = x.size(3), kh = weight.size(2), kw = weight.size(3);
  const std::vector<int64_t> ones{1, 1}, padding{kh / 2, kw / 2}, no_padding{0, 0};
  auto [grad_x, grad_weight, unused] = at::convolution_backward(
      grad_out.permute({0, 3, 1, 2}), x.permute({0, 3, 1, 2}), weight, std::nullopt, ones,
      padding, ones, /*transposed=*/false, no_padding, C, {true, true, false});
  return {grad_x.permute({0, 2, 3, 1}), grad_weight};
}

// True when the backward runs under create_graph and its result can depend on a tensor that
// requires a gradient.
bool builds_graph(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

class DepthwiseConv2dFunction : public torch::autograd::Function<DepthwiseConv2dFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("ppma::depthwise_conv2d", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return op.call(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("ppma::depthwise_conv2d_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_out = grads[0];
    const bool graph = builds_graph({&grad_out, &saved[0], &saved[1]}) && saved[0].numel() > 0;
    auto [grad_x, grad_weight] = graph ? differentiable_backward(grad_out, saved[0], saved[1])
                                       : op.call(grad_out, saved[0], saved[1]);
    at::Tensor grad_bias;
    if (ctx->saved_data["has_bias"].toBool()) grad_bias = grad_out.sum({0, 1, 2});
    return {grad_x, grad_weight, grad_bias};
  }
};

at::Tensor depthwise_conv2d_autograd(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias) {
  return DepthwiseConv2dFunction::apply(x, weight, bias);
}

}  // namespace
}  // namespace ppma

TORCH_LIBRARY_FRAGMENT(ppma, m) {
  m.def("depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "depthwise_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight) -> "
      "(Tensor grad_x, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(ppma, CPU, m) {
  m.impl("depthwise_conv2d", &ppma::depthwise_conv2d_cpu);
  m.impl("depthwise_conv2d_backward", &ppma::depthwise_conv2d_backward_cpu);
}

TORCH_LIBRARY_IMPL(ppma, Autograd, m) {
  m.impl("depthwise_conv2d", &ppma::depthwise_conv2d_autograd);
}
