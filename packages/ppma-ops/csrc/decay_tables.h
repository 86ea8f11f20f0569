// Host-side pieces every attention op shares around its kernels (docs/design.md §1, §2.7): the
// decay tables, the reverse cumsum that turns table gradients into log-decay gradients, and
// the exact zeros of those gradients. Device-generic entry points; the per-device work is in
// decay_tables.cpp (CPU) and cuda/decay_tables.cu.
#pragma once

#include <ATen/ATen.h>

#include "kernel_args.h"

namespace ppma {

// log_alpha, log_beta (B, heads, H, W) → their tables (B·heads, H, W) in `acc`.
DecayTables decay_tables(const at::Tensor& log_alpha, const at::Tensor& log_beta,
                         at::ScalarType acc);
DecayTables decay_tables_cpu(const at::Tensor& log_alpha, const at::Tensor& log_beta,
                             at::ScalarType acc);
DecayTables decay_tables_cuda(const at::Tensor& log_alpha, const at::Tensor& log_beta,
                              at::ScalarType acc);

// t (…, H, W) → Σ_{s ≥ t} along W (along_rows) or H: the gradient of a cumsum. Deterministic
// on every device (a sequential scan per line on CUDA, where torch.cumsum may not be).
at::Tensor reverse_line_cumsum(const at::Tensor& t, bool along_rows);
at::Tensor reverse_line_cumsum_cuda(const at::Tensor& t, bool along_rows);

// d/d log decay = 0 at a log decay of −inf (the decay e^a = 0 scales every path through it)
// and at a line's first log decay (it never enters the mask); reverse cumsums of table
// gradients leave rounding residue there instead. dla, dlb: (…, H, W), fresh tensors.
void finish_decay_grads(const DecayTables& tables, const at::Tensor& log_alpha,
                        const at::Tensor& log_beta, at::Tensor& dla, at::Tensor& dlb);

}  // namespace ppma
