// CPU kernels of the polyline scan (polyline_scan_kernel.h): the line math of scan_math.h over
// every grid row or block of grid columns. Plain loops compiled once (not per instruction set).
// Work is split over batch × heads × lines; every output element is written by exactly one
// task, so results do not depend on the thread count (no atomics).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "polyline_scan_kernel.h"
#include "scan_math.h"

namespace ppma {
namespace {

struct ScanGrid {
  int64_t heads;  // B · heads
  int64_t H, W, c;
};

ScanGrid grid_of(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3)};
}

int64_t row_grain(const ScanGrid& g) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.W * g.c));
}

// Columns are scanned in blocks of adjacent columns so each step reads contiguous memory.
int64_t column_block(const ScanGrid& g) {
  return std::min<int64_t>(g.W, std::max<int64_t>(1, 256 / std::max<int64_t>(1, g.c)));
}

// Small grids stay on one thread: waking the pool costs more than the scan.
int64_t column_grain(const ScanGrid& g) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.H * column_block(g) * g.c));
}

// out[row] = A_i · x[row] for every row (decays log_alpha along W).
template <typename acc_t>
void mix_rows(const acc_t* x, acc_t* out, const acc_t* log_alpha, const ScanGrid& g) {
  at::parallel_for(0, g.heads * g.H, row_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> carry(g.c);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * g.W * g.c;
      scan::mix_line(x + off, out + off, g.W, 1, g.c, g.c, log_alpha + r * g.W, 1, 0,
                     carry.data());
    }
  });
}

// out[:, l] = B_l · x[:, l] for every column (decays log_beta along H).
template <typename acc_t>
void mix_columns(const acc_t* x, acc_t* out, const acc_t* log_beta, const ScanGrid& g) {
  const int64_t bw = column_block(g);
  const int64_t blocks = (g.W + bw - 1) / bw;
  at::parallel_for(0, g.heads * blocks, column_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> carry(bw * g.c);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t head = item / blocks;
      const int64_t l0 = (item % blocks) * bw;
      const int64_t cols = std::min(bw, g.W - l0);
      const int64_t off = head * g.H * g.W * g.c + l0 * g.c;
      scan::mix_line(x + off, out + off, g.H, cols, g.c, g.W * g.c,
                     log_beta + head * g.H * g.W + l0, g.W, 1, carry.data());
    }
  });
}

// Backward of out = A_i·u along every row: grad_u = A_i·gy, grad_log_alpha.
template <typename acc_t>
void mix_rows_backward(const acc_t* u, const acc_t* gy, acc_t* grad_u, acc_t* grad_log_alpha,
                       const acc_t* log_alpha, const ScanGrid& g) {
  at::parallel_for(0, g.heads * g.H, row_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> fu(g.W * g.c), carry_u(g.c), carry_g(g.c);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = r * g.W * g.c;
      scan::mix_line_backward(u + off, gy + off, grad_u + off, grad_log_alpha + r * g.W, g.W, 1,
                              g.c, g.c, log_alpha + r * g.W, 1, 0, fu.data(), g.c,
                              carry_u.data(), carry_g.data());
    }
  });
}

// Backward of out = B_l·u along every column: grad_u = B_l·gy, grad_log_beta.
template <typename acc_t>
void mix_columns_backward(const acc_t* u, const acc_t* gy, acc_t* grad_u, acc_t* grad_log_beta,
                          const acc_t* log_beta, const ScanGrid& g) {
  const int64_t bw = column_block(g);
  const int64_t blocks = (g.W + bw - 1) / bw;
  at::parallel_for(0, g.heads * blocks, column_grain(g), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> fu(g.H * bw * g.c), carry_u(bw * g.c), carry_g(bw * g.c);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t head = item / blocks;
      const int64_t l0 = (item % blocks) * bw;
      const int64_t cols = std::min(bw, g.W - l0);
      const int64_t off = head * g.H * g.W * g.c + l0 * g.c;
      const int64_t doff = head * g.H * g.W + l0;
      scan::mix_line_backward(u + off, gy + off, grad_u + off, grad_log_beta + doff, g.H, cols,
                              g.c, g.W * g.c, log_beta + doff, g.W, 1, fu.data(), cols * g.c,
                              carry_u.data(), carry_g.data());
    }
  });
}

}  // namespace

void scan_mix_kernel_cpu(const at::Tensor& x, const at::Tensor& log_decay, bool along_rows,
                         at::Tensor& out) {
  const ScanGrid g = grid_of(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ppma_polyline_scan", [&] {
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* dp = log_decay.const_data_ptr<scalar_t>();
    auto* op = out.mutable_data_ptr<scalar_t>();
    along_rows ? mix_rows(xp, op, dp, g) : mix_columns(xp, op, dp, g);
  });
}

void scan_mix_backward_kernel_cpu(const at::Tensor& u, const at::Tensor& grad_y,
                                  const at::Tensor& log_decay, bool along_rows,
                                  at::Tensor& grad_u, at::Tensor& grad_log_decay) {
  const ScanGrid g = grid_of(u);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "ppma_polyline_scan_backward", [&] {
    const auto* up = u.const_data_ptr<scalar_t>();
    const auto* gp = grad_y.const_data_ptr<scalar_t>();
    const auto* dp = log_decay.const_data_ptr<scalar_t>();
    auto* gup = grad_u.mutable_data_ptr<scalar_t>();
    auto* gdp = grad_log_decay.mutable_data_ptr<scalar_t>();
    along_rows ? mix_rows_backward(up, gp, gup, gdp, dp, g)
               : mix_columns_backward(up, gp, gup, gdp, dp, g);
  });
}

}  // namespace ppma
