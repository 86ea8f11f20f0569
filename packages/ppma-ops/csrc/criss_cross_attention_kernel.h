// Entry points of the criss-cross polyline attention CPU kernels.
// csrc/cpu/criss_cross_attention_kernel.cpp is compiled once per instruction set into
// namespace ppma::<ISA>; criss_cross_attention.cpp picks one at run time (selected_cpu_isa()).
//
// All tensors are contiguous and of one accumulation dtype (float32 or float64); BH = B·heads:
//   q, k (BH, H, W, d); v (BH, H, W, c); ca, cb (BH, H, W): cumsums of log_alpha along W and
//   of log_beta along H; na, nb (BH, H, W): the counts of −inf log decays along the same lines
//   when some are −inf (ca, cb then sum the finite ones, docs/design.md §2.7), otherwise
//   undefined tensors.
// Saved for backward (memory O(N·W) per head): row_probs (BH, H, W, W), the row softmaxes
//   Â_i; rows_v = R(V), cols_v = Cc(V), both (BH, H, W, c). The column softmaxes B̂_l are
//   recomputed by the backward.
#pragma once

#include <ATen/core/Tensor.h>

namespace ppma {

#define PPMA_DECLARE_CRISS_CROSS_KERNELS(ISA)                                                 \
  namespace ISA {                                                                            \
  /* out = ½·Cc(R(V)) + ½·R(Cc(V)); fills row_probs, rows_v, cols_v, or keeps nothing when */ \
  /* they are undefined (inference). */                                                      \
  void criss_cross_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,     \
                           const at::Tensor& ca, const at::Tensor& cb, const at::Tensor& na,  \
                           const at::Tensor& nb, double scale, at::Tensor& out,               \
                           const at::Tensor& row_probs, const at::Tensor& rows_v,             \
                           const at::Tensor& cols_v);                                         \
  /* Writes dq, dk, dv and the log-decay gradients d_log_alpha, d_log_beta (BH, H, W). */     \
  void criss_cross_backward(const at::Tensor& grad_out, const at::Tensor& q,                  \
                            const at::Tensor& k, const at::Tensor& v,                         \
                            const at::Tensor& ca, const at::Tensor& cb,                       \
                            const at::Tensor& na, const at::Tensor& nb,                       \
                            const at::Tensor& row_probs, const at::Tensor& rows_v,            \
                            const at::Tensor& cols_v, double scale,                           \
                            at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,                   \
                            at::Tensor& d_log_alpha, at::Tensor& d_log_beta);                 \
  }

PPMA_DECLARE_CRISS_CROSS_KERNELS(DEFAULT)
PPMA_DECLARE_CRISS_CROSS_KERNELS(AVX2)
PPMA_DECLARE_CRISS_CROSS_KERNELS(AVX512)

#undef PPMA_DECLARE_CRISS_CROSS_KERNELS

}  // namespace ppma
