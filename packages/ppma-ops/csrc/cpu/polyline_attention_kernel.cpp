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
constexpr int64_t kForwardQueryTile = 64;
constexpr int64_t kForwardKeyTile = 256;
constexpr int64_t kBackwardQueryTile = 64;
constexpr int64_t kBackwardKeyTile = 128;

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

// The tables of head bh; undefined count tables (plain problems) give null count pointers.
template <typename T>
HeadTables<T> head_tables(const DecayTables& t, int64_t bh) {
  const int64_t N = t.ca.size(1) * t.ca.size(2);
  const bool blocked = t.na.defined();
  return {t.ca.const_data_ptr<T>() + bh * N, t.cb.const_data_ptr<T>() + bh * N,
          blocked ? t.na.const_data_ptr<T>() + bh * N : nullptr,
          blocked ? t.nb.const_data_ptr<T>() + bh * N : nullptr};
}

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
  SegmentCounts(const HeadTables<T>& tb, int64_t W, int64_t i, int64_t j, int64_t k)
      : na_i(tb.na + i * W), na_k(tb.na + k * W), nb_i(tb.nb + i * W), nb_k(tb.nb + k * W),
        na_ij(na_i[j]), na_kj(na_k[j]), column_leg2_open(nb_k[j] == nb_i[j]) {}

  V blocked1(int64_t l) const {
    return (V(na_ij) != V::loadu(na_i + l)) | (V::loadu(nb_i + l) != V::loadu(nb_k + l));
  }
  V blocked2(int64_t l) const {
    const V row_leg = V(na_kj) != V::loadu(na_k + l);
    return column_leg2_open ? row_leg : V(T(0)) == V(T(0));  // all lanes when the column is cut
  }
  bool open1(int64_t j, int64_t l) const {
    return polyline::path_open(na_i[j], na_i[l], nb_i[l], nb_k[l]);
  }
  bool open2(int64_t j, int64_t l) const {
    return polyline::path_open(na_k[j], na_k[l], nb_k[j], nb_i[j]);
  }
};

// Walks the key tile [v0, v1) as segments inside one grid row: f(k, l0, n, offset).
template <typename F>
inline void for_each_key_segment(int64_t v0, int64_t v1, int64_t W, F&& f) {
  int64_t v = v0;
  while (v < v1) {
    const int64_t k = v / W, l0 = v - k * W;
    const int64_t n = std::min(W - l0, v1 - v);
    f(k, l0, n, v - v0);
    v += n;
  }
}

// ------------------------------------------------------------------------------- forward

