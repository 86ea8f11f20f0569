// Scalar tile math of vanilla polyline attention, shared by the CPU kernels (tails and
// reductions) and, under nvcc, the CUDA kernels. Notation of docs/design.md §1: query u = (i, j),
// key v = (k, l); Ca = cumsum of log_alpha along each row, Cb = cumsum of log_beta along
// each column, both H×W.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

// Internal linkage: this header is compiled into every per-ISA kernel object; with external
// linkage the linker could keep an AVX-512 copy for callers on CPUs without it.
namespace ppma {
namespace polyline {
namespace {

// log L(u, v) = −|Ca[i,j] − Ca[i,l]| − |Cb[i,l] − Cb[k,l]|  (V2H path, mask M).
// The transposed mask Mᵀ(u, v) = M(v, u) is the same function of
// (Ca[k,l], Ca[k,j], Cb[k,j], Cb[i,j]).
template <typename T>
PPMA_HOST_DEVICE inline T log_mask(T ca_row_a, T ca_row_b, T cb_col_a, T cb_col_b) {
  return -std::abs(ca_row_a - ca_row_b) - std::abs(cb_col_a - cb_col_b);
}

// Blocked paths (docs/design.md §2.7). When some log decays are −inf, Ca and Cb hold the sums
// of the finite log decays and Na, Nb count the −inf ones so far along each row / column. A
// path is open exactly when the counts at the two ends of both legs agree (the operands in
// log_mask's order, counts for sums); its mask is then log_mask of the finite sums, exact (no
// −inf − (−inf)); a blocked path has log mask −inf, a mask entry of exactly 0.
template <typename T>
PPMA_HOST_DEVICE inline bool path_open(T na_row_a, T na_row_b, T nb_col_a, T nb_col_b) {
  return na_row_a == na_row_b && nb_col_a == nb_col_b;
}

// exp(x − m) for a score x of an online softmax whose running maximum is m ≥ x. A blocked
// score (x = −inf) weighs 0 also while every key so far was blocked (m = −inf), where
// exp(−inf − (−inf)) would be NaN.
template <typename T>
PPMA_HOST_DEVICE inline T online_softmax_weight(T x, T m) {
  using std::exp;
  return x == -INFINITY ? T(0) : exp(x - m);
}

// d|x|/dx with the value 0 at x = 0, as torch.abs's gradient: decays that are exactly 1
// (log decay 0) make cumsum differences vanish and then contribute no mask gradient.
template <typename T>
PPMA_HOST_DEVICE inline T abs_grad(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

// Online softmax: the factor that rescales a running sum/accumulator when the running
// maximum rises from m_old to m_new (m_old = −inf at the start gives 0).
template <typename T>
PPMA_HOST_DEVICE inline T rescale_factor(T m_old, T m_new) {
  return m_old == -INFINITY ? T(0) : std::exp(m_old - m_new);
}

// Softmax backward for one entry: dS = P · (dP − rowsum), rowsum_u = Σ_v P(u,v)·dP(u,v).
template <typename T>
PPMA_HOST_DEVICE inline T softmax_grad(T p, T dp, T rowsum) {
  return p * (dp - rowsum);
}

// Tiles of the flattened row-major token range [0, H·W): either several whole grid rows or,
// when a row is longer than the target, an equal split of one row. Keeping tiles aligned to
// rows gives each tile a fixed set of grid rows, so per-row mask-gradient partials can be
// reduced in a fixed order (deterministic, no atomics).
struct Tiling {
  int64_t H = 0, W = 0;
  int64_t rows_per_tile = 1;  // whole rows per tile (1 when rows are split)
  int64_t segs_per_row = 1;   // pieces per row (1 when tiles hold whole rows)
  int64_t seg_len = 0;        // piece length when rows are split
  int64_t count = 0;          // number of tiles
  int64_t max_len = 0;        // largest tile, in tokens

  PPMA_HOST_DEVICE Tiling() {}
  PPMA_HOST_DEVICE Tiling(int64_t h, int64_t w, int64_t target) : H(h), W(w) {
    if (w <= target) {
      rows_per_tile = target / w;
      if (rows_per_tile < 1) rows_per_tile = 1;
      if (rows_per_tile > h) rows_per_tile = h;
      count = (h + rows_per_tile - 1) / rows_per_tile;
      max_len = rows_per_tile * w;
    } else {
      segs_per_row = (w + target - 1) / target;
      seg_len = (w + segs_per_row - 1) / segs_per_row;
      count = h * segs_per_row;
      max_len = seg_len;
    }
  }
  // First grid row of tile t, and how many rows it touches.
  PPMA_HOST_DEVICE int64_t first_row(int64_t t) const {
    return segs_per_row == 1 ? t * rows_per_tile : t / segs_per_row;
  }
  PPMA_HOST_DEVICE int64_t num_rows(int64_t t) const {
    if (segs_per_row != 1) return 1;
    const int64_t r0 = t * rows_per_tile;
    return (r0 + rows_per_tile <= H ? rows_per_tile : H - r0);
  }
  // Flat token range [begin, end) of tile t.
  PPMA_HOST_DEVICE void range(int64_t t, int64_t* begin, int64_t* end) const {
    if (segs_per_row == 1) {
      *begin = t * rows_per_tile * W;
      const int64_t e = (t + 1) * rows_per_tile * W;
      *end = e < H * W ? e : H * W;
    } else {
      const int64_t row = t / segs_per_row, seg = t % segs_per_row;
      *begin = row * W + seg * seg_len;
      const int64_t e = seg * seg_len + seg_len;
      *end = row * W + (e < W ? e : W);
    }
  }
};

}  // namespace
}  // namespace polyline
}  // namespace ppma
