// Kernel entry points of criss-cross polyline attention (docs/design.md §2.4), called by the
// host code in criss_cross_attention.cpp: *_kernel_cpu (which picks one of the per-ISA copies
// of csrc/cpu/criss_cross_attention_kernel.cpp, namespace ppma::<ISA>) and *_kernel_cuda
// (csrc/cuda/criss_cross_attention.cu).
//
// Inputs (kernel_args.h): q, k (BH, H, W, d); v (BH, H, W, c), BH = B·heads, and the decay
// tables (BH, H, W). All tensors are contiguous and in the accumulation dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include "kernel_args.h"

namespace ppma {

// What the forward keeps for the backward (memory O(N·W) per head): row_probs (BH, H, W, W),
// the row softmaxes Â_i; rows_v = R(V) and cols_v = Cc(V), both (BH, H, W, c). The column
// softmaxes B̂_l are recomputed by the backward. All undefined for inference: nothing is kept.
struct CrissCrossSaved {
  at::Tensor row_probs, rows_v, cols_v;
};

// The backward's results: dq, dk, dv and the log-decay gradients (BH, H, W).
struct CrissCrossGrads {
  at::Tensor dq, dk, dv, d_log_alpha, d_log_beta;
};

// out (BH, H, W, c) = ½·Cc(R(V)) + ½·R(Cc(V)); fills `saved` when its tensors are defined.
void criss_cross_attention_fwd_kernel_cpu(const AttentionInputs& in, at::Tensor& out,
                                          const CrissCrossSaved& saved);
void criss_cross_attention_fwd_kernel_cuda(const AttentionInputs& in, at::Tensor& out,
                                           const CrissCrossSaved& saved);
// grad_out (BH, H, W, c). Writes every element of `grads`.
void criss_cross_attention_bwd_kernel_cpu(const at::Tensor& grad_out, const AttentionInputs& in,
                                          const CrissCrossSaved& saved, CrissCrossGrads& grads);
void criss_cross_attention_bwd_kernel_cuda(const at::Tensor& grad_out,
                                           const AttentionInputs& in,
                                           const CrissCrossSaved& saved, CrissCrossGrads& grads);

#define PPMA_DECLARE_CRISS_CROSS_KERNELS(ISA)                                               \
  namespace ISA {                                                                          \
  void criss_cross_attention_fwd(const AttentionInputs& in, at::Tensor& out,               \
                                 const CrissCrossSaved& saved);                            \
  void criss_cross_attention_bwd(const at::Tensor& grad_out, const AttentionInputs& in,    \
                                 const CrissCrossSaved& saved, CrissCrossGrads& grads);    \
  }

PPMA_DECLARE_CRISS_CROSS_KERNELS(DEFAULT)
PPMA_DECLARE_CRISS_CROSS_KERNELS(AVX2)
PPMA_DECLARE_CRISS_CROSS_KERNELS(AVX512)

#undef PPMA_DECLARE_CRISS_CROSS_KERNELS

}  // namespace ppma
