// Vanilla polyline attention, CPU kernels (compiled once per ISA; see CMakeLists.txt).
//
// Flash-attention style: a tile of queries (row-major tokens) sweeps the key tiles. Each S tile
// comes from one GEMM; both log-masks are evaluated on the fly from the cumsum tables; the two
// online-softmax states (M and Mᵀ) share the S tile and the V tile (one stacked PV GEMM).
// Nothing of size N×N is ever allocated: scratch is O(tile²) per thread.
//
// For query u = (i, j) and a key segment (row k, columns l) the masks are
//   M (u, v) = −|Ca[i,j] − Ca[i,l]| − |Cb[i,l] − Cb[k,l]|
//   Mᵀ(u, v) = −|Ca[k,j] − Ca[k,l]| − |Cb[k,j] − Cb[i,j]|
// so along a key segment every operand is a contiguous load from row i or row k of the tables,
// or a scalar fixed for the segment: the mask costs a few vector ops per score.
//
// The backward recomputes P₁, P₂ from the saved log-sum-exps in two passes, so that every
// output element has one owner and nothing needs atomics: a query-major pass (dQ and the
// query-side mask-gradient terms) and a key-major pass (dK, dV and the key-side terms).
// Mask-gradient contributions that land on grid rows shared between tiles go to per-tile
// buffers that are summed in tile order afterwards.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "polyline_attention_kernel.h"
#include "polyline_attention_math.h"
#include "tile_gemm.h"

namespace ppma {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using polyline::Tiling;

// Tile sizes in tokens (rounded to whole grid rows). Forward: S/P tiles of 64×256 floats
// (64 KiB for S, 128 KiB for both P) stay in L2.
constexpr long long kForwardQueryTile = 64;
constexpr long long kForwardKeyTile = 256;
constexpr long long kBackwardQueryTile = 64;
constexpr long long kBackwardKeyTile = 128;

template <typename T>
inline T reduce_max(const Vectorized<T>& x) {
  alignas(64) T buf[Vectorized<T>::size()];
  x.store(buf);
  T m = buf[0];
  for (int t = 1; t < Vectorized<T>::size(); ++t) m = std::max(m, buf[t]);
  return m;
}

template <typename T>
inline T reduce_sum(const Vectorized<T>& x) {
  alignas(64) T buf[Vectorized<T>::size()];
  x.store(buf);
  T s = T(0);
  for (int t = 0; t < Vectorized<T>::size(); ++t) s += buf[t];
  return s;
}

// sign(x)·g with sign(0) = 0 (torch.abs's subgradient).
template <typename T>
inline Vectorized<T> sign_times(const Vectorized<T>& x, const Vectorized<T>& g) {
  const Vectorized<T> zero(T(0));
  return Vectorized<T>::blendv(zero, g, x > zero) - Vectorized<T>::blendv(zero, g, x < zero);
}

// One head's cumsum tables (H×W, row-major). na, nb count the −inf log decays along rows /
// columns (docs/design.md §2.7); they are read only by the kBlocked instantiations, which run
// when some log decay is −inf, so the common case pays nothing for them.
template <typename T>
struct HeadTables {
  const T* ca;
  const T* cb;
  const T* na;
  const T* nb;
};

// The count operands of a query (i, j) against the key segment of row k (kBlocked only): which
// keys l have a blocked path, for M (leg along row i, then column l from row k) and for Mᵀ
// (leg along row k, then column j from row i, fixed for the segment). Blocked lanes of the
// vector tests have all bits set; polyline::path_open is the scalar rule.
template <typename T>
struct SegmentCounts {
  using V = Vectorized<T>;
  const T* na_i;
  const T* na_k;
  const T* nb_i;
  const T* nb_k;
  T na_ij, na_kj;
  bool column_leg2_open;

  SegmentCounts() = default;  // the plain instantiations never read it
  SegmentCounts(const HeadTables<T>& tb, long long W, long long i, long long j, long long k)
      : na_i(tb.na + i * W), na_k(tb.na + k * W), nb_i(tb.nb + i * W), nb_k(tb.nb + k * W),
        na_ij(na_i[j]), na_kj(na_k[j]), column_leg2_open(nb_k[j] == nb_i[j]) {}

