// Shared by the CUDA kernels of ppma_ops (csrc/cuda/*.cu): argument checks, the accumulation
// dtype, the head-dimension bound used to size per-thread register arrays, launch helpers and
// the "line" geometry (one grid row or one grid column of one head).
//
// Every kernel computes in the accumulation dtype (float32, float64 for float64 inputs): the
// host side converts inputs once (bf16/fp16 → fp32) so each kernel has two instantiations
// (float, double) instead of one per input dtype.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <utility>

namespace ppma::cuda {

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Shapes, dtypes and devices of the attention arguments, naming the offending argument.
// Values (NaN, positive log decays) are checked by the Python entry points
// (ppma_ops.validation): checking them here would cost two device syncs per call.
inline void check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& log_alpha,
                                 const at::Tensor& log_beta) {
  TORCH_CHECK(q.dim() == 5, op, ": q must have shape (B, heads, H, W, d), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have the shape of q ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(v.dim() == 5 && v.sizes().slice(0, 4) == q.sizes().slice(0, 4), op,
              ": v must have shape (B, heads, H, W, c) matching q's ", q.sizes().slice(0, 4),
              ", got ", v.sizes());
  const auto grid = q.sizes().slice(0, 4);
  TORCH_CHECK(log_alpha.sizes() == grid, op, ": log_alpha must have shape (B, heads, H, W) = ",
              grid, ", got ", log_alpha.sizes());
  TORCH_CHECK(log_beta.sizes() == grid, op, ": log_beta must have shape (B, heads, H, W) = ",
              grid, ", got ", log_beta.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": q must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(q.is_cuda(), op, ": the CUDA kernel got q on ", q.device());
  const std::pair<const char*, const at::Tensor*> args[] = {
      {"k", &k}, {"v", &v}, {"log_alpha", &log_alpha}, {"log_beta", &log_beta}};
  for (const auto& [name, t] : args) {
    TORCH_CHECK(t->scalar_type() == dtype, op, ": ", name, " has dtype ", t->scalar_type(),
                " but q has ", dtype);
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device(),
                " but q is on ", q.device());
  }
}

// Same shape/dtype/device as `ref` (a saved tensor or gradient handed to a backward op).
inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       at::IntArrayRef shape, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.sizes() == shape && t.scalar_type() == dtype && t.device() == device, op, ": ",
              name, " must be a ", shape, " ", dtype, " tensor on ", device, ", got ", t.sizes(),
              " ", t.scalar_type(), " on ", t.device());
}

// Contiguous copy in the accumulation dtype (a no-op for contiguous tensors already in it).
inline at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

// Kernels keep one query/key row and its accumulators in registers, in arrays sized by a
// compile-time bound on the head dimensions (d of q/k, c of v). The largest supported is 128.
constexpr int kMaxHeadDim = 128;

#define PPMA_DISPATCH_DIM_BOUND(n, NAME, ...)                                            \
  [&] {                                                                                  \
    if ((n) <= 32) {                                                                     \
      constexpr int NAME = 32;                                                           \
      return __VA_ARGS__();                                                              \
    } else if ((n) <= 64) {                                                              \
      constexpr int NAME = 64;                                                           \
      return __VA_ARGS__();                                                              \
    } else {                                                                             \
      TORCH_CHECK((n) <= ::ppma::cuda::kMaxHeadDim,                                      \
                  "ppma_ops CUDA: head dimensions above 128 are not supported, got ", n); \
      constexpr int NAME = 128;                                                          \
      return __VA_ARGS__();                                                              \
    }                                                                                    \
  }()

#define PPMA_DISPATCH_ACC(acc, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES(acc, NAME, __VA_ARGS__)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 1-D grids only (grid.x allows 2^31 − 1 blocks; y and z would cap at 65535).
inline unsigned int blocks_for(int64_t work, int threads) {
  const int64_t blocks = ceil_div(work, threads);
  TORCH_CHECK(blocks <= 0x7fffffffLL, "ppma_ops CUDA: problem too large for one launch");
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

// Shared memory one block may use on the current device (opt-in limit). Read through the CUDA
// runtime rather than ATen/cuda/CUDAContext.h, whose includes need the cuBLAS/cuSPARSE headers.
inline size_t smem_optin_bytes() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(bytes);
}

