// The polyline scan's CUDA kernels (docs/design.md §1, Theorem 2 and Corollary 2), behind the
// entry points of polyline_scan_kernel.h (called by the host code in csrc/polyline_scan.cpp).
//
// L = L_H·L_V: y = L·x mixes every grid column with B_l, then every grid row with A_i; Lᵀ·x
// mixes rows first. One thread scans one (line, channel) with the shared line math of
// scan_math.h (the CPU kernels run the same functions), so consecutive threads touch
// consecutive channels. The decay gradient of a line sums over channels: each thread writes its
// channel's share to a (c, B·heads·H·W) scratch, summed afterwards in channel order, so
// results are deterministic without atomics.
#include <ATen/ATen.h>

#include "../polyline_scan_kernel.h"
#include "../scan_math.h"
#include "cuda_common.cuh"

namespace ppma {
namespace cuda {
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

}  // namespace
}  // namespace cuda

void scan_mix_kernel_cuda(const at::Tensor& x, const at::Tensor& log_decay, bool along_rows,
                          at::Tensor& out) {
  using namespace cuda;
  const int64_t c = x.size(3);
  const Lines lines = Lines::of(along_rows, x.size(1), x.size(2));
  const int64_t num_lines = x.size(0) * lines.lines_per_head;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ppma_polyline_scan", [&] {
    scan_mix_kernel<scalar_t><<<blocks_for(num_lines * c, kThreads), kThreads, 0,
                                c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        log_decay.const_data_ptr<scalar_t>(), lines, num_lines, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void scan_mix_backward_kernel_cuda(const at::Tensor& u, const at::Tensor& grad_y,
                                   const at::Tensor& log_decay, bool along_rows,
                                   at::Tensor& grad_u, at::Tensor& grad_log_decay) {
  using namespace cuda;
  const int64_t c = u.size(3), table_size = log_decay.numel();
  const Lines lines = Lines::of(along_rows, u.size(1), u.size(2));
  const int64_t num_lines = u.size(0) * lines.lines_per_head;
  at::Tensor parts = at::empty({c, table_size}, u.options());  // each channel's share
  at::Tensor fu = at::empty_like(u);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "ppma_polyline_scan_backward", [&] {
    scan_mix_backward_kernel<scalar_t><<<blocks_for(num_lines * c, kThreads), kThreads, 0,
                                         stream>>>(
        u.const_data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(),
        grad_u.mutable_data_ptr<scalar_t>(), parts.mutable_data_ptr<scalar_t>(),
        fu.mutable_data_ptr<scalar_t>(), log_decay.const_data_ptr<scalar_t>(), lines, num_lines,
        c, table_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_channel_parts_kernel<scalar_t><<<blocks_for(table_size, kThreads), kThreads, 0, stream>>>(
        parts.const_data_ptr<scalar_t>(), c, table_size,
        grad_log_decay.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ppma
