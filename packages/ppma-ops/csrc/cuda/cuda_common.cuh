// Shared by the CUDA kernels of ppma_ops (csrc/cuda/*.cu): the head-dimension bound used to
// size per-thread register arrays, launch helpers and the "line" geometry (one grid row or one
// grid column of one head). Argument checks and the conversion to the accumulation dtype
// (float32, float64 for float64 inputs) happen once in the host code (csrc/<op>.cpp), so each
// kernel has two instantiations (float, double) instead of one per input dtype.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ppma::cuda {

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
  static Lines of(bool along_rows, int64_t H, int64_t W) {
    return along_rows ? rows(H, W) : columns(H, W);
  }

  __host__ __device__ int64_t base(int64_t line) const {
    return (line / lines_per_head) * N + (line % lines_per_head) * line_step;
  }
  __host__ __device__ int64_t token(int64_t line, int64_t x) const {
    return base(line) + x * stride;
  }
};

}  // namespace ppma::cuda
