// CPU kernels of criss-cross polyline attention (DESIGN §2.4), compiled once per instruction
// set (CPU_CAPABILITY = DEFAULT / AVX2 / AVX512) like ATen's kernels.
//
// Every line (grid row or grid column of one head) is one task: its n×n score tile comes from
// a tile GEMM, the mask and the softmax are fused into one pass over the tile while it is in
// cache, and the probabilities are kept for the backward pass (O(N·(H + W)) per head, which is
// 7× the size of V at 56×56, d 16 — recomputing them would add about a fifth to the backward).
//
// Forward, with X₁ = R(V) and X₂ = Cc(V):
//   rows:     Â_i, X₁ rows = Â_i V_i
//   columns:  B̂_l, X₂ columns = B̂_l V_l, out columns = ½ B̂_l X₁_l
//   rows:     out rows += ½ Â_i X₂_i
// Backward, with g = dout:
//   columns:  dX₁ = ½ B̂ᵀ g
//   rows:     dX₂ = ½ Âᵀ g; dÂ = dX₁ Vᵀ + ½ g X₂ᵀ; dV = Âᵀ dX₁; dS → dq, dk, d log_alpha
//   columns:  dB̂ = ½ g X₁ᵀ + dX₂ Vᵀ; dV += B̂ᵀ dX₂; dS → dq, dk (accumulated), d log_beta
// Each phase writes disjoint lines, so no atomics are needed and results are bitwise
// reproducible for any thread count.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "criss_cross_attention_kernel.h"
#include "criss_cross_math.h"
#include "fresh_memory.h"
#include "tile_gemm.h"

namespace ppma {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Geometry of one head's (H, W, ·) grid: row lines and column lines.
struct Grid {
  int64_t BH, H, W, d, c;
};

// Fused mask + softmax over an n×n tile (leading dimension n) of one line: for every query
// row x, S[x, :] ← softmax(S[x, :] − |C[x] − C[:]|).
template <typename T>
void masked_softmax_tile(T* s, int64_t n, const T* C) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const int64_t nv = n - n % L;
  for (int64_t row = 0; row < n; ++row) {
    T* sr = s + row * n;
    const Vec cq(C[row]);
    Vec vmax(-std::numeric_limits<T>::infinity());
    for (int64_t x = 0; x < nv; x += L) {
      const Vec v = Vec::loadu(sr + x) - (cq - Vec::loadu(C + x)).abs();
      v.store(sr + x);
      vmax = at::vec::maximum(vmax, v);
    }
    T m = at::vec::vec_reduce_all<T>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); },
                                     vmax);
    for (int64_t x = nv; x < n; ++x) {
      sr[x] += criss_cross::log_mask(C[row], C[x]);
      m = std::max(m, sr[x]);
    }
    const Vec vm(m);
    Vec vsum(T(0));
    for (int64_t x = 0; x < nv; x += L) {
      const Vec e = (Vec::loadu(sr + x) - vm).exp_u20();
      e.store(sr + x);
      vsum = vsum + e;
    }
    T sum = at::vec::vec_reduce_all<T>([](const Vec& a, const Vec& b) { return a + b; }, vsum);
    for (int64_t x = nv; x < n; ++x) {
      sr[x] = std::exp(sr[x] - m);
      sum += sr[x];
    }
    const Vec inv(T(1) / sum);
    for (int64_t x = 0; x < nv; x += L) (Vec::loadu(sr + x) * inv).store(sr + x);
    for (int64_t x = nv; x < n; ++x) sr[x] *= T(1) / sum;
  }
}

