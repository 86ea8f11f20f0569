// ppma::polyline_scan / polyline_scan_backward on CUDA: y = L·x (or Lᵀ·x) in O(N·c) by scans
// (docs/design.md §1, Theorem 2 and Corollary 2), for the schemas csrc/polyline_scan.cpp defines.
//
// L = L_H·L_V: y = L·x mixes every grid column with B_l, then every grid row with A_i; Lᵀ·x
// mixes rows first. One thread scans one (line, channel) with the shared line math of
// scan_math.h (the CPU kernels run the same functions), so consecutive threads touch
// consecutive channels. The decay gradient of a line sums over channels: each thread writes its
// channel's share to a (c, B·heads·H·W) scratch, summed afterwards in channel order, so
// results are deterministic without atomics.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../scan_math.h"
#include "cuda_common.cuh"

namespace ppma::cuda {
namespace {

constexpr int kThreads = 128;

// out = M·x along every line (one thread per line and channel).
template <typename acc_t>
__global__ void scan_mix_kernel(const acc_t* __restrict__ x, acc_t* __restrict__ out,
                                const acc_t* __restrict__ log_decay, Lines lines,
                                int64_t num_lines, int64_t c) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= num_lines * c) return;
  const int64_t e = idx % c, line = idx / c;
  const int64_t base = lines.base(line);
  const int64_t off = base * c + e;
  acc_t carry[1];
  scan::mix_line(x + off, out + off, lines.n, /*groups=*/1, /*c=*/1, lines.stride * c,
                 log_decay + base, lines.stride, /*dgroup=*/0, carry);
}

// Gradients of y = M(dec)·u along every line: grad_u = M·gy, and this channel's share of the
// decay gradient in grad_dec_parts[e] (laid out like the decay table).
template <typename acc_t>
__global__ void scan_mix_backward_kernel(const acc_t* __restrict__ u, const acc_t* __restrict__ gy,
                                         acc_t* __restrict__ grad_u,
                                         acc_t* __restrict__ grad_dec_parts,
                                         acc_t* __restrict__ fu_scratch,
                                         const acc_t* __restrict__ log_decay, Lines lines,
                                         int64_t num_lines, int64_t c, int64_t table_size) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= num_lines * c) return;
  const int64_t e = idx % c, line = idx / c;
  const int64_t base = lines.base(line);
  const int64_t off = base * c + e;
  const int64_t step = lines.stride * c;
  acc_t carry_u[1], carry_g[1];
  scan::mix_line_backward(u + off, gy + off, grad_u + off, grad_dec_parts + e * table_size + base,
                          lines.n, /*groups=*/1, /*c=*/1, step, log_decay + base, lines.stride,
                          /*dgroup=*/0, fu_scratch + off, step, carry_u, carry_g);
}

// grad[t] = Σ_e parts[e, t], in channel order.
template <typename acc_t>
__global__ void sum_channel_parts_kernel(const acc_t* __restrict__ parts, int64_t c,
                                         int64_t table_size, acc_t* __restrict__ grad) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= table_size) return;
  acc_t sum = 0;
  for (int64_t e = 0; e < c; ++e) sum += parts[e * table_size + t];
  grad[t] = sum;
}

struct ScanProblem {
  int64_t BH, H, W, c;
  int64_t table_size() const { return BH * H * W; }
};

void mix(const at::Tensor& x, at::Tensor& out, const at::Tensor& log_decay, const Lines& lines,
         const ScanProblem& p) {
  const int64_t num_lines = p.BH * lines.lines_per_head;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ppma_polyline_scan", [&] {
    scan_mix_kernel<scalar_t><<<blocks_for(num_lines * p.c, kThreads), kThreads, 0,
                                c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        log_decay.const_data_ptr<scalar_t>(), lines, num_lines, p.c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void mix_backward(const at::Tensor& u, const at::Tensor& gy, at::Tensor& grad_u,
                  at::Tensor& grad_log_decay, const at::Tensor& log_decay, const Lines& lines,
                  const ScanProblem& p) {
  const int64_t num_lines = p.BH * lines.lines_per_head;
  at::Tensor parts = at::empty({p.c, p.table_size()}, u.options());
  at::Tensor fu = at::empty_like(u);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "ppma_polyline_scan_backward", [&] {
    scan_mix_backward_kernel<scalar_t>
        <<<blocks_for(num_lines * p.c, kThreads), kThreads, 0, stream>>>(
            u.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(),
            grad_u.mutable_data_ptr<scalar_t>(), parts.mutable_data_ptr<scalar_t>(),
            fu.mutable_data_ptr<scalar_t>(), log_decay.const_data_ptr<scalar_t>(), lines,
            num_lines, p.c, p.table_size());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_channel_parts_kernel<scalar_t>
        <<<blocks_for(p.table_size(), kThreads), kThreads, 0, stream>>>(
            parts.const_data_ptr<scalar_t>(), p.c, p.table_size(),
            grad_log_decay.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_scan_args(const char* op, const at::Tensor& x, const at::Tensor& log_alpha,
                     const at::Tensor& log_beta) {
  TORCH_CHECK(x.dim() == 5, op, ": x must have shape (B, heads, H, W, c), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": x must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x.is_cuda(), op, ": the CUDA kernel got x on ", x.device());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"log_alpha", &log_alpha},
                                {"log_beta", &log_beta}}) {
    TORCH_CHECK(t->sizes() == x.sizes().slice(0, 4), op, ": ", name,
                " must have shape (B, heads, H, W) = ", x.sizes().slice(0, 4), ", got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == dtype, op, ": ", name, " has dtype ", t->scalar_type(),
                " but x has ", dtype);
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(),
                " but x is on ", x.device());
  }
}