// Masked scores of one query row against a key tile: x1 = s + M, x2 = s + Mᵀ, and their maxima.
// kBlocked: −inf where the path crosses a −inf log decay.
template <typename T, bool kBlocked>
inline void masked_scores_row(const T* s, int64_t v0, int64_t v1, int64_t W, int64_t i,
                              int64_t j, const HeadTables<T>& tb, T* x1, T* x2, T* max1,
                              T* max2) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const T* ca_i = tb.ca + i * W;
  const T* cb_i = tb.cb + i * W;
  const T ca_ij = ca_i[j], cb_ij = cb_i[j];
  const T neg_inf = -std::numeric_limits<T>::infinity();
  V vm1(neg_inf), vm2(neg_inf);
  T m1 = neg_inf, m2 = neg_inf;
  for_each_key_segment(v0, v1, W, [&](int64_t k, int64_t l0, int64_t n, int64_t o) {
    const T* ca_k = tb.ca + k * W;
    const T* cb_k = tb.cb + k * W;
    const T ca_kj = ca_k[j];
    const T cb_diff_j = std::abs(cb_k[j] - cb_ij);
    const V vca_ij(ca_ij), vca_kj(ca_kj), vcb_diff_j(cb_diff_j), vneg_inf(neg_inf);
    const SegmentCounts<T> counts = kBlocked ? SegmentCounts<T>(tb, W, i, j, k)
                                             : SegmentCounts<T>{};
    int64_t t = 0;
    for (; t + L <= n; t += L) {
      const int64_t l = l0 + t;
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
      const int64_t l = l0 + t;
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
inline T exp_shift_sum(T* x, int64_t n, T m) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V vm(m);
  V acc(T(0));
  int64_t t = 0;
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
inline void scale_row(T* x, int64_t n, T f) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V vf(f);
  int64_t t = 0;
  for (; t + L <= n; t += L) (V::loadu(x + t) * vf).store(x + t);
  for (; t < n; ++t) x[t] *= f;
}

// The forward's operands and results as typed pointers, with the problem's sizes.
template <typename T>
struct ForwardData {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  T* parts;
  T* lse;
  int64_t BH, N, d, c, H, W;
  T scale;

  ForwardData(const AttentionInputs& in, PolylineForward& fwd)
      : q(in.q.const_data_ptr<T>()), k(in.k.const_data_ptr<T>()), v(in.v.const_data_ptr<T>()),
        out(fwd.out.mutable_data_ptr<T>()), parts(fwd.parts.mutable_data_ptr<T>()),
        lse(fwd.lse.mutable_data_ptr<T>()), BH(in.q.size(0)), N(in.q.size(1)),
        d(in.q.size(2)), c(in.v.size(2)), H(in.tables.ca.size(1)), W(in.tables.ca.size(2)),
        scale(static_cast<T>(in.scale)) {}
};

// One thread's scratch for a query tile against one key tile: S, then P₁ and P₂ stacked (rows
// of nk), and for each of the 2·nq softmax rows its output accumulator (c), running max and sum.
template <typename T>
struct ForwardScratch {
  std::vector<T> s, p, acc, m, l;

  ForwardScratch(int64_t mq, int64_t mk, int64_t c)
      : s(mq * mk), p(2 * mq * mk), acc(2 * mq * c), m(2 * mq), l(2 * mq) {}
  void start_tile(int64_t nq, int64_t c) {
    std::fill(acc.begin(), acc.begin() + 2 * nq * c, T(0));
    std::fill(m.begin(), m.begin() + 2 * nq, -std::numeric_limits<T>::infinity());
    std::fill(l.begin(), l.begin() + 2 * nq, T(0));
  }
};

// Query row r (token u = (i, j)) of the tile against the key tile [v0, v1): masked scores into
// P₁, P₂ (row r of each), then each softmax's online update: P ← exp(x − m_new), running sum
// and accumulator rescaled to the new maximum.
template <typename T, bool kBlocked>
void update_softmax_rows(const ForwardData<T>& f, const HeadTables<T>& tb, int64_t u, int64_t r,
                         int64_t nq, int64_t v0, int64_t v1, ForwardScratch<T>& sc) {
  const int64_t nk = v1 - v0, i = u / f.W, j = u - i * f.W;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T* rows[2] = {sc.p.data() + r * nk, sc.p.data() + (nq + r) * nk};
  T maxima[2];
  masked_scores_row<T, kBlocked>(sc.s.data() + r * nk, v0, v1, f.W, i, j, tb, rows[0], rows[1],
                                 &maxima[0], &maxima[1]);
  for (int side = 0; side < 2; ++side) {
    const int64_t idx = side * nq + r;
    const T m_new = std::max(sc.m[idx], maxima[side]);
    // Every key so far blocked (§2.7): the tile adds nothing (and exp(−inf − (−inf)) would be
    // NaN). Plain problems never get here: their scores are finite.
    if (kBlocked && m_new == neg_inf) {
      std::fill(rows[side], rows[side] + nk, T(0));
      continue;
    }
    const T sum = exp_shift_sum(rows[side], nk, m_new);
    const T factor = polyline::rescale_factor(sc.m[idx], m_new);
    sc.l[idx] = sc.l[idx] * factor + sum;
    sc.m[idx] = m_new;
    if (factor != T(1)) scale_row(sc.acc.data() + idx * f.c, f.c, factor);
  }
}

// The finished tile [u0, u0 + nq) of head bh: O₁, O₂, their average and log-sum-exps.
template <typename T>
void write_query_tile(const ForwardData<T>& f, int64_t bh, int64_t u0, int64_t nq,
                      const ForwardScratch<T>& sc) {
  const int64_t N = f.N, c = f.c;
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t u = u0 + r;
    const T inv1 = T(1) / sc.l[r], inv2 = T(1) / sc.l[nq + r];
    const T* a1 = sc.acc.data() + r * c;
    const T* a2 = sc.acc.data() + (nq + r) * c;
    T* o1 = f.parts + ((bh * 2 + 0) * N + u) * c;
    T* o2 = f.parts + ((bh * 2 + 1) * N + u) * c;
    T* o = f.out + (bh * N + u) * c;
    for (int64_t e = 0; e < c; ++e) {
      o1[e] = a1[e] * inv1;
      o2[e] = a2[e] * inv2;
      o[e] = T(0.5) * (o1[e] + o2[e]);
    }
    f.lse[(bh * 2 + 0) * N + u] = sc.m[r] + std::log(sc.l[r]);
    f.lse[(bh * 2 + 1) * N + u] = sc.m[nq + r] + std::log(sc.l[nq + r]);
  }
}

// Query tile `tile` of head bh against every key tile.
template <typename T, bool kBlocked>
void forward_query_tile(const ForwardData<T>& f, const DecayTables& tables, const Tiling& qt,
                        const Tiling& kt, int64_t bh, int64_t tile, ForwardScratch<T>& sc) {
  int64_t u0, u1;
  qt.range(tile, &u0, &u1);
  const int64_t nq = u1 - u0, N = f.N, d = f.d, c = f.c;
  const T* qtile = f.q + (bh * N + u0) * d;
  const HeadTables<T> tb = head_tables<T>(tables, bh);
  sc.start_tile(nq, c);
  for (int64_t kt_i = 0; kt_i < kt.count; ++kt_i) {
    int64_t v0, v1;
    kt.range(kt_i, &v0, &v1);
    const int64_t nk = v1 - v0;
    tile_gemm<T>(false, true, nq, nk, d, f.scale, qtile, d, f.k + (bh * N + v0) * d, d, T(0),
                 sc.s.data(), nk);
    for (int64_t r = 0; r < nq; ++r) {
      update_softmax_rows<T, kBlocked>(f, tb, u0 + r, r, nq, v0, v1, sc);
    }
    // [O₁; O₂] += [P₁; P₂]·V_tile: one GEMM for both softmax states.
    tile_gemm<T>(false, false, 2 * nq, c, nk, T(1), sc.p.data(), nk, f.v + (bh * N + v0) * c, c,
                 T(1), sc.acc.data(), c);
  }
  write_query_tile(f, bh, u0, nq, sc);
}

template <typename T, bool kBlocked>
void forward_impl(const AttentionInputs& in, PolylineForward& fwd) {
  const ForwardData<T> f(in, fwd);
  const Tiling qt(f.H, f.W, kForwardQueryTile), kt(f.H, f.W, kForwardKeyTile);
  at::parallel_for(0, f.BH * qt.count, 1, [&](int64_t begin, int64_t end) {
    ForwardScratch<T> sc(qt.max_len, kt.max_len, f.c);
    for (int64_t item = begin; item < end; ++item) {
      forward_query_tile<T, kBlocked>(f, in.tables, qt, kt, item / qt.count, item % qt.count,
                                      sc);
    }
  });
}

// ------------------------------------------------------------------------------ backward

// The log-sum-exps and softmax-backward row sums of one query's two softmaxes.
template <typename T>
struct QueryStats {
  T lse1, lse2, delta1, delta2;
};

// Where the query pass puts one query row's mask-gradient terms: the query's own dCa[i,j],
// dCb[i,j] (accumulated over key tiles) and the cross terms dCa[i,l], dCb[i,l] of its grid
// row (row i of the query tile's partial rows).
template <typename T>
struct QueryRowOut {
  T* own_ca;
  T* own_cb;
  T* row_ca;
  T* row_cb;
};

// Where the key pass puts them: P̄ = ½(P₁ + P₂) of the row (for dV), the keys' own dCa[k,l],
// dCb[k,l] (per key of the tile) and the cross terms dCa[k,j], dCb[k,j] (the key tile's
// partial rows, W wide, first grid row keyrow0).
template <typename T>
struct KeyRowOut {
  T* pbar;
  T* key_ca;
  T* key_cb;
  T* keyrows_ca;
  T* keyrows_cb;
  int64_t keyrow0;
};

// The query pass's accumulation over one row (see grad_row): add() per score, vector lanes or
// a scalar tail entry at key column l; segment_end() per key segment; finish() once.
template <typename T>
class QueryRowGrads {
 public:
  using V = Vectorized<T>;
  using Out = QueryRowOut<T>;
  explicit QueryRowGrads(const Out& out) : out_(out) {}

  void segment_begin() {}
  void add(int64_t l, int64_t /*idx*/, const V& da1, const V& db1, const V& /*da2*/,
           const V& /*p1*/, const V& /*p2*/, const V& g1, const V& /*g2*/) {
    const V a1 = sign_times(da1, g1);
    own_ca_lanes_ = own_ca_lanes_ - a1;
    (V::loadu(out_.row_ca + l) + a1).store(out_.row_ca + l);
    (V::loadu(out_.row_cb + l) - sign_times(db1, g1)).store(out_.row_cb + l);
  }
  void add(int64_t l, int64_t /*idx*/, T da1, T db1, T /*da2*/, T /*p1*/, T /*p2*/, T g1,
           T /*g2*/) {
    const T a1 = polyline::abs_grad(da1) * g1;
    own_ca_ -= a1;
    out_.row_ca[l] += a1;
    out_.row_cb[l] -= polyline::abs_grad(db1) * g1;
  }
  void segment_end(int64_t /*k*/, int64_t /*j*/, int64_t /*W*/, T sign_b2, T g2_total) {
    own_cb_ += sign_b2 * g2_total;
  }
  void finish() {
    *out_.own_ca += own_ca_ + reduce_sum(own_ca_lanes_);
    *out_.own_cb += own_cb_;
  }

 private:
  Out out_;
  V own_ca_lanes_{T(0)};
  T own_ca_ = T(0), own_cb_ = T(0);
};

// The key pass's accumulation over one row (see QueryRowGrads); idx is the score's offset in
// the key tile.
template <typename T>
class KeyRowGrads {
 public:
  using V = Vectorized<T>;
  using Out = KeyRowOut<T>;
  explicit KeyRowGrads(const Out& out) : out_(out) {}

  void segment_begin() {
    cross_lanes_ = V(T(0));
    cross_ = T(0);
  }
  void add(int64_t /*l*/, int64_t idx, const V& /*da1*/, const V& db1, const V& da2,
           const V& p1, const V& p2, const V& g1, const V& g2) {
    (V(T(0.5)) * (p1 + p2)).store(out_.pbar + idx);
    const V a2 = sign_times(da2, g2);
    (V::loadu(out_.key_ca + idx) - a2).store(out_.key_ca + idx);
    (V::loadu(out_.key_cb + idx) + sign_times(db1, g1)).store(out_.key_cb + idx);
    cross_lanes_ = cross_lanes_ + a2;
  }
  void add(int64_t /*l*/, int64_t idx, T /*da1*/, T db1, T da2, T p1, T p2, T g1, T g2) {
    out_.pbar[idx] = T(0.5) * (p1 + p2);
    const T a2 = polyline::abs_grad(da2) * g2;
    out_.key_ca[idx] -= a2;
    out_.key_cb[idx] += polyline::abs_grad(db1) * g1;
    cross_ += a2;
  }
  void segment_end(int64_t k, int64_t j, int64_t W, T sign_b2, T g2_total) {
    const int64_t kr = (k - out_.keyrow0) * W + j;
    out_.keyrows_ca[kr] += cross_ + reduce_sum(cross_lanes_);
    out_.keyrows_cb[kr] -= sign_b2 * g2_total;
  }
  void finish() {}

 private:
  Out out_;
  V cross_lanes_{T(0)};
  T cross_ = T(0);
};

// Backward, one query row (i, j) against one key tile [v0, v1). Recomputes P₁, P₂ from the
// log-sum-exps, writes dS = dS₁ + dS₂ to ds and hands every score's terms to the pass's Sink
// (QueryRowGrads or KeyRowGrads), which accumulates the mask-gradient terms that pass owns.
// kBlocked: P₁, P₂ are 0 where the path crosses a −inf log decay (§2.7), so those pairs add
// nothing to any gradient; the table differences stay finite (finite partial sums).
template <typename T, bool kBlocked, typename Sink>
inline void grad_row(const T* s, const T* dp, int64_t v0, int64_t v1, int64_t W, int64_t i,
                     int64_t j, const HeadTables<T>& tb, const QueryStats<T>& st, T* ds,
                     const typename Sink::Out& out) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  Sink sink(out);  // a local: its accumulators stay in registers
  const T* ca_i = tb.ca + i * W;
  const T* cb_i = tb.cb + i * W;
  const T ca_ij = ca_i[j], cb_ij = cb_i[j];
  const V vlse1(st.lse1), vlse2(st.lse2), vdelta1(st.delta1), vdelta2(st.delta2);
  for_each_key_segment(v0, v1, W, [&](int64_t k, int64_t l0, int64_t n, int64_t o) {
    const T* ca_k = tb.ca + k * W;
    const T* cb_k = tb.cb + k * W;
    const T ca_kj = ca_k[j];
    const T cb_kj_minus_ij = cb_k[j] - cb_ij;
    const T cb_diff_j = std::abs(cb_kj_minus_ij);
    const V vca_ij(ca_ij), vca_kj(ca_kj), vcb_diff_j(cb_diff_j), vzero(T(0));
    const SegmentCounts<T> counts = kBlocked ? SegmentCounts<T>(tb, W, i, j, k)
                                             : SegmentCounts<T>{};
    sink.segment_begin();
    V g2_sum(T(0));
    T g2_sum_s = T(0);
    int64_t t = 0;
    for (; t + L <= n; t += L) {
      const int64_t l = l0 + t;
      const V dpv = V::loadu(dp + o + t);
      const V da1 = vca_ij - V::loadu(ca_i + l);
      const V db1 = V::loadu(cb_i + l) - V::loadu(cb_k + l);
      const V da2 = V::loadu(ca_k + l) - vca_kj;
      const V sv = V::loadu(s + o + t);
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
      sink.add(l, o + t, da1, db1, da2, p1, p2, g1, g2);
    }
    for (; t < n; ++t) {
      const int64_t l = l0 + t;
      const T da1 = ca_ij - ca_i[l];
      const T db1 = cb_i[l] - cb_k[l];
      const T da2 = ca_k[l] - ca_kj;
      T p1 = std::exp(s[o + t] - std::abs(da1) - std::abs(db1) - st.lse1);
      T p2 = std::exp(s[o + t] - std::abs(da2) - cb_diff_j - st.lse2);
      if constexpr (kBlocked) {
        p1 = counts.open1(j, l) ? p1 : T(0);
        p2 = counts.open2(j, l) ? p2 : T(0);
      }
      const T g1 = polyline::softmax_grad(p1, dp[o + t], st.delta1);
      const T g2 = polyline::softmax_grad(p2, dp[o + t], st.delta2);
      ds[o + t] = g1 + g2;
      g2_sum_s += g2;
      sink.add(l, o + t, da1, db1, da2, p1, p2, g1, g2);
    }
    sink.segment_end(k, j, W, polyline::abs_grad(cb_kj_minus_ij), g2_sum_s + reduce_sum(g2_sum));
  });
  sink.finish();
}