// In place over an n×n tile: dp ← p ⊙ (dp − rowsum(p ⊙ dp)), then the tile's contribution to
// the gradient of its line's cumsum table, dC (n values, overwritten). The vector loop fuses
// the softmax backward with criss_cross::mask_grad_row: with s = sign(x − row) and g the
// new dp[x] where C[x] ≠ C[row], dC[x] += s·g and dC[row] −= Σ s·g.
template <typename T>
void softmax_and_mask_backward_tile(const T* p, T* dp, const T* C, int64_t n, T* dC) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const int64_t nv = n - n % L;
  T lane[L];
  for (int64_t e = 0; e < L; ++e) lane[e] = T(e);
  const Vec iota = Vec::loadu(lane), zero(T(0)), one(T(1)), minus_one(T(-1));
  std::fill(dC, dC + n, T(0));
  for (int64_t row = 0; row < n; ++row) {
    const T* pr = p + row * n;
    T* dr = dp + row * n;
    Vec vdot(T(0));
    for (int64_t x = 0; x < nv; x += L) vdot = vdot + Vec::loadu(pr + x) * Vec::loadu(dr + x);
    T dot = at::vec::vec_reduce_all<T>([](const Vec& a, const Vec& b) { return a + b; }, vdot);
    for (int64_t x = nv; x < n; ++x) dot += pr[x] * dr[x];
    const Vec vd(dot), c_row(C[row]), v_row(static_cast<T>(row));
    Vec own(T(0));
    for (int64_t x = 0; x < nv; x += L) {
      const Vec ds = Vec::loadu(pr + x) * (Vec::loadu(dr + x) - vd);
      ds.store(dr + x);
      const Vec g = Vec::blendv(zero, ds, Vec::loadu(C + x) != c_row);
      const Vec idx = iota + Vec(static_cast<T>(x));
      const Vec sign = Vec::blendv(Vec::blendv(zero, one, idx > v_row), minus_one, idx < v_row);
      const Vec sg = sign * g;
      (Vec::loadu(dC + x) + sg).store(dC + x);
      own = own - sg;
    }
    T own_sum = at::vec::vec_reduce_all<T>([](const Vec& a, const Vec& b) { return a + b; }, own);
    for (int64_t x = nv; x < n; ++x) {
      dr[x] = pr[x] * (dr[x] - dot);
      const T g = C[x] != C[row] ? dr[x] : T(0);
      if (x < row) {
        dC[x] -= g;
        own_sum += g;
      } else if (x > row) {
        dC[x] += g;
        own_sum -= g;
      }
    }
    dC[row] += own_sum;
  }
}

// Column lines are processed kColumnBlock at a time, from contiguous copies. In place, a
// column's H rows lie W·width elements apart (3.5 KB at W = 56, d = 16): every row is a demand
// miss in its own page, which the hardware prefetchers do not follow, and column phases ran at
// half the speed of row phases. Copying a block of adjacent columns reads kColumnBlock·width
// contiguous elements per grid row instead.
constexpr int64_t kColumnBlock = 8;

// dst[0, width) = src[0, width), inlined. The copies of the column phases are one token's
// features (64 bytes at d = 16), millions per call: std::copy_n called memmove for each, and
// the calls took a tenth of the op's CPU time in profiles.
template <typename T>
inline void copy_token(const T* src, int64_t width, T* dst) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  int64_t e = 0;
  for (; e + L <= width; e += L) Vec::loadu(src + e).store(dst + e);
  if (e < width) Vec::loadu(src + e, width - e).store(dst + e, width - e);
}

// Columns [l0, l0 + n) of one head's (H, W, width) grid → n contiguous (H, width) tiles.
template <typename T>
void gather_columns(const T* head, int64_t H, int64_t W, int64_t width, int64_t l0, int64_t n,
                    T* tiles) {
  for (int64_t i = 0; i < H; ++i) {
    const T* row = head + (i * W + l0) * width;
    for (int64_t j = 0; j < n; ++j) copy_token(row + j * width, width, tiles + (j * H + i) * width);
  }
}

// Task `task` of a column phase: head bh, columns [l0, l0 + n) (n < kColumnBlock for the last
// block of a head when kColumnBlock does not divide W).
struct ColumnBlock {
  static int64_t count(int64_t W) { return (W + kColumnBlock - 1) / kColumnBlock; }
  ColumnBlock(int64_t task, int64_t W)
      : bh(task / count(W)),
        l0(task % count(W) * kColumnBlock),
        n(std::min(kColumnBlock, W - l0)) {}
  int64_t bh, l0, n;
};