at::Tensor polyline_scan_cuda(const at::Tensor& x, const at::Tensor& log_alpha,
                              const at::Tensor& log_beta, bool transpose) {
  check_scan_args("polyline_scan", x, log_alpha, log_beta);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = accumulation_type(x.scalar_type());
  const at::Tensor xa = as_acc(x, acc), la = as_acc(log_alpha, acc), lb = as_acc(log_beta, acc);
  at::Tensor out = at::empty_like(xa);
  if (xa.numel() == 0) return out.to(x.scalar_type());
  const ScanProblem p{x.size(0) * x.size(1), x.size(2), x.size(3), x.size(4)};
  const Lines rows = Lines::rows(p.H, p.W), cols = Lines::columns(p.H, p.W);
  at::Tensor mid = at::empty_like(xa);
  if (!transpose) {  // L·x = L_H·(L_V·x)
    mix(xa, mid, lb, cols, p);
    mix(mid, out, la, rows, p);
  } else {  // Lᵀ·x = L_V·(L_H·x)
    mix(xa, mid, la, rows, p);
    mix(mid, out, lb, cols, p);
  }
  return out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> polyline_scan_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& log_alpha,
    const at::Tensor& log_beta, bool transpose) {
  check_scan_args("polyline_scan_backward", x, log_alpha, log_beta);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.device() == x.device(),
              "polyline_scan_backward: grad_y must have x's shape ", x.sizes(), " on ",
              x.device(), ", got ", grad_y.sizes(), " on ", grad_y.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = accumulation_type(x.scalar_type());
  const at::Tensor xa = as_acc(x, acc), gy = as_acc(grad_y, acc);
  const at::Tensor la = as_acc(log_alpha, acc), lb = as_acc(log_beta, acc);
  at::Tensor grad_x = at::zeros_like(xa);
  at::Tensor grad_la = at::zeros_like(la), grad_lb = at::zeros_like(lb);
  if (xa.numel() > 0) {
    const ScanProblem p{x.size(0) * x.size(1), x.size(2), x.size(3), x.size(4)};
    const Lines rows = Lines::rows(p.H, p.W), cols = Lines::columns(p.H, p.W);
    at::Tensor mid = at::empty_like(xa);       // the intermediate grid of the forward pass
    at::Tensor grad_mid = at::empty_like(xa);  // its gradient
    if (!transpose) {  // y = L_H·z, z = L_V·x
      mix(xa, mid, lb, cols, p);
      mix_backward(mid, gy, grad_mid, grad_la, la, rows, p);
      mix_backward(xa, grad_mid, grad_x, grad_lb, lb, cols, p);
    } else {  // y = L_V·w, w = L_H·x
      mix(xa, mid, la, rows, p);
      mix_backward(mid, gy, grad_mid, grad_lb, lb, cols, p);
      mix_backward(xa, grad_mid, grad_x, grad_la, la, rows, p);
    }
  }
  const auto dt = x.scalar_type();
  return {grad_x.to(dt), grad_la.to(dt), grad_lb.to(dt)};
}

}  // namespace
}  // namespace ppma::cuda

TORCH_LIBRARY_IMPL(ppma, CUDA, m) {
  m.impl("polyline_scan", &ppma::cuda::polyline_scan_cuda);
  m.impl("polyline_scan_backward", &ppma::cuda::polyline_scan_backward_cuda);
}
