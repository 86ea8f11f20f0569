// CPU kernels of criss-cross polyline attention (docs/design.md §2.4), compiled once per instruction
// set (CPU_CAPABILITY = DEFAULT / AVX2 / AVX512) like ATen's kernels.
//
// Every line (grid row or grid column of one head) is one task: its n×n score tile comes from
// a tile GEMM, and the mask and the softmax are fused into one pass over the tile while it is
// in cache. The row softmaxes Â are kept for the backward (O(N·W) per head); the column
// softmaxes B̂ are recomputed by it from q and k, one extra QKᵀ tile per column, which costs
// no more time than writing and twice reading them back and keeps a third less memory alive.
//
// Forward, with X₁ = R(V) and X₂ = Cc(V):
//   rows:     Â_i (kept), X₁ rows = Â_i V_i
//   columns:  B̂_l, X₂ columns = B̂_l V_l, out columns = ½ B̂_l X₁_l
//   rows:     out rows += ½ Â_i X₂_i
// Backward, with g = dout:
//   rows:     dX₂ = ½ Âᵀ g
//   columns:  B̂_l again; dX₁ = ½ B̂ᵀ g; dB̂ = ½ g X₁ᵀ + dX₂ Vᵀ; dV = B̂ᵀ dX₂; dS → dq, dk,
//             d log_beta
//   rows:     dÂ = dX₁ Vᵀ + ½ g X₂ᵀ; dV += Âᵀ dX₁; dS → dq, dk (accumulated), d log_alpha
// Each phase writes disjoint lines, so no atomics are needed; with enough heads each thread
// runs all phases of whole heads (run_phases). Results are bitwise reproducible for any
// thread count.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <initializer_list>
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

// Fused mask + softmax over the rows [r0, r1) of an n×n tile (leading dimension n), each over
// the keys [r0, r1) of the same span: S[x, span] ← softmax(S[x, span] − |C[x] − C[span]|). The
// whole line is one span, a segment of a blocked line another (see masked_softmax_tile).
template <typename T>
void masked_softmax_span(T* s, int64_t n, const T* C, int64_t r0, int64_t r1) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const int64_t len = r1 - r0, nv = len - len % L;
  const T* Cs = C + r0;
  for (int64_t row = r0; row < r1; ++row) {
    T* sr = s + row * n + r0;
    const Vec cq(C[row]);
    Vec vmax(-std::numeric_limits<T>::infinity());
    for (int64_t x = 0; x < nv; x += L) {
      const Vec v = Vec::loadu(sr + x) - (cq - Vec::loadu(Cs + x)).abs();
      v.store(sr + x);
      vmax = at::vec::maximum(vmax, v);
    }
    T m = at::vec::vec_reduce_all<T>(
        [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, vmax);
    for (int64_t x = nv; x < len; ++x) {
      sr[x] += criss_cross::log_mask(C[row], Cs[x]);
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
    for (int64_t x = nv; x < len; ++x) {
      sr[x] = std::exp(sr[x] - m);
      sum += sr[x];
    }
    const Vec inv(T(1) / sum);
    for (int64_t x = 0; x < nv; x += L) (Vec::loadu(sr + x) * inv).store(sr + x);
    for (int64_t x = nv; x < len; ++x) sr[x] *= T(1) / sum;
  }
}

// Fused mask + softmax over an n×n tile (leading dimension n) of one line: for every query
// row x, S[x, :] ← softmax(S[x, :] − |C[x] − C[:]|). Nc: the line's counts of −inf log decays
// (docs/design.md §2.7), or null. Counts never decrease along a line, so equal counts form
// segments, and a path is open exactly inside one: a query's softmax runs over its segment
// and the keys beyond get probability exactly 0 (C holds the finite sums, exact inside).
template <typename T>
void masked_softmax_tile(T* s, int64_t n, const T* C, const T* Nc) {
  if (Nc == nullptr || Nc[0] == Nc[n - 1]) {
    masked_softmax_span(s, n, C, 0, n);
    return;
  }
  for (int64_t begin = 0, end = 0; begin < n; begin = end) {
    end = criss_cross::segment_end(Nc, n, begin);
    for (int64_t row = begin; row < end; ++row) {
      std::fill(s + row * n, s + row * n + begin, T(0));
      std::fill(s + row * n + end, s + (row + 1) * n, T(0));
    }
    masked_softmax_span(s, n, C, begin, end);
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

// Column blocks of one head: block t covers columns [l0, l0 + n) (n < kColumnBlock for the
// last block when kColumnBlock does not divide W).
struct ColumnBlock {
  static int64_t count(int64_t W) { return (W + kColumnBlock - 1) / kColumnBlock; }
  ColumnBlock(int64_t t, int64_t W) : l0(t * kColumnBlock), n(std::min(kColumnBlock, W - l0)) {}
  int64_t l0, n;
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

// One pass over the lines of every head: run(bh, begin, end) handles tasks [begin, end) of
// head bh, of which there are tasks_per_head (grid rows, or column blocks).
struct Phase {
  int64_t tasks_per_head;
  std::function<void(int64_t bh, int64_t begin, int64_t end)> run;
};

// Runs the phases in order over BH heads. With enough heads each thread takes whole heads
// through every phase: a head's operands and intermediates (≈2 MB at 56×56, d 16) stay in
// that core's caches between phases instead of returning from memory, and no barrier
// separates the phases. Otherwise (few heads) each phase is split over all lines. A line's
// arithmetic is the same either way, so results are bitwise identical.
inline bool whole_heads_per_thread(int64_t BH) {
  const int64_t threads = at::get_num_threads();
  return BH % threads == 0 || BH >= 4 * threads;
}

inline void run_phases(int64_t BH, std::initializer_list<Phase> phases) {
  if (whole_heads_per_thread(BH)) {
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        for (const Phase& phase : phases) phase.run(bh, 0, phase.tasks_per_head);
      }
    });
    return;
  }
  for (const Phase& phase : phases) {
    const int64_t per = phase.tasks_per_head;
    at::parallel_for(0, BH * per, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end;) {  // split [begin, end) at head boundaries
        const int64_t bh = t / per, stop = std::min(end, (bh + 1) * per);
        phase.run(bh, t - bh * per, stop - bh * per);
        t = stop;
      }
    });
  }
}