// The inverse of gather_columns: n (H, width) tiles back into columns [l0, l0 + n).
template <typename T>
void scatter_columns(const T* tiles, int64_t H, int64_t W, int64_t width, int64_t l0, int64_t n,
                     T* head) {
  for (int64_t i = 0; i < H; ++i) {
    T* row = head + (i * W + l0) * width;
    for (int64_t j = 0; j < n; ++j) copy_token(tiles + (j * H + i) * width, width, row + j * width);
  }
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& ca, const at::Tensor& cb, T scale, at::Tensor& out,
                  at::Tensor& row_probs, at::Tensor& col_probs, at::Tensor& rows_v,
                  at::Tensor& cols_v) {
  const Grid g{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3)};
  const int64_t H = g.H, W = g.W, d = g.d, c = g.c;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* cap = ca.const_data_ptr<T>();
  const T* cbp = cb.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  T* rp = row_probs.mutable_data_ptr<T>();
  T* cp = col_probs.mutable_data_ptr<T>();
  T* x1p = rows_v.mutable_data_ptr<T>();
  T* x2p = cols_v.mutable_data_ptr<T>();
  const int64_t rows = g.BH * H;

  // Rows: Â_i and X₁ = R(V).
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* p = rp + r * W * W;
      tile_gemm<T>(false, true, W, W, d, scale, qp + r * W * d, d, kp + r * W * d, d, T(0), p, W);
      masked_softmax_tile<T>(p, W, cap + r * W);
      tile_gemm<T>(false, false, W, c, W, T(1), p, W, vp + r * W * c, c, T(0), x1p + r * W * c,
                   c);
    }
  });
  // Columns: B̂_l, X₂ = Cc(V), out = ½ Cc(X₁), a block of columns per task.
  at::parallel_for(0, g.BH * ColumnBlock::count(W), 1, [&](int64_t begin, int64_t end) {
    const int64_t td = kColumnBlock * H * d, tc = kColumnBlock * H * c;
    std::vector<T> C(kColumnBlock * H), buf(2 * td + 4 * tc);
    T* qc = buf.data();
    T* kc = qc + td;
    T* vc = kc + td;
    T* x1c = vc + tc;
    T* x2c = x1c + tc;
    T* oc = x2c + tc;
    for (int64_t task = begin; task < end; ++task) {
      const auto [bh, l0, n] = ColumnBlock(task, W);
      const int64_t qh = bh * H * W * d, vh = bh * H * W * c;
      gather_columns(cbp + bh * H * W, H, W, 1, l0, n, C.data());
      gather_columns(qp + qh, H, W, d, l0, n, qc);
      gather_columns(kp + qh, H, W, d, l0, n, kc);
      gather_columns(vp + vh, H, W, c, l0, n, vc);
      gather_columns(x1p + vh, H, W, c, l0, n, x1c);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t jd = j * H * d, jc = j * H * c;
        T* p = cp + (bh * W + l0 + j) * H * H;
        tile_gemm<T>(false, true, H, H, d, scale, qc + jd, d, kc + jd, d, T(0), p, H);
        masked_softmax_tile<T>(p, H, C.data() + j * H);
        tile_gemm<T>(false, false, H, c, H, T(1), p, H, vc + jc, c, T(0), x2c + jc, c);
        tile_gemm<T>(false, false, H, c, H, T(0.5), p, H, x1c + jc, c, T(0), oc + jc, c);
      }
      scatter_columns(x2c, H, W, c, l0, n, x2p + vh);
      scatter_columns(oc, H, W, c, l0, n, op + vh);
    }
  });
  // Rows again: out += ½ R(X₂).
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      tile_gemm<T>(false, false, W, c, W, T(0.5), rp + r * W * W, W, x2p + r * W * c, c, T(1),
                   op + r * W * c, c);
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& ca, const at::Tensor& cb,
                   const at::Tensor& row_probs, const at::Tensor& col_probs,
                   const at::Tensor& rows_v, const at::Tensor& cols_v, T scale, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv, at::Tensor& d_log_alpha,
                   at::Tensor& d_log_beta) {
  const Grid g{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3)};
  const int64_t H = g.H, W = g.W, d = g.d, c = g.c;
  const T* gp = grad_out.const_data_ptr<T>();
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* cap = ca.const_data_ptr<T>();
  const T* cbp = cb.const_data_ptr<T>();
  const T* rp = row_probs.const_data_ptr<T>();
  const T* cp = col_probs.const_data_ptr<T>();
  const T* x1p = rows_v.const_data_ptr<T>();
  const T* x2p = cols_v.const_data_ptr<T>();
  T* dqp = dq.mutable_data_ptr<T>();
  T* dkp = dk.mutable_data_ptr<T>();
  T* dvp = dv.mutable_data_ptr<T>();
  T* dlap = d_log_alpha.mutable_data_ptr<T>();
  T* dlbp = d_log_beta.mutable_data_ptr<T>();
  // Gradients of X₁ and X₂ (BH, H, W, c).
  const at::Tensor dx1 = empty_for_write({g.BH, H, W, c}, v.options());
  const at::Tensor dx2 = empty_for_write({g.BH, H, W, c}, v.options());
  T* dx1p = dx1.mutable_data_ptr<T>();
  T* dx2p = dx2.mutable_data_ptr<T>();
  const int64_t rows = g.BH * H;

  // Columns: dX₁ = ½ B̂ᵀ g, a block of columns per task.
  const int64_t column_tasks = g.BH * ColumnBlock::count(W);
  at::parallel_for(0, column_tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tc = kColumnBlock * H * c;
    std::vector<T> buf(2 * tc);
    T* gc = buf.data();
    T* dx1c = gc + tc;
    for (int64_t task = begin; task < end; ++task) {
      const auto [bh, l0, n] = ColumnBlock(task, W);
      const int64_t vh = bh * H * W * c;
      gather_columns(gp + vh, H, W, c, l0, n, gc);
      for (int64_t j = 0; j < n; ++j) {
        const T* p = cp + (bh * W + l0 + j) * H * H;
        tile_gemm<T>(true, false, H, c, H, T(0.5), p, H, gc + j * H * c, c, T(0),
                     dx1c + j * H * c, c);
      }
      scatter_columns(dx1c, H, W, c, l0, n, dx1p + vh);
    }
  });
  // Rows: dX₂, dÂ → dS, and the row parts of dq, dk, dv (first writers), d log_alpha.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ds(W * W), dC(W);
    for (int64_t r = begin; r < end; ++r) {
      const T* p = rp + r * W * W;
      const int64_t ro = r * W * c, qo = r * W * d;
      tile_gemm<T>(true, false, W, c, W, T(0.5), p, W, gp + ro, c, T(0), dx2p + ro, c);
      tile_gemm<T>(false, true, W, W, c, T(1), dx1p + ro, c, vp + ro, c, T(0), ds.data(), W);
      tile_gemm<T>(false, true, W, W, c, T(0.5), gp + ro, c, x2p + ro, c, T(1), ds.data(), W);
      tile_gemm<T>(true, false, W, c, W, T(1), p, W, dx1p + ro, c, T(0), dvp + ro, c);
      softmax_and_mask_backward_tile<T>(p, ds.data(), cap + r * W, W, dC.data());
      tile_gemm<T>(false, false, W, d, W, scale, ds.data(), W, kp + qo, d, T(0), dqp + qo, d);
      tile_gemm<T>(true, false, W, d, W, scale, ds.data(), W, qp + qo, d, T(0), dkp + qo, d);
      criss_cross::cumsum_grad(dC.data(), W, dlap + r * W, int64_t(1));
    }
  });
  // Columns: dB̂ → dS, the column parts of dq, dk, dv (accumulated), d log_beta; a block of
  // columns per task.
  at::parallel_for(0, column_tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t td = kColumnBlock * H * d, tc = kColumnBlock * H * c;
    std::vector<T> ds(H * H), dC(H), C(kColumnBlock * H), buf(4 * td + 5 * tc);
    T* qc = buf.data();
    T* kc = qc + td;
    T* dqc = kc + td;
    T* dkc = dqc + td;
    T* vc = dkc + td;
    T* gc = vc + tc;
    T* x1c = gc + tc;
    T* dx2c = x1c + tc;
    T* dvc = dx2c + tc;
    for (int64_t task = begin; task < end; ++task) {
      const auto [bh, l0, n] = ColumnBlock(task, W);
      const int64_t qh = bh * H * W * d, vh = bh * H * W * c;
      gather_columns(cbp + bh * H * W, H, W, 1, l0, n, C.data());
      gather_columns(qp + qh, H, W, d, l0, n, qc);
      gather_columns(kp + qh, H, W, d, l0, n, kc);
      gather_columns(dqp + qh, H, W, d, l0, n, dqc);
      gather_columns(dkp + qh, H, W, d, l0, n, dkc);
      gather_columns(vp + vh, H, W, c, l0, n, vc);
      gather_columns(gp + vh, H, W, c, l0, n, gc);
      gather_columns(x1p + vh, H, W, c, l0, n, x1c);
      gather_columns(dx2p + vh, H, W, c, l0, n, dx2c);
      gather_columns(dvp + vh, H, W, c, l0, n, dvc);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t l = l0 + j, jd = j * H * d, jc = j * H * c;
        const T* p = cp + (bh * W + l) * H * H;
        tile_gemm<T>(false, true, H, H, c, T(0.5), gc + jc, c, x1c + jc, c, T(0), ds.data(), H);
        tile_gemm<T>(false, true, H, H, c, T(1), dx2c + jc, c, vc + jc, c, T(1), ds.data(), H);
        tile_gemm<T>(true, false, H, c, H, T(1), p, H, dx2c + jc, c, T(1), dvc + jc, c);
        softmax_and_mask_backward_tile<T>(p, ds.data(), C.data() + j * H, H, dC.data());
        tile_gemm<T>(false, false, H, d, H, scale, ds.data(), H, kc + jd, d, T(1), dqc + jd, d);
        tile_gemm<T>(true, false, H, d, H, scale, ds.data(), H, qc + jd, d, T(1), dkc + jd, d);
        criss_cross::cumsum_grad(dC.data(), H, dlbp + bh * H * W + l, W);
      }
      scatter_columns(dqc, H, W, d, l0, n, dqp + qh);
      scatter_columns(dkc, H, W, d, l0, n, dkp + qh);
      scatter_columns(dvc, H, W, c, l0, n, dvp + vh);
    }
  });
}

}  // namespace

