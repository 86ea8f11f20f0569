// Kernel entry points of vanilla polyline attention (docs/design.md §2.3), called by the host
// code in polyline_attention.cpp: *_kernel_cpu (which picks one of the per-ISA copies of
// csrc/cpu/polyline_attention_kernel.cpp, namespace ppma::<ISA>) and *_kernel_cuda
// (csrc/cuda/polyline_attention.cu).
//
// Inputs (kernel_args.h): q, k (BH, N, d); v (BH, N, c) over N = H·W row-major tokens, and the
// decay tables (BH, H, W). All tensors are contiguous and in the accumulation dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include "kernel_args.h"

namespace ppma {

// The forward's results: out (BH, N, c) = ½O₁ + ½O₂; parts (BH, 2, N, c) = O₁, O₂ (the two
// normalised softmax outputs); lse (BH, 2, N) their log-sum-exps. parts and lse are saved for
// the backward.
struct PolylineForward {
  at::Tensor out, parts, lse;
};

// The backward's results: dq, dk, dv, and the gradients dca, dcb (BH, H, W) of the decay tables
// (zero-filled by the caller), which the host code turns into log-decay gradients.
struct PolylineGrads {
  at::Tensor dq, dk, dv, dca, dcb;
};

void polyline_attention_fwd_kernel_cpu(const AttentionInputs& in, PolylineForward& fwd);
void polyline_attention_fwd_kernel_cuda(const AttentionInputs& in, PolylineForward& fwd);
// grad_out (BH, N, c); lse from the forward; delta (BH, 2, N) = ½·dO·O_p, the softmax-backward
// row sums.
void polyline_attention_bwd_kernel_cpu(const at::Tensor& grad_out, const AttentionInputs& in,
                                       const at::Tensor& lse, const at::Tensor& delta,
                                       PolylineGrads& grads);
void polyline_attention_bwd_kernel_cuda(const at::Tensor& grad_out, const AttentionInputs& in,
                                        const at::Tensor& lse, const at::Tensor& delta,
                                        PolylineGrads& grads);

#define PPMA_DECLARE_POLYLINE_ATTENTION_KERNELS(ISA)                                       \
  namespace ISA {                                                                         \
  void polyline_attention_fwd(const AttentionInputs& in, PolylineForward& fwd);           \
  void polyline_attention_bwd(const at::Tensor& grad_out, const AttentionInputs& in,      \
                              const at::Tensor& lse, const at::Tensor& delta,             \
                              PolylineGrads& grads);                                      \
  /* Threads that ran a chunk of an at::parallel_for compiled in the kernel's translation  \
     unit (1 when OpenMP was missing at compile time: parallel_for then runs serially). */ \
  int parallel_threads_used();                                                            \
  }

PPMA_DECLARE_POLYLINE_ATTENTION_KERNELS(DEFAULT)
PPMA_DECLARE_POLYLINE_ATTENTION_KERNELS(AVX2)
PPMA_DECLARE_POLYLINE_ATTENTION_KERNELS(AVX512)

#undef PPMA_DECLARE_POLYLINE_ATTENTION_KERNELS

}  // namespace ppma