  V blocked1(long long l) const {
    return (V(na_ij) != V::loadu(na_i + l)) | (V::loadu(nb_i + l) != V::loadu(nb_k + l));
  }
  V blocked2(long long l) const {
    const V row_leg = V(na_kj) != V::loadu(na_k + l);
    return column_leg2_open ? row_leg : V(T(0)) == V(T(0));  // all lanes when the column is cut
  }
  bool open1(long long j, long long l) const {
    return polyline::path_open(na_i[j], na_i[l], nb_i[l], nb_k[l]);
  }
  bool open2(long long j, long long l) const {
    return polyline::path_open(na_k[j], na_k[l], nb_k[j], nb_i[j]);
  }
};

// Walks the key tile [v0, v1) as segments inside one grid row: f(k, l0, n, offset).
template <typename F>
inline void for_each_key_segment(long long v0, long long v1, long long W, F&& f) {
  long long v = v0;
  while (v < v1) {
    const long long k = v / W, l0 = v - k * W;
    const long long n = std::min(W - l0, v1 - v);
    f(k, l0, n, v - v0);
    v += n;
  }
}

// Masked scores of one query row against a key tile: x1 = s + M, x2 = s + Mᵀ, and their maxima.
// kBlocked: −inf where the path crosses a −inf log decay.
template <typename T, bool kBlocked>
inline void masked_scores_row(const T* s, long long v0, long long v1, long long W, long long i,
                              long long j, const HeadTables<T>& tb, T* x1, T* x2, T* max1,
                              T* max2) {
  using V = Vectorized<T>;
  constexpr long long L = V::size();
  const T* ca_i = tb.ca + i * W;
  const T* cb_i = tb.cb + i * W;
  const T ca_ij = ca_i[j], cb_ij = cb_i[j];
  const T neg_inf = -std::numeric_limits<T>::infinity();
  V vm1(neg_inf), vm2(neg_inf);
  T m1 = neg_inf, m2 = neg_inf;
  for_each_key_segment(v0, v1, W, [&](long long k, long long l0, long long n, long long o) {
    const T* ca_k = tb.ca + k * W;
    const T* cb_k = tb.cb + k * W;
    const T ca_kj = ca_k[j];
    const T cb_diff_j = std::abs(cb_k[j] - cb_ij);
    const V vca_ij(ca_ij), vca_kj(ca_kj), vcb_diff_j(cb_diff_j), vneg_inf(neg_inf);
    const SegmentCounts<T> counts = kBlocked ? SegmentCounts<T>(tb, W, i, j, k)
                                             : SegmentCounts<T>{};
    long long t = 0;
    for (; t + L <= n; t += L) {
      const long long l = l0 + t;
      const V sv = V::loadu(s + o + t);
      V y1 = sv - (vca_ij - V::loadu(ca_i + l)).abs() -
             (V::loadu(cb_i + l) - V::loadu(cb_k + l)).abs();
      V y2 = sv - (vca_kj - V::loadu(ca_k + l)).abs() - vcb_diff_j;
      if constexpr (kBlocked) {
        y1 = V::blendv(y1, vneg_inf, counts.blocked1(l));
        y2 = V::blendv(y2, vneg_inf, counts.blocked2(l));
      }
      y1.store(x1 + o + t);
      y2.store(x2 + o + t);
      vm1 = at::vec::maximum(vm1, y1);
      vm2 = at::vec::maximum(vm2, y2);
    }
    for (; t < n; ++t) {
      const long long l = l0 + t;
      T y1 = s[o + t] + polyline::log_mask(ca_ij, ca_i[l], cb_i[l], cb_k[l]);
      T y2 = s[o + t] + polyline::log_mask(ca_kj, ca_k[l], cb_k[j], cb_ij);
      if constexpr (kBlocked) {
        y1 = counts.open1(j, l) ? y1 : neg_inf;
        y2 = counts.open2(j, l) ? y2 : neg_inf;
      }
      x1[o + t] = y1;
      x2[o + t] = y2;
      m1 = std::max(m1, y1);
      m2 = std::max(m2, y2);
    }
  });
  *max1 = std::max(m1, reduce_max(vm1));
  *max2 = std::max(m2, reduce_max(vm2));
}

// x ← exp(x − m) in place; returns Σ exp(x − m).
template <typename T>
inline T exp_shift_sum(T* x, long long n, T m) {
  using V = Vectorized<T>;
  constexpr long long L = V::size();
  const V vm(m);
  V acc(T(0));
  long long t = 0;
  for (; t + L <= n; t += L) {
    const V e = (V::loadu(x + t) - vm).exp_u20();
    e.store(x + t);
    acc = acc + e;
  }
  T sum = reduce_sum(acc);
  for (; t < n; ++t) {
    x[t] = std::exp(x[t] - m);
    sum += x[t];
  }
  return sum;
}

template <typename T>
inline void scale_row(T* x, long long n, T f) {
  using V = Vectorized<T>;
  constexpr long long L = V::size();
  const V vf(f);
  long long t = 0;
  for (; t + L <= n; t += L) (V::loadu(x + t) * vf).store(x + t);
  for (; t < n; ++t) x[t] *= f;
}

// The tables of head bh; na, nb undefined (plain problems) give null count pointers.
template <typename T>
HeadTables<T> head_tables(const at::Tensor& ca, const at::Tensor& cb, const at::Tensor& na,
                          const at::Tensor& nb, long long bh) {
  const long long N = ca.size(1) * ca.size(2);
  const bool blocked = na.defined();
  return {ca.const_data_ptr<T>() + bh * N, cb.const_data_ptr<T>() + bh * N,
          blocked ? na.const_data_ptr<T>() + bh * N : nullptr,
          blocked ? nb.const_data_ptr<T>() + bh * N : nullptr};
}

template <typename T, bool kBlocked>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& ca, const at::Tensor& cb, const at::Tensor& na,
                  const at::Tensor& nb, double scale_d, at::Tensor& out, at::Tensor& parts,
                  at::Tensor& lse) {
  const long long BH = q.size(0), N = q.size(1), d = q.size(2), c = v.size(2);
  const long long H = ca.size(1), W = ca.size(2);
  const T scale = static_cast<T>(scale_d);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* outp = out.data_ptr<T>();
  T* partsp = parts.data_ptr<T>();
  T* lsep = lse.data_ptr<T>();
  const Tiling qt(H, W, kForwardQueryTile), kt(H, W, kForwardKeyTile);
  const T neg_inf = -std::numeric_limits<T>::infinity();

  at::parallel_for(0, BH * qt.count, 1, [&](int64_t begin, int64_t end) {
    const long long mq = qt.max_len, mk = kt.max_len;
    std::vector<T> s(mq * mk), p(2 * mq * mk), acc(2 * mq * c), m(2 * mq), l(2 * mq);
    for (int64_t item = begin; item < end; ++item) {
      const long long bh = item / qt.count, tile = item % qt.count;
      long long u0, u1;
      qt.range(tile, &u0, &u1);
      const long long nq = u1 - u0;
      const T* qtile = qp + (bh * N + u0) * d;
      const HeadTables<T> tb = head_tables<T>(ca, cb, na, nb, bh);
      std::fill(acc.begin(), acc.begin() + 2 * nq * c, T(0));
      std::fill(m.begin(), m.begin() + 2 * nq, neg_inf);
      std::fill(l.begin(), l.begin() + 2 * nq, T(0));
      for (long long kt_i = 0; kt_i < kt.count; ++kt_i) {
        long long v0, v1;
        kt.range(kt_i, &v0, &v1);
        const long long nk = v1 - v0;
        tile_gemm<T>(false, true, nq, nk, d, scale, qtile, d, kp + (bh * N + v0) * d, d, T(0),
                     s.data(), nk);
        for (long long r = 0; r < nq; ++r) {
          const long long u = u0 + r, i = u / W, j = u - i * W;
          T* x1 = p.data() + r * nk;
          T* x2 = p.data() + (nq + r) * nk;
          T max1, max2;
          masked_scores_row<T, kBlocked>(s.data() + r * nk, v0, v1, W, i, j, tb, x1, x2, &max1,
                                         &max2);
          const T* maxima[2] = {&max1, &max2};
          T* rows[2] = {x1, x2};
          for (int side = 0; side < 2; ++side) {
            const long long idx = side * nq + r;
            const T m_new = std::max(m[idx], *maxima[side]);
            // Every key so far blocked (§2.7): the tile adds nothing (and exp(−inf − (−inf))
            // would be NaN). Plain problems never get here: their scores are finite.
            if (kBlocked && m_new == neg_inf) {
              std::fill(rows[side], rows[side] + nk, T(0));
              continue;
            }
            const T sum = exp_shift_sum(rows[side], nk, m_new);
            const T f = polyline::rescale_factor(m[idx], m_new);
            l[idx] = l[idx] * f + sum;
            m[idx] = m_new;
            if (f != T(1)) scale_row(acc.data() + idx * c, c, f);
          }
        }
        // [O₁; O₂] += [P₁; P₂]·V_tile: one GEMM for both softmax states.
        tile_gemm<T>(false, false, 2 * nq, c, nk, T(1), p.data(), nk, vp + (bh * N + v0) * c, c,
                     T(1), acc.data(), c);
      }
      for (long long r = 0; r < nq; ++r) {
        const long long u = u0 + r;
        const T inv1 = T(1) / l[r], inv2 = T(1) / l[nq + r];
        const T* a1 = acc.data() + r * c;
        const T* a2 = acc.data() + (nq + r) * c;
        T* o1 = partsp + ((bh * 2 + 0) * N + u) * c;
        T* o2 = partsp + ((bh * 2 + 1) * N + u) * c;
        T* o = outp + (bh * N + u) * c;
        for (long long e = 0; e < c; ++e) {
          o1[e] = a1[e] * inv1;
          o2[e] = a2[e] * inv2;
          o[e] = T(0.5) * (o1[e] + o2[e]);
        }
        lsep[(bh * 2 + 0) * N + u] = m[r] + std::log(l[r]);
        lsep[(bh * 2 + 1) * N + u] = m[nq + r] + std::log(l[nq + r]);
      }
    }
  });
}

