// What the host code of the attention ops (csrc/polyline_attention.cpp,
// csrc/criss_cross_attention.cpp) hands to their CPU and CUDA kernels. Plain structs of tensors,
// without member functions: the CPU kernels include this header once per instruction set.
#pragma once

#include <ATen/core/Tensor.h>

namespace ppma {

// The tables of docs/design.md §1 and §2.7, (B·heads, H, W) in the accumulation dtype: ca, cb
// the running sums of the finite log decays along each row (log_alpha) and each column
// (log_beta), each line's first log decay left out (it never enters the mask); na, nb the
// running counts of −inf log decays along the same lines. A path is open exactly where the
// counts at both ends of each leg agree. The CPU builder leaves na, nb undefined when no log
// decay is −inf (the kernels then run their plain masks); the CUDA builder always fills them
// (finding out would cost a device sync).
struct DecayTables {
  at::Tensor ca, cb, na, nb;
};

// The inputs of an attention kernel: q, k, v converted once to the accumulation dtype and
// contiguous, with B·heads leading (vanilla: (BH, N, ·) over N = H·W row-major tokens;
// criss-cross: (BH, H, W, ·)), the decay tables and the score scale.
struct AttentionInputs {
  at::Tensor q, k, v;
  DecayTables tables;
  double scale;
};

}  // namespace ppma