// Per-tile partial rows of the mask gradients (one plane for Ca, one for Cb), each tile's rows
// W wide: summed in tile order at the end, so results do not depend on the thread count.
template <typename T>
struct RowPartials {
  at::Tensor buffer;  // (2, BH, tiles, rows_per_tile, W), zeros
  T* data;
  const Tiling* tiling;
  int64_t W, plane;

  RowPartials(const Tiling& t, int64_t BH, int64_t W_, const at::TensorOptions& opts)
      : buffer(at::zeros({2, BH, t.count, t.rows_per_tile, W_}, opts)),
        data(buffer.mutable_data_ptr<T>()), tiling(&t), W(W_),
        plane(BH * t.count * t.rows_per_tile * W_) {}
  T* ca(int64_t bh, int64_t tile) const {
    return data + (bh * tiling->count + tile) * tiling->rows_per_tile * W;
  }
  T* cb(int64_t bh, int64_t tile) const { return ca(bh, tile) + plane; }
};

// The backward's operands and results as typed pointers, with the problem's sizes and tilings.
template <typename T>
struct BackwardData {
  const T* go;
  const T* q;
  const T* k;
  const T* v;
  const T* lse;
  const T* delta;
  T* dq;
  T* dk;
  T* dv;
  T* dca;
  T* dcb;
  int64_t BH, N, d, c, H, W;
  T scale;
  Tiling qt, kt;