// Backward, one query row against one key tile. Recomputes P₁, P₂ from the log-sum-exps,
// forms dS = dS₁ + dS₂ and accumulates the mask-gradient terms this pass owns:
//  query pass (kQueryPass): dCa[i,j], dCb[i,j] (per query) and dCa[i,·], dCb[i,·] (row i);
//  key pass: dCa[k,l], dCb[k,l] (per key) and dCa[k,j], dCb[k,j] (rows k), plus P̄ = ½(P₁+P₂).
struct GradRowOut {
  void* ds;
  void* pbar;        // key pass
  void* query_ca;    // query pass: scalar accumulators for u
  void* query_cb;
  void* row_ca;      // query pass: row i of the tile's row buffers
  void* row_cb;
  void* key_ca;      // key pass: per-key accumulators of the key tile
  void* key_cb;
  void* keyrows_ca;  // key pass: the key tile's row buffers (rows of the tile, W wide)
  void* keyrows_cb;
  long long keyrow0;
};

// kBlocked: P₁, P₂ are 0 where the path crosses a −inf log decay (§2.7), so those pairs add
// nothing to any gradient; the table differences stay finite (finite partial sums).
template <typename T, bool kQueryPass, bool kBlocked>
inline void grad_row(const T* s, const T* dp, long long v0, long long v1, long long W,
                     long long i, long long j, const HeadTables<T>& tb, T lse1, T lse2, T delta1,
                     T delta2, const GradRowOut& o_) {
  using V = Vectorized<T>;
  constexpr long long L = V::size();
  T* ds = static_cast<T*>(o_.ds);
  const T* ca_i = tb.ca + i * W;
  const T* cb_i = tb.cb + i * W;
  const T ca_ij = ca_i[j], cb_ij = cb_i[j];
  const V vlse1(lse1), vlse2(lse2), vdelta1(delta1), vdelta2(delta2), vhalf(T(0.5));
  V q_ca_acc(T(0));
  T q_ca = T(0), q_cb = T(0);
  for_each_key_segment(v0, v1, W, [&](long long k, long long l0, long long n, long long o) {
    const T* ca_k = tb.ca + k * W;
    const T* cb_k = tb.cb + k * W;
    const T ca_kj = ca_k[j];
    const T cb_kj_minus_ij = cb_k[j] - cb_ij;
    const T sign_b2 = polyline::abs_grad(cb_kj_minus_ij);
    const T cb_diff_j = std::abs(cb_kj_minus_ij);
    const V vca_ij(ca_ij), vca_kj(ca_kj), vcb_diff_j(cb_diff_j), vzero(T(0));
    const SegmentCounts<T> counts = kBlocked ? SegmentCounts<T>(tb, W, i, j, k)
                                             : SegmentCounts<T>{};
    V g2_sum(T(0)), f_acc(T(0));
    T g2_sum_s = T(0), f_acc_s = T(0);
    long long t = 0;
    for (; t + L <= n; t += L) {
      const long long l = l0 + t;
      const V sv = V::loadu(s + o + t);
      const V dpv = V::loadu(dp + o + t);
      const V da1 = vca_ij - V::loadu(ca_i + l);
      const V db1 = V::loadu(cb_i + l) - V::loadu(cb_k + l);
      const V da2 = V::loadu(ca_k + l) - vca_kj;
      V p1 = (sv - da1.abs() - db1.abs() - vlse1).exp_u20();
      V p2 = (sv - da2.abs() - vcb_diff_j - vlse2).exp_u20();
      if constexpr (kBlocked) {
        p1 = V::blendv(p1, vzero, counts.blocked1(l));
        p2 = V::blendv(p2, vzero, counts.blocked2(l));
      }
      const V g1 = p1 * (dpv - vdelta1);
      const V g2 = p2 * (dpv - vdelta2);
      (g1 + g2).store(ds + o + t);
      g2_sum = g2_sum + g2;
      if constexpr (kQueryPass) {
        const V a1 = sign_times(da1, g1);
        q_ca_acc = q_ca_acc - a1;
        T* row_ca = static_cast<T*>(o_.row_ca) + l;
        T* row_cb = static_cast<T*>(o_.row_cb) + l;
        (V::loadu(row_ca) + a1).store(row_ca);
        (V::loadu(row_cb) - sign_times(db1, g1)).store(row_cb);
      } else {
        T* pbar = static_cast<T*>(o_.pbar) + o + t;
        (vhalf * (p1 + p2)).store(pbar);
        T* key_ca = static_cast<T*>(o_.key_ca) + o + t;
        T* key_cb = static_cast<T*>(o_.key_cb) + o + t;
        const V a2 = sign_times(da2, g2);
        (V::loadu(key_ca) - a2).store(key_ca);
        (V::loadu(key_cb) + sign_times(db1, g1)).store(key_cb);
        f_acc = f_acc + a2;
      }
    }
    for (; t < n; ++t) {
      const long long l = l0 + t;
      const T da1 = ca_ij - ca_i[l];
      const T db1 = cb_i[l] - cb_k[l];
      const T da2 = ca_k[l] - ca_kj;
      T p1 = std::exp(s[o + t] - std::abs(da1) - std::abs(db1) - lse1);
      T p2 = std::exp(s[o + t] - std::abs(da2) - cb_diff_j - lse2);
      if constexpr (kBlocked) {
        p1 = counts.open1(j, l) ? p1 : T(0);
        p2 = counts.open2(j, l) ? p2 : T(0);
      }
      const T g1 = polyline::softmax_grad(p1, dp[o + t], delta1);
      const T g2 = polyline::softmax_grad(p2, dp[o + t], delta2);
      ds[o + t] = g1 + g2;
      g2_sum_s += g2;
      if constexpr (kQueryPass) {
        const T a1 = polyline::abs_grad(da1) * g1;
        q_ca -= a1;
        static_cast<T*>(o_.row_ca)[l] += a1;
        static_cast<T*>(o_.row_cb)[l] -= polyline::abs_grad(db1) * g1;
      } else {
        static_cast<T*>(o_.pbar)[o + t] = T(0.5) * (p1 + p2);
        const T a2 = polyline::abs_grad(da2) * g2;
        static_cast<T*>(o_.key_ca)[o + t] -= a2;
        static_cast<T*>(o_.key_cb)[o + t] += polyline::abs_grad(db1) * g1;
        f_acc_s += a2;
      }
    }
    const T g2_total = g2_sum_s + reduce_sum(g2_sum);
    if constexpr (kQueryPass) {
      q_cb += sign_b2 * g2_total;
    } else {
      const long long kr = (k - o_.keyrow0) * W + j;
      static_cast<T*>(o_.keyrows_ca)[kr] += f_acc_s + reduce_sum(f_acc);
      static_cast<T*>(o_.keyrows_cb)[kr] -= sign_b2 * g2_total;
    }
  });
  if constexpr (kQueryPass) {
    *static_cast<T*>(o_.query_ca) += q_ca + reduce_sum(q_ca_acc);
    *static_cast<T*>(o_.query_cb) += q_cb;
  }
}

