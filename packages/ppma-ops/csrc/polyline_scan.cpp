// ppma::polyline_scan: y = L·x (or Lᵀ·x) for the polyline mask L (docs/design.md §1), O(N·c).
//
// L = L_H·L_V (Theorem 1): y = L·x mixes every column with B_l, then every row with A_i;
// Lᵀ·x = L_V·L_H·x mixes rows first. Each 1-D mix is a forward plus a backward scan
// (scan_math.h). Backward: dx = Lᵀ·dy (resp. L·dy), and the decay gradients come from the
// forward/adjoint states of each 1-D mix, recomputing the intermediate grid (O(N·c), cheaper
// than keeping it). Work is split over batch × heads × lines; every output element is written
// by exactly one task, so results do not depend on the thread count (no atomics).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "op_args.h"
#include "scan_math.h"

namespace ppma {
namespace {

struct ScanGrid {
  int64_t heads;  // B · heads
  int64_t H, W, c;
};

void check_scan_args(const char* op, const at::Tensor& x, const at::Tensor& log_alpha,
                     const at::Tensor& log_beta) {
  TORCH_CHECK(x.dim() == 5, op, ": x must have shape (B, heads, H, W, c), got ", x.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"log_alpha", &log_alpha},
                                {"log_beta", &log_beta}}) {
    TORCH_CHECK(t->sizes() == x.sizes().slice(0, 4), op, ": ", name,
                " must have shape (B, heads, H, W) = ", x.sizes().slice(0, 4), ", got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ",
                t->scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(),
                " but x is on ", x.device());
  }
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), op, ": the CPU kernel got x on ", x.device());
}

ScanGrid grid_of(const at::Tensor& x) {
  return {x.size(0) * x.size(1), x.size(2), x.size(3), x.size(4)};
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

at::Tensor polyline_scan_cpu(const at::Tensor& x, const at::Tensor& log_alpha,
                             const at::Tensor& log_beta, bool transpose) {
  check_scan_args("polyline_scan", x, log_alpha, log_beta);
  check_log_decay_values("polyline_scan", log_alpha, log_beta);
  const auto acc = accumulation_type(x.scalar_type());
  const at::Tensor xa = x.to(acc).contiguous();
  const at::Tensor la = log_alpha.to(acc).contiguous();
  const at::Tensor lb = log_beta.to(acc).contiguous();
  at::Tensor mid = at::empty_like(xa);
  at::Tensor out = at::empty_like(xa);
  if (xa.numel() == 0) return out.to(x.scalar_type());
  const ScanGrid g = grid_of(xa);
  AT_DISPATCH_FLOATING_TYPES(acc, "polyline_scan", [&] {
    const auto* xp = xa.const_data_ptr<scalar_t>();
    const auto* lap = la.const_data_ptr<scalar_t>();
    const auto* lbp = lb.const_data_ptr<scalar_t>();
    auto* mp = mid.mutable_data_ptr<scalar_t>();
    auto* op = out.mutable_data_ptr<scalar_t>();
    if (!transpose) {  // L·x = L_H·(L_V·x)
      mix_columns(xp, mp, lbp, g);
      mix_rows<scalar_t>(mp, op, lap, g);
    } else {  // Lᵀ·x = L_V·(L_H·x)
      mix_rows(xp, mp, lap, g);
      mix_columns<scalar_t>(mp, op, lbp, g);
    }
  });
  return out.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> polyline_scan_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& log_alpha,
    const at::Tensor& log_beta, bool transpose) {
  check_scan_args("polyline_scan_backward", x, log_alpha, log_beta);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "polyline_scan_backward: grad_y must have x's shape ",
              x.sizes(), ", got ", grad_y.sizes());
  const auto acc = accumulation_type(x.scalar_type());
  const at::Tensor xa = x.to(acc).contiguous();
  const at::Tensor gy = grad_y.to(acc).contiguous();
  const at::Tensor la = log_alpha.to(acc).contiguous();
  const at::Tensor lb = log_beta.to(acc).contiguous();
  at::Tensor mid = at::empty_like(xa);       // the intermediate grid of the forward pass
  at::Tensor grad_mid = at::empty_like(xa);  // its gradient
  at::Tensor grad_x = at::empty_like(xa);
  at::Tensor grad_la = at::zeros_like(la);
  at::Tensor grad_lb = at::zeros_like(lb);
  if (xa.numel() > 0) {
    const ScanGrid g = grid_of(xa);
    AT_DISPATCH_FLOATING_TYPES(acc, "polyline_scan_backward", [&] {
      const auto* xp = xa.const_data_ptr<scalar_t>();
      const auto* gp = gy.const_data_ptr<scalar_t>();
      const auto* lap = la.const_data_ptr<scalar_t>();
      const auto* lbp = lb.const_data_ptr<scalar_t>();
      auto* mp = mid.mutable_data_ptr<scalar_t>();
      auto* gmp = grad_mid.mutable_data_ptr<scalar_t>();
      auto* gxp = grad_x.mutable_data_ptr<scalar_t>();
      auto* glap = grad_la.mutable_data_ptr<scalar_t>();
      auto* glbp = grad_lb.mutable_data_ptr<scalar_t>();
      if (!transpose) {  // y = L_H·z, z = L_V·x
        mix_columns(xp, mp, lbp, g);
        mix_rows_backward<scalar_t>(mp, gp, gmp, glap, lap, g);
        mix_columns_backward<scalar_t>(xp, gmp, gxp, glbp, lbp, g);
      } else {  // y = L_V·w, w = L_H·x
        mix_rows(xp, mp, lap, g);
        mix_columns_backward<scalar_t>(mp, gp, gmp, glbp, lbp, g);
        mix_rows_backward<scalar_t>(xp, gmp, gxp, glap, lap, g);
      }
    });
  }
  const auto dt = x.scalar_type();
  return {grad_x.to(dt), grad_la.to(dt), grad_lb.to(dt)};
}

}  // namespace
}  // namespace ppma

TORCH_LIBRARY_FRAGMENT(ppma, m) {
  m.def("polyline_scan(Tensor x, Tensor log_alpha, Tensor log_beta, bool transpose) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "polyline_scan_backward(Tensor grad_y, Tensor x, Tensor log_alpha, Tensor log_beta, "
      "bool transpose) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(ppma, CPU, m) {
  m.impl("polyline_scan", &ppma::polyline_scan_cpu);
  m.impl("polyline_scan_backward", &ppma::polyline_scan_backward_cpu);
}