  BackwardData(const at::Tensor& grad_out, const AttentionInputs& in, const at::Tensor& lse_,
               const at::Tensor& delta_, PolylineGrads& g)
      : go(grad_out.const_data_ptr<T>()), q(in.q.const_data_ptr<T>()),
        k(in.k.const_data_ptr<T>()), v(in.v.const_data_ptr<T>()), lse(lse_.const_data_ptr<T>()),
        delta(delta_.const_data_ptr<T>()), dq(g.dq.mutable_data_ptr<T>()),
        dk(g.dk.mutable_data_ptr<T>()), dv(g.dv.mutable_data_ptr<T>()),
        dca(g.dca.mutable_data_ptr<T>()), dcb(g.dcb.mutable_data_ptr<T>()), BH(in.q.size(0)),
        N(in.q.size(1)), d(in.q.size(2)), c(in.v.size(2)), H(in.tables.ca.size(1)),
        W(in.tables.ca.size(2)), scale(static_cast<T>(in.scale)),
        qt(H, W, kBackwardQueryTile), kt(H, W, kBackwardKeyTile) {}

  QueryStats<T> stats(int64_t bh, int64_t u) const {
    return {lse[(bh * 2) * N + u], lse[(bh * 2 + 1) * N + u], delta[(bh * 2) * N + u],
            delta[(bh * 2 + 1) * N + u]};
  }
};