template <typename T, bool kBlocked>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& ca, const at::Tensor& cb,
                   const at::Tensor& na, const at::Tensor& nb, const at::Tensor& lse,
                   const at::Tensor& delta, double scale_d, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv, at::Tensor& dca, at::Tensor& dcb) {
  const long long BH = q.size(0), N = q.size(1), d = q.size(2), c = v.size(2);
  const long long H = ca.size(1), W = ca.size(2);
  const T scale = static_cast<T>(scale_d);
  const T* gop = grad_out.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* lsep = lse.data_ptr<T>();
  const T* deltap = delta.data_ptr<T>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  T* dcap = dca.data_ptr<T>();
  T* dcbp = dcb.data_ptr<T>();
  const Tiling qt(H, W, kBackwardQueryTile), kt(H, W, kBackwardKeyTile);

  // Per-tile partial rows of the mask gradients, summed in tile order at the end.
  const auto opts = ca.options();
  at::Tensor q_rows = at::zeros({2, BH, qt.count, qt.rows_per_tile, W}, opts);
  at::Tensor k_rows = at::zeros({2, BH, kt.count, kt.rows_per_tile, W}, opts);
  T* q_rows_p = q_rows.data_ptr<T>();
  T* k_rows_p = k_rows.data_ptr<T>();
  const long long q_rows_plane = BH * qt.count * qt.rows_per_tile * W;
  const long long k_rows_plane = BH * kt.count * kt.rows_per_tile * W;

  // Query-major pass: dQ and the query-owned mask terms.
  at::parallel_for(0, BH * qt.count, 1, [&](int64_t begin, int64_t end) {
    const long long mq = qt.max_len, mk = kt.max_len;
    std::vector<T> s(mq * mk), dp(mq * mk), ds(mq * mk), dq_acc(mq * d);
    for (int64_t item = begin; item < end; ++item) {
      const long long bh = item / qt.count, tile = item % qt.count;
      long long u0, u1;
      qt.range(tile, &u0, &u1);
      const long long nq = u1 - u0, row0 = qt.first_row(tile);
      const T* qtile = qp + (bh * N + u0) * d;
      const T* gotile = gop + (bh * N + u0) * c;
      const HeadTables<T> tb = head_tables<T>(ca, cb, na, nb, bh);
      T* rows_ca = q_rows_p + (bh * qt.count + tile) * qt.rows_per_tile * W;
      T* rows_cb = rows_ca + q_rows_plane;
      std::fill(dq_acc.begin(), dq_acc.begin() + nq * d, T(0));
      for (long long r = 0; r < nq; ++r) {
        dcap[bh * N + u0 + r] = T(0);
        dcbp[bh * N + u0 + r] = T(0);
      }
      for (long long kt_i = 0; kt_i < kt.count; ++kt_i) {
        long long v0, v1;
        kt.range(kt_i, &v0, &v1);
        const long long nk = v1 - v0;
        tile_gemm<T>(false, true, nq, nk, d, scale, qtile, d, kp + (bh * N + v0) * d, d, T(0),
                     s.data(), nk);
        // dP = ½·dO·Vᵀ (the ½ of the average of the two softmaxes).
        tile_gemm<T>(false, true, nq, nk, c, T(0.5), gotile, c, vp + (bh * N + v0) * c, c, T(0),
                     dp.data(), nk);
        for (long long r = 0; r < nq; ++r) {
          const long long u = u0 + r, i = u / W, j = u - i * W;
          GradRowOut o_{};
          o_.ds = ds.data() + r * nk;
          o_.query_ca = dcap + bh * N + u;
          o_.query_cb = dcbp + bh * N + u;
          o_.row_ca = rows_ca + (i - row0) * W;
          o_.row_cb = rows_cb + (i - row0) * W;
          grad_row<T, true, kBlocked>(s.data() + r * nk, dp.data() + r * nk, v0, v1, W, i, j,
                                      tb, lsep[(bh * 2) * N + u], lsep[(bh * 2 + 1) * N + u],
                                      deltap[(bh * 2) * N + u], deltap[(bh * 2 + 1) * N + u],
                                      o_);
        }
        tile_gemm<T>(false, false, nq, d, nk, scale, ds.data(), nk, kp + (bh * N + v0) * d, d,
                     T(1), dq_acc.data(), d);
      }
      std::copy(dq_acc.begin(), dq_acc.begin() + nq * d, dqp + (bh * N + u0) * d);
    }
  });

  // Key-major pass: dK, dV and the key-owned mask terms (added to the per-token gradients
  // the query pass wrote; each key token belongs to one key tile).
  at::parallel_for(0, BH * kt.count, 1, [&](int64_t begin, int64_t end) {
    const long long mq = qt.max_len, mk = kt.max_len;
    std::vector<T> s(mq * mk), dp(mq * mk), ds(mq * mk), pbar(mq * mk);
    std::vector<T> dk_acc(mk * d), dv_acc(mk * c), key_ca(mk), key_cb(mk);
    for (int64_t item = begin; item < end; ++item) {
      const long long bh = item / kt.count, tile = item % kt.count;
      long long v0, v1;
      kt.range(tile, &v0, &v1);
      const long long nk = v1 - v0, krow0 = kt.first_row(tile);
      const T* ktile = kp + (bh * N + v0) * d;
      const T* vtile = vp + (bh * N + v0) * c;
      const HeadTables<T> tb = head_tables<T>(ca, cb, na, nb, bh);
      T* rows_ca = k_rows_p + (bh * kt.count + tile) * kt.rows_per_tile * W;
      T* rows_cb = rows_ca + k_rows_plane;
      std::fill(dk_acc.begin(), dk_acc.begin() + nk * d, T(0));
      std::fill(dv_acc.begin(), dv_acc.begin() + nk * c, T(0));
      std::fill(key_ca.begin(), key_ca.begin() + nk, T(0));
      std::fill(key_cb.begin(), key_cb.begin() + nk, T(0));
      for (long long qt_i = 0; qt_i < qt.count; ++qt_i) {
        long long u0, u1;
        qt.range(qt_i, &u0, &u1);
        const long long nq = u1 - u0;
        const T* qtile = qp + (bh * N + u0) * d;
        const T* gotile = gop + (bh * N + u0) * c;
        tile_gemm<T>(false, true, nq, nk, d, scale, qtile, d, ktile, d, T(0), s.data(), nk);
        tile_gemm<T>(false, true, nq, nk, c, T(0.5), gotile, c, vtile, c, T(0), dp.data(), nk);
        for (long long r = 0; r < nq; ++r) {
          const long long u = u0 + r, i = u / W, j = u - i * W;
          GradRowOut o_{};
          o_.ds = ds.data() + r * nk;
          o_.pbar = pbar.data() + r * nk;
          o_.key_ca = key_ca.data();
          o_.key_cb = key_cb.data();
          o_.keyrows_ca = rows_ca;
          o_.keyrows_cb = rows_cb;
          o_.keyrow0 = krow0;
          grad_row<T, false, kBlocked>(s.data() + r * nk, dp.data() + r * nk, v0, v1, W, i, j,
                                       tb, lsep[(bh * 2) * N + u], lsep[(bh * 2 + 1) * N + u],
                                       deltap[(bh * 2) * N + u], deltap[(bh * 2 + 1) * N + u],
                                       o_);
        }
        // dV += P̄ᵀ·dO, dK += scale·dSᵀ·Q.
        tile_gemm<T>(true, false, nk, c, nq, T(1), pbar.data(), nk, gotile, c, T(1),
                     dv_acc.data(), c);
        tile_gemm<T>(true, false, nk, d, nq, scale, ds.data(), nk, qtile, d, T(1),
                     dk_acc.data(), d);
      }
      std::copy(dk_acc.begin(), dk_acc.begin() + nk * d, dkp + (bh * N + v0) * d);
      std::copy(dv_acc.begin(), dv_acc.begin() + nk * c, dvp + (bh * N + v0) * c);
      for (long long e = 0; e < nk; ++e) {
        dcap[bh * N + v0 + e] += key_ca[e];
        dcbp[bh * N + v0 + e] += key_cb[e];
      }
    }
  });

  // Row partials, in tile order (fixed, so results do not depend on the thread count).
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      for (int side = 0; side < 2; ++side) {
        T* dst = (side == 0 ? dcap : dcbp) + bh * N;
        const T* qsrc = q_rows_p + side * q_rows_plane;
        for (long long t = 0; t < qt.count; ++t) {
          const T* src = qsrc + (bh * qt.count + t) * qt.rows_per_tile * W;
          const long long r0 = qt.first_row(t), nr = qt.num_rows(t);
          for (long long e = 0; e < nr * W; ++e) dst[r0 * W + e] += src[e];
        }
        const T* ksrc = k_rows_p + side * k_rows_plane;
        for (long long t = 0; t < kt.count; ++t) {
          const T* src = ksrc + (bh * kt.count + t) * kt.rows_per_tile * W;
          const long long r0 = kt.first_row(t), nr = kt.num_rows(t);
          for (long long e = 0; e < nr * W; ++e) dst[r0 * W + e] += src[e];
        }
      }
    }
  });
}

}  // namespace