void criss_cross_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& ca, const at::Tensor& cb, double scale,
                         at::Tensor& out, at::Tensor& row_probs, at::Tensor& col_probs,
                         at::Tensor& rows_v, at::Tensor& cols_v) {
  if (q.scalar_type() == at::kDouble) {
    forward_impl<double>(q, k, v, ca, cb, scale, out, row_probs, col_probs, rows_v, cols_v);
  } else {
    forward_impl<float>(q, k, v, ca, cb, static_cast<float>(scale), out, row_probs, col_probs,
                        rows_v, cols_v);
  }
}

void criss_cross_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& ca, const at::Tensor& cb,
                          const at::Tensor& row_probs,
                          const at::Tensor& col_probs, const at::Tensor& rows_v,
                          const at::Tensor& cols_v, double scale, at::Tensor& dq,
                          at::Tensor& dk, at::Tensor& dv, at::Tensor& d_log_alpha,
                          at::Tensor& d_log_beta) {
  if (q.scalar_type() == at::kDouble) {
    backward_impl<double>(grad_out, q, k, v, ca, cb, row_probs, col_probs, rows_v, cols_v, scale, dq, dk,
                          dv, d_log_alpha, d_log_beta);
  } else {
    backward_impl<float>(grad_out, q, k, v, ca, cb, row_probs, col_probs, rows_v, cols_v,
                         static_cast<float>(scale), dq, dk, dv, d_log_alpha, d_log_beta);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace ppma