// One thread's scratch for the query pass: S, dP and dS tiles and the tile's dQ accumulator.
template <typename T>
struct QueryPassScratch {
  std::vector<T> s, dp, ds, dq;
  QueryPassScratch(int64_t mq, int64_t mk, int64_t d)
      : s(mq * mk), dp(mq * mk), ds(mq * mk), dq(mq * d) {}
};

// One thread's scratch for the key pass: S, dP, dS and P̄ tiles, the tile's dK and dV
// accumulators and its keys' own table gradients.
template <typename T>
struct KeyPassScratch {
  std::vector<T> s, dp, ds, pbar, dk, dv, key_ca, key_cb;
  KeyPassScratch(int64_t mq, int64_t mk, int64_t d, int64_t c)
      : s(mq * mk), dp(mq * mk), ds(mq * mk), pbar(mq * mk), dk(mk * d), dv(mk * c),
        key_ca(mk), key_cb(mk) {}
};

// S = scale·Q·Kᵀ and dP = ½·dO·Vᵀ (the ½ of the average of the two softmaxes) for the query
// tile [u0, u0 + nq) against the key tile [v0, v0 + nk) of head bh.
template <typename T>
void score_tiles(const BackwardData<T>& b, int64_t bh, int64_t u0, int64_t nq, int64_t v0,
                 int64_t nk, T* s, T* dp) {
  const int64_t N = b.N, d = b.d, c = b.c;
  tile_gemm<T>(false, true, nq, nk, d, b.scale, b.q + (bh * N + u0) * d, d,
               b.k + (bh * N + v0) * d, d, T(0), s, nk);
  tile_gemm<T>(false, true, nq, nk, c, T(0.5), b.go + (bh * N + u0) * c, c,
               b.v + (bh * N + v0) * c, c, T(0), dp, nk);
}