// Calls f(T{}, std::bool_constant<kBlocked>{}) for the accumulation dtype of q and for whether
// count tables (blocked paths, §2.7) were given.
template <typename F>
void dispatch_dtype_blocked(const at::Tensor& q, const at::Tensor& na, F&& f) {
  const bool blocked = na.defined();
  if (q.scalar_type() == at::kDouble) {
    blocked ? f(double{}, std::true_type{}) : f(double{}, std::false_type{});
  } else {
    blocked ? f(float{}, std::true_type{}) : f(float{}, std::false_type{});
  }
}

void polyline_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& ca, const at::Tensor& cb, const at::Tensor& na,
                                const at::Tensor& nb, double scale, at::Tensor& out,
                                at::Tensor& parts, at::Tensor& lse) {
  dispatch_dtype_blocked(q, na, [&](auto t, auto blocked) {
    forward_impl<decltype(t), decltype(blocked)::value>(q, k, v, ca, cb, na, nb, scale, out,
                                                        parts, lse);
  });
}

void polyline_attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                 const at::Tensor& k, const at::Tensor& v, const at::Tensor& ca,
                                 const at::Tensor& cb, const at::Tensor& na, const at::Tensor& nb,
                                 const at::Tensor& lse, const at::Tensor& delta, double scale,
                                 at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dca,
                                 at::Tensor& dcb) {
  dispatch_dtype_blocked(q, na, [&](auto t, auto blocked) {
    backward_impl<decltype(t), decltype(blocked)::value>(grad_out, q, k, v, ca, cb, na, nb, lse,
                                                         delta, scale, dq, dk, dv, dca, dcb);
  });
}

int parallel_threads_used() {
  const int64_t threads = at::get_num_threads();
  std::vector<std::atomic<int>> ran(static_cast<size_t>(threads));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    ran[static_cast<size_t>(at::get_thread_num())].store(1);
  });
  int used = 0;
  for (auto& r : ran) used += r.load();
  return used;
}

}  // namespace CPU_CAPABILITY
}  // namespace ppma
