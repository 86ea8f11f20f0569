// Entry points of the vanilla polyline attention CPU kernels. csrc/cpu/polyline_attention_kernel.cpp
// is compiled once per instruction set into namespace ppma::<ISA>; polyline_attention.cpp
// picks one at run time (selected_cpu_isa()).
//
// All tensors are contiguous, of one accumulation dtype (float32 or float64), with BH = B·heads
// and N = H·W row-major tokens:
//   q, k (BH, N, d); v (BH, N, c); ca, cb (BH, H, W) cumsums of log_alpha (along W) and
//   log_beta (along H); na, nb (BH, H, W) the counts of −inf log decays along the same lines
//   when some are −inf (ca, cb then sum the finite ones, docs/design.md §2.7), otherwise
//   undefined tensors.
#pragma once

#include <ATen/core/Tensor.h>

namespace ppma {

#define PPMA_DECLARE_POLYLINE_ATTENTION_KERNELS(ISA)                                        \
  namespace ISA {                                                                          \
  /* out (BH, N, c) = ½O₁ + ½O₂; parts (BH, 2, N, c) = O₁, O₂; lse (BH, 2, N). */            \
  void polyline_attention_forward(const at::Tensor& q, const at::Tensor& k,                 \
                                  const at::Tensor& v, const at::Tensor& ca,                \
                                  const at::Tensor& cb, const at::Tensor& na,               \
                                  const at::Tensor& nb, double scale, at::Tensor& out,      \
                                  at::Tensor& parts, at::Tensor& lse);                      \
  /* delta (BH, 2, N) = ½·dO·O_p. Writes dq, dk, dv and the gradients of the cumsum tables  \
     dca, dcb (BH, H, W). */                                                               \
  void polyline_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,         \
                                   const at::Tensor& k, const at::Tensor& v,                \
                                   const at::Tensor& ca, const at::Tensor& cb,              \
                                   const at::Tensor& na, const at::Tensor& nb,              \
                                   const at::Tensor& lse, const at::Tensor& delta,          \
                                   double scale, at::Tensor& dq, at::Tensor& dk,            \
                                   at::Tensor& dv, at::Tensor& dca, at::Tensor& dcb);       \
  /* Threads that ran a chunk of an at::parallel_for compiled in the kernel's translation    \
     unit (1 when OpenMP was missing at compile time: parallel_for then runs serially). */  \
  int parallel_threads_used();                                                             \
  }

PPMA_DECLARE_POLYLINE_ATTENTION_KERNELS(DEFAULT)
PPMA_DECLARE_POLYLINE_ATTENTION_KERNELS(AVX2)
PPMA_DECLARE_POLYLINE_ATTENTION_KERNELS(AVX512)

#undef PPMA_DECLARE_POLYLINE_ATTENTION_KERNELS

}  // namespace ppma