// Raises the dynamic shared-memory limit of `kernel` to `bytes` when above the 48 KiB default,
// or fails with a clear message when the device cannot give that much to one block.
template <typename Kernel>
inline void set_dynamic_smem(Kernel kernel, size_t bytes) {
  const size_t optin = smem_optin_bytes();
  TORCH_CHECK(bytes <= optin, "ppma_ops CUDA: a block needs ", bytes,
              " bytes of shared memory, the device allows ", optin);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

// A line of one head's H×W grid: a grid row (n = W) or a grid column (n = H). Token x of line
// `line` (line = head·lines_per_head + index) has flat index base(line) + x·stride, where flat
// indices run over (B·heads, H, W) row-major. The same indexing serves (…, c) tensors (times c)
// and (B·heads, H, W) tables.
struct Lines {
  int64_t N;               // H·W tokens per head
  int64_t lines_per_head;  // H for rows, W for columns
  int64_t line_step;       // W for rows, 1 for columns
  int64_t stride;          // 1 for rows, W for columns
  int64_t n;               // tokens per line: W for rows, H for columns

  static Lines rows(int64_t H, int64_t W) { return {H * W, H, W, 1, W}; }
  static Lines columns(int64_t H, int64_t W) { return {H * W, W, 1, W, H}; }

  __host__ __device__ int64_t base(int64_t line) const {
    return (line / lines_per_head) * N + (line % lines_per_head) * line_step;
  }
  __host__ __device__ int64_t token(int64_t line, int64_t x) const {
    return base(line) + x * stride;
  }
};

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

// (BH, H, W) tables in `src` → their cumsums (or reverse cumsums) along W (rows) or H (columns).
inline at::Tensor line_cumsum(const at::Tensor& src, int64_t BH, int64_t H, int64_t W, bool along_rows,
                       bool reverse) {
  at::Tensor dst = at::empty_like(src);
  const Lines lines = along_rows ? Lines::rows(H, W) : Lines::columns(H, W);
  const int64_t num_lines = BH * lines.lines_per_head;
  if (src.numel() == 0) return dst;
  constexpr int threads = 128;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "ppma_line_cumsum", [&] {
    line_cumsum_kernel<scalar_t>
        <<<blocks_for(num_lines, threads), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), lines, num_lines,
            reverse);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dst;
}

// The decay tables of docs/design.md §1 and §2.7 along each line: sums of the finite log
// decays, leaving out the line's first one (it never enters the mask), and the running count
// of −inf log decays (decays of 0, which block every path through their step). One thread per
// line, sequential: deterministic bit for bit. Values are not checked here (see
// check_attention_args): sums that overflow are refused by the Python entry points.
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
inline std::pair<at::Tensor, at::Tensor> decay_tables(const at::Tensor& src, int64_t BH,
                                                      int64_t H, int64_t W, bool along_rows) {
  at::Tensor sums = at::empty_like(src), counts = at::empty_like(src);
  const Lines lines = along_rows ? Lines::rows(H, W) : Lines::columns(H, W);
  const int64_t num_lines = BH * lines.lines_per_head;
  if (src.numel() == 0) return {sums, counts};
  constexpr int threads = 128;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "ppma_decay_tables", [&] {
    decay_table_kernel<scalar_t>
        <<<blocks_for(num_lines, threads), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            src.const_data_ptr<scalar_t>(), sums.mutable_data_ptr<scalar_t>(),
            counts.mutable_data_ptr<scalar_t>(), lines, num_lines);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, counts};
}

// Log-decay gradients (BH, H, W): exactly 0 at a log decay of −inf (e^a = 0 scales every path
// through it) and at each line's first (it never enters the mask), where reverse cumsums of
// table gradients leave rounding residue. No host sync: plain elementwise ops.
inline at::Tensor finish_decay_grad(at::Tensor grad, const at::Tensor& log_decay,
                                    bool along_rows) {
  grad = grad.masked_fill(at::isneginf(log_decay).reshape(grad.sizes()), 0);
  if (grad.numel() > 0) grad.select(along_rows ? -1 : -2, 0).zero_();
  return grad;
}

}  // namespace ppma::cuda
