// Entry points of the channels-last depthwise convolution CPU kernels.
// csrc/cpu/depthwise_conv2d_kernel.cpp is compiled once per instruction set into namespace
// ppma::<ISA>; depthwise_conv2d.cpp picks one at run time (selected_cpu_isa()).
//
// All tensors are contiguous and of one dtype (float32 or float64):
//   x, out, grad_out, grad_x (B, H, W, C); taps (kh, kw, C) — the kernel transposed so that a
//   tap's C weights are contiguous; bias (C) or undefined. kh and kw are odd; padding is
//   "same" (kh/2, kw/2) with zeros; stride and dilation are 1.
#pragma once

#include <ATen/core/Tensor.h>

namespace ppma {

#define PPMA_DECLARE_DEPTHWISE_CONV2D_KERNELS(ISA)                                          \
  namespace ISA {                                                                          \
  /* out = bias + Σ_taps taps[di, dj] · x shifted by (di − kh/2, dj − kw/2). The gradient   \
     of x is the same correlation of grad_out with the flipped taps and no bias. */        \
  void depthwise_correlate(const at::Tensor& x, const at::Tensor& taps,                     \
                           const at::Tensor& bias, at::Tensor& out);                        \
  /* grad_taps (kh, kw, C, zeroed by the caller) += Σ over pixels of grad_out · x shifted  \
     by the tap; summed over fixed row chunks in a fixed order, so the result does not      \
     depend on the threads. */                                                             \
  void depthwise_taps_grad(const at::Tensor& grad_out, const at::Tensor& x,                 \
                           at::Tensor& grad_taps);                                          \
  }

PPMA_DECLARE_DEPTHWISE_CONV2D_KERNELS(DEFAULT)
PPMA_DECLARE_DEPTHWISE_CONV2D_KERNELS(AVX2)
PPMA_DECLARE_DEPTHWISE_CONV2D_KERNELS(AVX512)

#undef PPMA_DECLARE_DEPTHWISE_CONV2D_KERNELS

}  // namespace ppma