// Query pass, one query tile: dQ and the query-owned mask terms (this tile's tokens of dca,
// dcb, which it is the first to write, and its partial rows).
template <typename T, bool kBlocked>
void query_tile_backward(const BackwardData<T>& b, const DecayTables& tables,
                         const RowPartials<T>& rows, int64_t bh, int64_t tile,
                         QueryPassScratch<T>& sc) {
  const Tiling& qt = b.qt;
  const int64_t N = b.N, W = b.W, d = b.d;
  int64_t u0, u1;
  qt.range(tile, &u0, &u1);
  const int64_t nq = u1 - u0, row0 = qt.first_row(tile);
  const HeadTables<T> tb = head_tables<T>(tables, bh);
  std::fill(sc.dq.begin(), sc.dq.begin() + nq * d, T(0));
  std::fill(b.dca + bh * N + u0, b.dca + bh * N + u1, T(0));
  std::fill(b.dcb + bh * N + u0, b.dcb + bh * N + u1, T(0));
  for (int64_t kt_i = 0; kt_i < b.kt.count; ++kt_i) {
    int64_t v0, v1;
    b.kt.range(kt_i, &v0, &v1);
    const int64_t nk = v1 - v0;
    score_tiles(b, bh, u0, nq, v0, nk, sc.s.data(), sc.dp.data());
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t u = u0 + r, i = u / W, j = u - i * W;
      const QueryRowOut<T> out{b.dca + bh * N + u, b.dcb + bh * N + u,
                               rows.ca(bh, tile) + (i - row0) * W,
                               rows.cb(bh, tile) + (i - row0) * W};
      grad_row<T, kBlocked, QueryRowGrads<T>>(sc.s.data() + r * nk, sc.dp.data() + r * nk, v0,
                                              v1, W, i, j, tb, b.stats(bh, u),
                                              sc.ds.data() + r * nk, out);
    }
    tile_gemm<T>(false, false, nq, d, nk, b.scale, sc.ds.data(), nk, b.k + (bh * N + v0) * d,
                 d, T(1), sc.dq.data(), d);
  }
  std::copy(sc.dq.begin(), sc.dq.begin() + nq * d, b.dq + (bh * N + u0) * d);
}