// A per-thread scratch buffer of at least n elements (reused across calls).
template <typename T, int Slot>
T* scratch(int64_t n) {
  thread_local std::vector<T> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// The column softmaxes B̂_l of a block of gathered columns: scores, mask and softmax of column
// j into `tile` (H×H). Shared by the forward and the backward, which recomputes them rather
// than reading them back from memory, so both see bitwise the same tile. Nc: the gathered
// columns' counts of −inf log decays, or null (§2.7).
template <typename T>
void column_probs(const T* qc, const T* kc, const T* C, const T* Nc, int64_t H, int64_t d,
                  T scale, int64_t j, T* tile) {
  tile_gemm<T>(false, true, H, H, d, scale, qc + j * H * d, d, kc + j * H * d, d, T(0), tile, H);
  masked_softmax_tile<T>(tile, H, C + j * H, Nc == nullptr ? nullptr : Nc + j * H);
}

// The count tables of docs/design.md §2.7 where some log decay is −inf, else null pointers.
template <typename T>
struct CountTables {
  const T* na;  // (BH, H, W), along rows
  const T* nb;  // (BH, H, W), along columns
  CountTables(const at::Tensor& na_t, const at::Tensor& nb_t)
      : na(na_t.defined() ? na_t.const_data_ptr<T>() : nullptr),
        nb(nb_t.defined() ? nb_t.const_data_ptr<T>() : nullptr) {}
  const T* row(int64_t r, int64_t W) const { return na == nullptr ? nullptr : na + r * W; }
  // Gathers columns [l0, l0 + n) of head bh into `dst` (n·H values); null when not blocked.
  const T* gather(int64_t bh, int64_t H, int64_t W, int64_t l0, int64_t n, T* dst) const {
    if (nb == nullptr) return nullptr;
    gather_columns(nb + bh * H * W, H, W, 1, l0, n, dst);
    return dst;
  }
};

// Where one head's Â (H, W, W), X₁ and X₂ (H, W, c) live during the forward.
template <typename T>
struct HeadState {
  T* probs;
  T* x1;
  T* x2;
};

// row_probs, rows_v and cols_v undefined: inference, nothing is kept for a backward. Where each
// thread runs whole heads, a head's Â, X₁ and X₂ then live in one buffer per thread (O(H·W²)
// per thread instead of per head, reused head after head while in cache); otherwise in
// temporaries.
template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& ca, const at::Tensor& cb, const CountTables<T>& counts,
                  T scale, at::Tensor& out, const at::Tensor& row_probs,
                  const at::Tensor& rows_v, const at::Tensor& cols_v) {
  const Grid g{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3)};
  const int64_t H = g.H, W = g.W, d = g.d, c = g.c;
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* cap = ca.const_data_ptr<T>();
  const T* cbp = cb.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const bool keep = row_probs.defined();
  const bool per_thread = !keep && whole_heads_per_thread(g.BH);
  at::Tensor probs = row_probs, x1 = rows_v, x2 = cols_v, thread_states;
  const int64_t per_head = H * W * W + 2 * H * W * c;
  if (per_thread) {
    thread_states = empty_for_write({at::get_num_threads(), per_head}, v.options());
  } else if (!keep) {
    probs = empty_for_write({g.BH, H, W, W}, v.options());
    x1 = empty_for_write({g.BH, H, W, c}, v.options());
    x2 = empty_for_write({g.BH, H, W, c}, v.options());
  }
  const auto head_state = [&](int64_t bh) -> HeadState<T> {
    if (per_thread) {  // the same thread runs all phases of bh, one head after another
      T* buf = thread_states.mutable_data_ptr<T>() + at::get_thread_num() * per_head;
      return {buf, buf + H * W * W, buf + H * W * W + H * W * c};
    }
    return {probs.mutable_data_ptr<T>() + bh * H * W * W, x1.mutable_data_ptr<T>() + bh * H * W * c,
            x2.mutable_data_ptr<T>() + bh * H * W * c};
  };

  // Rows: Â_i and X₁ = R(V).
  const Phase rows{H, [&](int64_t bh, int64_t i0, int64_t i1) {
    const HeadState<T> st = head_state(bh);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = bh * H + i;
      T* p = st.probs + i * W * W;
      tile_gemm<T>(false, true, W, W, d, scale, qp + r * W * d, d, kp + r * W * d, d, T(0), p, W);
      masked_softmax_tile<T>(p, W, cap + r * W, counts.row(r, W));
      tile_gemm<T>(false, false, W, c, W, T(1), p, W, vp + r * W * c, c, T(0),
                   st.x1 + i * W * c, c);
    }
  }};
  // Columns: B̂_l (never kept), X₂ = Cc(V), out = ½ Cc(X₁), a block of columns at a time.
  const Phase columns{ColumnBlock::count(W), [&](int64_t bh, int64_t t0, int64_t t1) {
    const HeadState<T> st = head_state(bh);
    const int64_t td = kColumnBlock * H * d, tc = kColumnBlock * H * c;
    T* C = scratch<T, 0>(kColumnBlock * H);
    T* p = scratch<T, 1>(H * H);
    T* qc = scratch<T, 2>(2 * td + 4 * tc);
    T* Nc_buf = counts.nb == nullptr ? nullptr : scratch<T, 3>(kColumnBlock * H);
    T* kc = qc + td;
    T* vc = kc + td;
    T* x1c = vc + tc;
    T* x2c = x1c + tc;
    T* oc = x2c + tc;
    const int64_t qh = bh * H * W * d, vh = bh * H * W * c;
    for (int64_t t = t0; t < t1; ++t) {
      const auto [l0, n] = ColumnBlock(t, W);
      gather_columns(cbp + bh * H * W, H, W, 1, l0, n, C);
      const T* Nc = counts.gather(bh, H, W, l0, n, Nc_buf);
      gather_columns(qp + qh, H, W, d, l0, n, qc);
      gather_columns(kp + qh, H, W, d, l0, n, kc);
      gather_columns(vp + vh, H, W, c, l0, n, vc);
      gather_columns(st.x1, H, W, c, l0, n, x1c);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t jc = j * H * c;
        column_probs(qc, kc, C, Nc, H, d, scale, j, p);
        tile_gemm<T>(false, false, H, c, H, T(1), p, H, vc + jc, c, T(0), x2c + jc, c);
        tile_gemm<T>(false, false, H, c, H, T(0.5), p, H, x1c + jc, c, T(0), oc + jc, c);
      }
      scatter_columns(x2c, H, W, c, l0, n, st.x2);
      scatter_columns(oc, H, W, c, l0, n, op + vh);
    }
  }};
  // Rows again: out += ½ R(X₂).
  const Phase rows_again{H, [&](int64_t bh, int64_t i0, int64_t i1) {
    const HeadState<T> st = head_state(bh);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = bh * H + i;
      tile_gemm<T>(false, false, W, c, W, T(0.5), st.probs + i * W * W, W, st.x2 + i * W * c, c,
                   T(1), op + r * W * c, c);
    }
  }};
  run_phases(g.BH, {rows, columns, rows_again});
}

