// The decay tables and the reverse line cumsum of decay_tables.h on CUDA tensors: one thread
// per line, sequential, so both are deterministic bit for bit, and nothing syncs the host.
#include <ATen/ATen.h>

#include "../decay_tables.h"
#include "cuda_common.cuh"

namespace ppma {
namespace cuda {
namespace {

constexpr int kThreads = 128;

// Ca (cumsum along each row) or Cb (along each column), or their reverse versions (the
// gradient of a cumsum), one thread per line, sequential: deterministic bit for bit.
template <typename acc_t>
__global__ void line_cumsum_kernel(const acc_t* __restrict__ src, acc_t* __restrict__ dst,
                                   Lines lines, int64_t num_lines, bool reverse) {
  const int64_t line = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (line >= num_lines) return;
  acc_t acc = 0;
  for (int64_t step = 0; step < lines.n; ++step) {
    const int64_t x = reverse ? lines.n - 1 - step : step;
    const int64_t idx = lines.token(line, x);
    acc += src[idx];
    dst[idx] = acc;
  }
}

// The decay tables of docs/design.md §1 and §2.7 along each line: sums of the finite log
// decays, leaving out the line's first one (it never enters the mask), and the running count
// of −inf log decays (decays of 0, which block every path through their step). One thread per
// line, sequential: deterministic bit for bit. Values are checked by the Python entry points
// (ppma_ops/value_checks.py), on CUDA tensors only when asked for: that costs a device sync.
template <typename acc_t>
__global__ void decay_table_kernel(const acc_t* __restrict__ src, acc_t* __restrict__ sums,
                                   acc_t* __restrict__ counts, Lines lines, int64_t num_lines) {
  const int64_t line = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (line >= num_lines) return;
  acc_t sum = 0, blocked = 0;
  for (int64_t x = 0; x < lines.n; ++x) {
    const int64_t idx = lines.token(line, x);
    const acc_t a = src[idx];
    if (x > 0 && a == -INFINITY) {
      blocked += acc_t(1);
    } else if (x > 0) {
      sum += a;
    }
    sums[idx] = sum;
    counts[idx] = blocked;
  }
}

// (BH, H, W) log decays in `src` → (sums, counts) along W (rows) or H (columns), same layout.
void line_tables(const at::Tensor& src, bool along_rows, at::Tensor& sums, at::Tensor& counts) {
  const int64_t H = src.size(1), W = src.size(2);
  const Lines lines = Lines::of(along_rows, H, W);
  const int64_t num_lines = src.size(0) * lines.lines_per_head;
  if (src.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "ppma_decay_tables", [&] {
    decay_table_kernel<scalar_t>
        <<<blocks_for(num_lines, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            src.const_data_ptr<scalar_t>(), sums.mutable_data_ptr<scalar_t>(),
            counts.mutable_data_ptr<scalar_t>(), lines, num_lines);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda

DecayTables decay_tables_cuda(const at::Tensor& log_alpha, const at::Tensor& log_beta,
                              at::ScalarType acc) {
  const int64_t BH = log_alpha.size(0) * log_alpha.size(1);
  const int64_t H = log_alpha.size(2), W = log_alpha.size(3);
  const at::Tensor la = log_alpha.to(acc).contiguous().view({BH, H, W});
  const at::Tensor lb = log_beta.to(acc).contiguous().view({BH, H, W});
  DecayTables t{at::empty_like(la), at::empty_like(lb), at::empty_like(la), at::empty_like(lb)};
  cuda::line_tables(la, /*along_rows=*/true, t.ca, t.na);
  cuda::line_tables(lb, /*along_rows=*/false, t.cb, t.nb);
  return t;
}

at::Tensor reverse_line_cumsum_cuda(const at::Tensor& t, bool along_rows) {
  const int64_t H = t.size(-2), W = t.size(-1);
  const at::Tensor src = t.contiguous();
  at::Tensor dst = at::empty_like(src);
  const cuda::Lines lines = cuda::Lines::of(along_rows, H, W);
  const int64_t num_lines = (H * W == 0 ? 0 : src.numel() / (H * W)) * lines.lines_per_head;
  if (num_lines == 0) return dst;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "ppma_reverse_line_cumsum", [&] {
    cuda::line_cumsum_kernel<scalar_t><<<cuda::blocks_for(num_lines, cuda::kThreads),
                                         cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), lines, num_lines,
        /*reverse=*/true);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dst;
}

}  // namespace ppma