// Key pass, one key tile: dK, dV and the key-owned mask terms (added to the per-token
// gradients the query pass wrote; each key token belongs to one key tile).
template <typename T, bool kBlocked>
void key_tile_backward(const BackwardData<T>& b, const DecayTables& tables,
                       const RowPartials<T>& rows, int64_t bh, int64_t tile,
                       KeyPassScratch<T>& sc) {
  const int64_t N = b.N, W = b.W, d = b.d, c = b.c;
  int64_t v0, v1;
  b.kt.range(tile, &v0, &v1);
  const int64_t nk = v1 - v0;
  const HeadTables<T> tb = head_tables<T>(tables, bh);
  std::fill(sc.dk.begin(), sc.dk.begin() + nk * d, T(0));
  std::fill(sc.dv.begin(), sc.dv.begin() + nk * c, T(0));
  std::fill(sc.key_ca.begin(), sc.key_ca.begin() + nk, T(0));
  std::fill(sc.key_cb.begin(), sc.key_cb.begin() + nk, T(0));
  for (int64_t qt_i = 0; qt_i < b.qt.count; ++qt_i) {
    int64_t u0, u1;
    b.qt.range(qt_i, &u0, &u1);
    const int64_t nq = u1 - u0;
    score_tiles(b, bh, u0, nq, v0, nk, sc.s.data(), sc.dp.data());
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t u = u0 + r, i = u / W, j = u - i * W;
      const KeyRowOut<T> out{sc.pbar.data() + r * nk, sc.key_ca.data(), sc.key_cb.data(),
                             rows.ca(bh, tile), rows.cb(bh, tile), b.kt.first_row(tile)};
      grad_row<T, kBlocked, KeyRowGrads<T>>(sc.s.data() + r * nk, sc.dp.data() + r * nk, v0,
                                            v1, W, i, j, tb, b.stats(bh, u),
                                            sc.ds.data() + r * nk, out);
    }
    // dV += P̄ᵀ·dO, dK += scale·dSᵀ·Q.
    tile_gemm<T>(true, false, nk, c, nq, T(1), sc.pbar.data(), nk, b.go + (bh * N + u0) * c, c,
                 T(1), sc.dv.data(), c);
    tile_gemm<T>(true, false, nk, d, nq, b.scale, sc.ds.data(), nk, b.q + (bh * N + u0) * d, d,
                 T(1), sc.dk.data(), d);
  }
  std::copy(sc.dk.begin(), sc.dk.begin() + nk * d, b.dk + (bh * N + v0) * d);
  std::copy(sc.dv.begin(), sc.dv.begin() + nk * c, b.dv + (bh * N + v0) * c);
  for (int64_t e = 0; e < nk; ++e) {
    b.dca[bh * N + v0 + e] += sc.key_ca[e];
    b.dcb[bh * N + v0 + e] += sc.key_cb[e];
  }
}