// The saved row softmaxes are exactly 0 on blocked pairs, and so are the recomputed column
// ones: those pairs add nothing to dS, hence nothing to any gradient.
template <typename T>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& ca, const at::Tensor& cb,
                   const CountTables<T>& counts, const at::Tensor& row_probs,
                   const at::Tensor& rows_v,
                   const at::Tensor& cols_v, T scale, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv, at::Tensor& d_log_alpha, at::Tensor& d_log_beta) {
  const Grid g{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3)};
  const int64_t H = g.H, W = g.W, d = g.d, c = g.c;
  const T* gp = grad_out.const_data_ptr<T>();
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const T* cap = ca.const_data_ptr<T>();
  const T* cbp = cb.const_data_ptr<T>();
  const T* rp = row_probs.const_data_ptr<T>();
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

  // Rows: dX₂ = ½ Âᵀ g.
  const Phase rows_first{H, [&](int64_t bh, int64_t i0, int64_t i1) {
    for (int64_t r = bh * H + i0; r < bh * H + i1; ++r) {
      tile_gemm<T>(true, false, W, c, W, T(0.5), rp + r * W * W, W, gp + r * W * c, c, T(0),
                   dx2p + r * W * c, c);
    }
  }};
  // Columns, a block at a time, B̂ recomputed: dX₁ = ½ B̂ᵀ g; dB̂ = ½ g X₁ᵀ + dX₂ Vᵀ → dS;
  // the column parts of dq, dk, dv (first writers) and d log_beta.
  const Phase columns{ColumnBlock::count(W), [&](int64_t bh, int64_t t0, int64_t t1) {
    const int64_t td = kColumnBlock * H * d, tc = kColumnBlock * H * c;
    T* C = scratch<T, 0>(kColumnBlock * H);
    T* Nc_buf = counts.nb == nullptr ? nullptr : scratch<T, 3>(kColumnBlock * H);
    T* p = scratch<T, 1>(2 * H * H + H);
    T* ds = p + H * H;
    T* dC = ds + H * H;
    T* qc = scratch<T, 2>(4 * td + 7 * tc);
    T* kc = qc + td;
    T* dqc = kc + td;
    T* dkc = dqc + td;
    T* vc = dkc + td;
    T* gc = vc + tc;
    T* x1c = gc + tc;
    T* dx2c = x1c + tc;
    T* dx1c = dx2c + tc;
    T* dvc = dx1c + tc;
    const int64_t qh = bh * H * W * d, vh = bh * H * W * c;
    for (int64_t t = t0; t < t1; ++t) {
      const auto [l0, n] = ColumnBlock(t, W);
      gather_columns(cbp + bh * H * W, H, W, 1, l0, n, C);
      const T* Nc = counts.gather(bh, H, W, l0, n, Nc_buf);
      gather_columns(qp + qh, H, W, d, l0, n, qc);
      gather_columns(kp + qh, H, W, d, l0, n, kc);
      gather_columns(vp + vh, H, W, c, l0, n, vc);
      gather_columns(gp + vh, H, W, c, l0, n, gc);
      gather_columns(x1p + vh, H, W, c, l0, n, x1c);
      gather_columns(dx2p + vh, H, W, c, l0, n, dx2c);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t jd = j * H * d, jc = j * H * c;
        column_probs(qc, kc, C, Nc, H, d, scale, j, p);
        tile_gemm<T>(true, false, H, c, H, T(0.5), p, H, gc + jc, c, T(0), dx1c + jc, c);
        tile_gemm<T>(false, true, H, H, c, T(0.5), gc + jc, c, x1c + jc, c, T(0), ds, H);
        tile_gemm<T>(false, true, H, H, c, T(1), dx2c + jc, c, vc + jc, c, T(1), ds, H);
        tile_gemm<T>(true, false, H, c, H, T(1), p, H, dx2c + jc, c, T(0), dvc + jc, c);
        softmax_and_mask_backward_tile<T>(p, ds, C + j * H, H, dC);
        tile_gemm<T>(false, false, H, d, H, scale, ds, H, kc + jd, d, T(0), dqc + jd, d);
        tile_gemm<T>(true, false, H, d, H, scale, ds, H, qc + jd, d, T(0), dkc + jd, d);
        criss_cross::cumsum_grad(dC, H, dlbp + bh * H * W + l0 + j, W);
      }
      scatter_columns(dx1c, H, W, c, l0, n, dx1p + vh);
      scatter_columns(dqc, H, W, d, l0, n, dqp + qh);
      scatter_columns(dkc, H, W, d, l0, n, dkp + qh);
      scatter_columns(dvc, H, W, c, l0, n, dvp + vh);
    }
  }};
  // Rows: dÂ = dX₁ Vᵀ + ½ g X₂ᵀ → dS; the row parts of dq, dk, dv (accumulated), d log_alpha.
  const Phase rows{H, [&](int64_t bh, int64_t i0, int64_t i1) {
    T* ds = scratch<T, 1>(W * W + W);
    T* dC = ds + W * W;
    for (int64_t r = bh * H + i0; r < bh * H + i1; ++r) {
      const T* p = rp + r * W * W;
      const int64_t ro = r * W * c, qo = r * W * d;
      tile_gemm<T>(false, true, W, W, c, T(1), dx1p + ro, c, vp + ro, c, T(0), ds, W);
      tile_gemm<T>(false, true, W, W, c, T(0.5), gp + ro, c, x2p + ro, c, T(1), ds, W);
      tile_gemm<T>(true, false, W, c, W, T(1), p, W, dx1p + ro, c, T(1), dvp + ro, c);
      softmax_and_mask_backward_tile<T>(p, ds, cap + r * W, W, dC);
      tile_gemm<T>(false, false, W, d, W, scale, ds, W, kp + qo, d, T(1), dqp + qo, d);
      tile_gemm<T>(true, false, W, d, W, scale, ds, W, qp + qo, d, T(1), dkp + qo, d);
      criss_cross::cumsum_grad(dC, W, dlap + r * W, int64_t(1));
    }
  }};
  run_phases(g.BH, {rows_first, columns, rows});
}

}  // namespace

