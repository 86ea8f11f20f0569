// Kernel entry points of the polyline scan (docs/design.md §1, Corollary 2), called by the host
// code in polyline_scan.cpp: *_kernel_cpu (polyline_scan_cpu.cpp) and *_kernel_cuda
// (cuda/polyline_scan.cu). Both run the line math of scan_math.h.
//
// All tensors are contiguous and in the accumulation dtype: x, out, grid tensors (BH, H, W, c);
// log decays (BH, H, W), BH = B·heads. "Lines" are the grid rows (along_rows, decays
// log_alpha along W) or the grid columns (decays log_beta along H) of every head.
#pragma once

#include <ATen/core/Tensor.h>

namespace ppma {

// out = M·x along every line, M the line's 1-D mask (out must not alias x).
void scan_mix_kernel_cpu(const at::Tensor& x, const at::Tensor& log_decay, bool along_rows,
                         at::Tensor& out);
void scan_mix_kernel_cuda(const at::Tensor& x, const at::Tensor& log_decay, bool along_rows,
                          at::Tensor& out);

// Gradients of y = M·u along every line, given grad_y: grad_u = M·grad_y (M is symmetric) and
// grad_log_decay (BH, H, W), every element written.
void scan_mix_backward_kernel_cpu(const at::Tensor& u, const at::Tensor& grad_y,
                                  const at::Tensor& log_decay, bool along_rows,
                                  at::Tensor& grad_u, at::Tensor& grad_log_decay);
void scan_mix_backward_kernel_cuda(const at::Tensor& u, const at::Tensor& grad_y,
                                   const at::Tensor& log_decay, bool along_rows,
                                   at::Tensor& grad_u, at::Tensor& grad_log_decay);

}  // namespace ppma