// dca, dcb of head bh += the partial rows of every tile of `rows`, in tile order.
template <typename T>
void add_row_partials(const RowPartials<T>& rows, int64_t bh, T* dca, T* dcb) {
  const Tiling& t = *rows.tiling;
  for (int64_t tile = 0; tile < t.count; ++tile) {
    const T* src_a = rows.ca(bh, tile);
    const T* src_b = rows.cb(bh, tile);
    const int64_t first = t.first_row(tile) * rows.W, count = t.num_rows(tile) * rows.W;
    for (int64_t e = 0; e < count; ++e) dca[first + e] += src_a[e];
    for (int64_t e = 0; e < count; ++e) dcb[first + e] += src_b[e];
  }
}

template <typename T, bool kBlocked>
void backward_impl(const at::Tensor& grad_out, const AttentionInputs& in, const at::Tensor& lse,
                   const at::Tensor& delta, PolylineGrads& grads) {
  const BackwardData<T> b(grad_out, in, lse, delta, grads);
  const auto opts = in.tables.ca.options();
  const RowPartials<T> q_rows(b.qt, b.BH, b.W, opts), k_rows(b.kt, b.BH, b.W, opts);
  at::parallel_for(0, b.BH * b.qt.count, 1, [&](int64_t begin, int64_t end) {
    QueryPassScratch<T> sc(b.qt.max_len, b.kt.max_len, b.d);
    for (int64_t item = begin; item < end; ++item) {
      query_tile_backward<T, kBlocked>(b, in.tables, q_rows, item / b.qt.count,
                                       item % b.qt.count, sc);
    }
  });
  at::parallel_for(0, b.BH * b.kt.count, 1, [&](int64_t begin, int64_t end) {
    KeyPassScratch<T> sc(b.qt.max_len, b.kt.max_len, b.d, b.c);
    for (int64_t item = begin; item < end; ++item) {
      key_tile_backward<T, kBlocked>(b, in.tables, k_rows, item / b.kt.count, item % b.kt.count,
                                     sc);
    }
  });
  // Row partials, query tiles first, each in tile order: a fixed order.
  at::parallel_for(0, b.BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      add_row_partials(q_rows, bh, b.dca + bh * b.N, b.dcb + bh * b.N);
      add_row_partials(k_rows, bh, b.dca + bh * b.N, b.dcb + bh * b.N);
    }
  });
}

// Calls f(T{}, std::bool_constant<kBlocked>{}) for the accumulation dtype of the inputs and for
// whether count tables (blocked paths, §2.7) were given.
template <typename F>
void dispatch_dtype_blocked(const AttentionInputs& in, F&& f) {
  const bool blocked = in.tables.na.defined();
  if (in.q.scalar_type() == at::kDouble) {
    blocked ? f(double{}, std::true_type{}) : f(double{}, std::false_type{});
  } else {
    blocked ? f(float{}, std::true_type{}) : f(float{}, std::false_type{});
  }
}

}  // namespace

void polyline_attention_fwd(const AttentionInputs& in, PolylineForward& fwd) {
  dispatch_dtype_blocked(in, [&](auto t, auto blocked) {
    forward_impl<decltype(t), decltype(blocked)::value>(in, fwd);
  });
}

void polyline_attention_bwd(const at::Tensor& grad_out, const AttentionInputs& in,
                            const at::Tensor& lse, const at::Tensor& delta,
                            PolylineGrads& grads) {
  dispatch_dtype_blocked(in, [&](auto t, auto blocked) {
    backward_impl<decltype(t), decltype(blocked)::value>(grad_out, in, lse, delta, grads);
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