void criss_cross_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& ca, const at::Tensor& cb, const at::Tensor& na,
                         const at::Tensor& nb, double scale, at::Tensor& out,
                         const at::Tensor& row_probs, const at::Tensor& rows_v,
                         const at::Tensor& cols_v) {
  if (q.scalar_type() == at::kDouble) {
    forward_impl<double>(q, k, v, ca, cb, CountTables<double>(na, nb), scale, out, row_probs,
                         rows_v, cols_v);
  } else {
    forward_impl<float>(q, k, v, ca, cb, CountTables<float>(na, nb), static_cast<float>(scale),
                        out, row_probs, rows_v, cols_v);
  }
}

void criss_cross_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& ca, const at::Tensor& cb,
                          const at::Tensor& na, const at::Tensor& nb,
                          const at::Tensor& row_probs, const at::Tensor& rows_v,
                          const at::Tensor& cols_v, double scale, at::Tensor& dq,
                          at::Tensor& dk, at::Tensor& dv, at::Tensor& d_log_alpha,
                          at::Tensor& d_log_beta) {
  if (q.scalar_type() == at::kDouble) {
    backward_impl<double>(grad_out, q, k, v, ca, cb, CountTables<double>(na, nb), row_probs,
                          rows_v, cols_v, scale, dq, dk, dv, d_log_alpha, d_log_beta);
  } else {
    backward_impl<float>(grad_out, q, k, v, ca, cb, CountTables<float>(na, nb), row_probs,
                         rows_v, cols_v, static_cast<float>(scale), dq, dk, dv, d_log_alpha,
                         d_log_beta);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace ppma
