// CPU kernels of criss-cross polyline attention (docs/design.md §2.4), compiled once per
// instruction set (CPU_CAPABILITY = DEFAULT / AVX2 / AVX512) like ATen's kernels.
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
  explicit CountTables(const DecayTables& t)
      : na(t.na.defined() ? t.na.const_data_ptr<T>() : nullptr),
        nb(t.nb.defined() ? t.nb.const_data_ptr<T>() : nullptr) {}
  const T* row(int64_t r, int64_t W) const { return na == nullptr ? nullptr : na + r * W; }
  // Gathers columns [l0, l0 + n) of head bh into `dst` (n·H values); null when not blocked.
  const T* gather(int64_t bh, int64_t H, int64_t W, int64_t l0, int64_t n, T* dst) const {
    if (nb == nullptr) return nullptr;
    gather_columns(nb + bh * H * W, H, W, 1, l0, n, dst);
    return dst;
  }
};

// The operands every phase reads: q, k, v and the tables as typed pointers, with the sizes.
template <typename T>
struct LineOperands {
  const T* q;
  const T* k;
  const T* v;
  const T* ca;
  const T* cb;
  CountTables<T> counts;
  T scale;
  int64_t BH, H, W, d, c;

  explicit LineOperands(const AttentionInputs& in)
      : q(in.q.const_data_ptr<T>()), k(in.k.const_data_ptr<T>()), v(in.v.const_data_ptr<T>()),
        ca(in.tables.ca.const_data_ptr<T>()), cb(in.tables.cb.const_data_ptr<T>()),
        counts(in.tables), scale(static_cast<T>(in.scale)), BH(in.q.size(0)), H(in.q.size(1)),
        W(in.q.size(2)), d(in.q.size(3)), c(in.v.size(3)) {}
};

// Columns [l0, l0 + n) of head bh → contiguous tiles: Cb into C, q, k, v into qc, kc, vc, and
// the counts Nb into Nc_buf when some log decay is −inf. Returns the gathered counts, or null.
template <typename T>
const T* gather_column_operands(const LineOperands<T>& in, int64_t bh, int64_t l0, int64_t n,
                                T* C, T* Nc_buf, T* qc, T* kc, T* vc) {
  const int64_t H = in.H, W = in.W, d = in.d, c = in.c;
  gather_columns(in.cb + bh * H * W, H, W, 1, l0, n, C);
  gather_columns(in.q + bh * H * W * d, H, W, d, l0, n, qc);
  gather_columns(in.k + bh * H * W * d, H, W, d, l0, n, kc);
  gather_columns(in.v + bh * H * W * c, H, W, c, l0, n, vc);
  return in.counts.gather(bh, H, W, l0, n, Nc_buf);
}

// Where one head's Â (H, W, W), X₁ and X₂ (H, W, c) live during the forward.
template <typename T>
struct HeadState {
  T* probs;
  T* x1;
  T* x2;
};

// The forward's operands and where its intermediates live. With saved tensors (training) a
// head's Â, X₁, X₂ are written there. Without (inference), where each thread runs whole
// heads, they live in one buffer per thread (O(H·W²) per thread instead of per head, reused
// head after head while in cache); otherwise in temporaries.
template <typename T>
struct ForwardData {
  LineOperands<T> in;
  T* out;
  at::Tensor probs, x1, x2, thread_states;
  bool per_thread;
  int64_t per_head;

  ForwardData(const AttentionInputs& inputs, at::Tensor& out_t, const CrissCrossSaved& saved)
      : in(inputs), out(out_t.mutable_data_ptr<T>()), probs(saved.row_probs), x1(saved.rows_v),
        x2(saved.cols_v) {
    const bool keep = saved.row_probs.defined();
    const int64_t BH = in.BH, H = in.H, W = in.W, c = in.c;
    const auto opts = inputs.v.options();
    per_thread = !keep && whole_heads_per_thread(BH);
    per_head = H * W * W + 2 * H * W * c;
    if (per_thread) {
      thread_states = empty_for_write({at::get_num_threads(), per_head}, opts);
    } else if (!keep) {
      probs = empty_for_write({BH, H, W, W}, opts);
      x1 = empty_for_write({BH, H, W, c}, opts);
      x2 = empty_for_write({BH, H, W, c}, opts);
    }
  }

  HeadState<T> head_state(int64_t bh) const {
    const int64_t H = in.H, W = in.W, c = in.c;
    if (per_thread) {  // the same thread runs all phases of bh, one head after another
      T* buf = thread_states.mutable_data_ptr<T>() + at::get_thread_num() * per_head;
      return {buf, buf + H * W * W, buf + H * W * W + H * W * c};
    }
    return {probs.mutable_data_ptr<T>() + bh * H * W * W,
            x1.mutable_data_ptr<T>() + bh * H * W * c, x2.mutable_data_ptr<T>() + bh * H * W * c};
  }
};

// Rows [i0, i1) of head bh: Â_i and X₁ = R(V).
template <typename T>
void rows_forward(const ForwardData<T>& f, int64_t bh, int64_t i0, int64_t i1) {
  const LineOperands<T>& in = f.in;
  const int64_t W = in.W, d = in.d, c = in.c;
  const HeadState<T> st = f.head_state(bh);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = bh * in.H + i;
    T* p = st.probs + i * W * W;
    tile_gemm<T>(false, true, W, W, d, in.scale, in.q + r * W * d, d, in.k + r * W * d, d, T(0),
                 p, W);
    masked_softmax_tile<T>(p, W, in.ca + r * W, in.counts.row(r, W));
    tile_gemm<T>(false, false, W, c, W, T(1), p, W, in.v + r * W * c, c, T(0), st.x1 + i * W * c,
                 c);
  }
}

// One thread's buffers for a block of gathered columns in the forward: the block's Cb and
// count columns, one column's softmax tile, and the gathered q, k, v, X₁ with the X₂ and output
// columns being formed.
template <typename T>
struct ColumnForwardScratch {
  T* C;
  T* Nc;
  T* p;
  T* qc;
  T* kc;
  T* vc;
  T* x1c;
  T* x2c;
  T* oc;

  explicit ColumnForwardScratch(const LineOperands<T>& in)
      : C(scratch<T, 0>(kColumnBlock * in.H)),
        Nc(in.counts.nb == nullptr ? nullptr : scratch<T, 3>(kColumnBlock * in.H)),
        p(scratch<T, 1>(in.H * in.H)) {
    const int64_t td = kColumnBlock * in.H * in.d, tc = kColumnBlock * in.H * in.c;
    qc = scratch<T, 2>(2 * td + 4 * tc);
    kc = qc + td;
    vc = kc + td;
    x1c = vc + tc;
    x2c = x1c + tc;
    oc = x2c + tc;
  }
};

// Column blocks [t0, t1) of head bh: B̂_l (never kept), X₂ = Cc(V), out = ½ Cc(X₁).
template <typename T>
void columns_forward(const ForwardData<T>& f, int64_t bh, int64_t t0, int64_t t1) {
  const LineOperands<T>& in = f.in;
  const int64_t H = in.H, W = in.W, d = in.d, c = in.c;
  const HeadState<T> st = f.head_state(bh);
  const ColumnForwardScratch<T> sc(in);
  const int64_t vh = bh * H * W * c;
  for (int64_t t = t0; t < t1; ++t) {
    const auto [l0, n] = ColumnBlock(t, W);
    const T* Nc = gather_column_operands(in, bh, l0, n, sc.C, sc.Nc, sc.qc, sc.kc, sc.vc);
    gather_columns(st.x1, H, W, c, l0, n, sc.x1c);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t jc = j * H * c;
      column_probs(sc.qc, sc.kc, sc.C, Nc, H, d, in.scale, j, sc.p);
      tile_gemm<T>(false, false, H, c, H, T(1), sc.p, H, sc.vc + jc, c, T(0), sc.x2c + jc, c);
      tile_gemm<T>(false, false, H, c, H, T(0.5), sc.p, H, sc.x1c + jc, c, T(0), sc.oc + jc, c);
    }
    scatter_columns(sc.x2c, H, W, c, l0, n, st.x2);
    scatter_columns(sc.oc, H, W, c, l0, n, f.out + vh);
  }
}

// Rows [i0, i1) of head bh again: out += ½ R(X₂).
template <typename T>
void rows_again_forward(const ForwardData<T>& f, int64_t bh, int64_t i0, int64_t i1) {
  const int64_t W = f.in.W, c = f.in.c;
  const HeadState<T> st = f.head_state(bh);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = bh * f.in.H + i;
    tile_gemm<T>(false, false, W, c, W, T(0.5), st.probs + i * W * W, W, st.x2 + i * W * c, c,
                 T(1), f.out + r * W * c, c);
  }
}

template <typename T>
void forward_impl(const AttentionInputs& inputs, at::Tensor& out, const CrissCrossSaved& saved) {
  const ForwardData<T> f(inputs, out, saved);
  const Phase rows{f.in.H, [&](int64_t bh, int64_t i0, int64_t i1) {
                     rows_forward(f, bh, i0, i1);
                   }};
  const Phase columns{ColumnBlock::count(f.in.W), [&](int64_t bh, int64_t t0, int64_t t1) {
                        columns_forward(f, bh, t0, t1);
                      }};
  const Phase rows_again{f.in.H, [&](int64_t bh, int64_t i0, int64_t i1) {
                           rows_again_forward(f, bh, i0, i1);
                         }};
  run_phases(f.in.BH, {rows, columns, rows_again});
}

// The backward's operands, saved tensors and results as typed pointers, with the gradients of
// X₁ and X₂ (BH, H, W, c), which the phases pass on to each other.
template <typename T>
struct BackwardData {
  LineOperands<T> in;
  const T* g;
  const T* probs;
  const T* x1;
  const T* x2;
  at::Tensor dx1_t, dx2_t;
  T* dx1;
  T* dx2;
  T* dq;
  T* dk;
  T* dv;
  T* dla;
  T* dlb;

  BackwardData(const at::Tensor& grad_out, const AttentionInputs& inputs,
               const CrissCrossSaved& saved, CrissCrossGrads& grads)
      : in(inputs), g(grad_out.const_data_ptr<T>()),
        probs(saved.row_probs.const_data_ptr<T>()), x1(saved.rows_v.const_data_ptr<T>()),
        x2(saved.cols_v.const_data_ptr<T>()),
        dx1_t(empty_for_write({in.BH, in.H, in.W, in.c}, inputs.v.options())),
        dx2_t(empty_for_write({in.BH, in.H, in.W, in.c}, inputs.v.options())),
        dx1(dx1_t.mutable_data_ptr<T>()), dx2(dx2_t.mutable_data_ptr<T>()),
        dq(grads.dq.mutable_data_ptr<T>()), dk(grads.dk.mutable_data_ptr<T>()),
        dv(grads.dv.mutable_data_ptr<T>()), dla(grads.d_log_alpha.mutable_data_ptr<T>()),
        dlb(grads.d_log_beta.mutable_data_ptr<T>()) {}
};

// Rows [i0, i1) of head bh: dX₂ = ½ Âᵀ g.
template <typename T>
void rows_first_backward(const BackwardData<T>& b, int64_t bh, int64_t i0, int64_t i1) {
  const int64_t H = b.in.H, W = b.in.W, c = b.in.c;
  for (int64_t r = bh * H + i0; r < bh * H + i1; ++r) {
    tile_gemm<T>(true, false, W, c, W, T(0.5), b.probs + r * W * W, W, b.g + r * W * c, c, T(0),
                 b.dx2 + r * W * c, c);
  }
}

// One thread's buffers for a block of gathered columns in the backward: the block's Cb and
// count columns; one column's B̂ tile, its score gradient and the table gradient dC; the
// gathered q, k, v, g, X₁, dX₂, and the dq, dk, dX₁, dv columns being formed.
template <typename T>
struct ColumnBackwardScratch {
  T* C;
  T* Nc;
  T* p;
  T* ds;
  T* dC;
  T* qc;
  T* kc;
  T* dqc;
  T* dkc;
  T* vc;
  T* gc;
  T* x1c;
  T* dx2c;
  T* dx1c;
  T* dvc;

  explicit ColumnBackwardScratch(const LineOperands<T>& in)
      : C(scratch<T, 0>(kColumnBlock * in.H)),
        Nc(in.counts.nb == nullptr ? nullptr : scratch<T, 3>(kColumnBlock * in.H)),
        p(scratch<T, 1>(2 * in.H * in.H + in.H)), ds(p + in.H * in.H), dC(ds + in.H * in.H) {
    const int64_t td = kColumnBlock * in.H * in.d, tc = kColumnBlock * in.H * in.c;
    qc = scratch<T, 2>(4 * td + 7 * tc);
    kc = qc + td;
    dqc = kc + td;
    dkc = dqc + td;
    vc = dkc + td;
    gc = vc + tc;
    x1c = gc + tc;
    dx2c = x1c + tc;
    dx1c = dx2c + tc;
    dvc = dx1c + tc;
  }
};

// Gathered column j of the block at l0 (head bh), B̂ recomputed: dX₁ = ½ B̂ᵀ g;
// dB̂ = ½ g X₁ᵀ + dX₂ Vᵀ → dS; the column parts of dq, dk, dv (first writers) and d log_beta.
template <typename T>
void column_backward(const BackwardData<T>& b, const ColumnBackwardScratch<T>& sc, const T* Nc,
                     int64_t bh, int64_t l0, int64_t j) {
  const int64_t H = b.in.H, W = b.in.W, d = b.in.d, c = b.in.c;
  const int64_t jd = j * H * d, jc = j * H * c;
  const T scale = b.in.scale;
  column_probs(sc.qc, sc.kc, sc.C, Nc, H, d, scale, j, sc.p);
  tile_gemm<T>(true, false, H, c, H, T(0.5), sc.p, H, sc.gc + jc, c, T(0), sc.dx1c + jc, c);
  tile_gemm<T>(false, true, H, H, c, T(0.5), sc.gc + jc, c, sc.x1c + jc, c, T(0), sc.ds, H);
  tile_gemm<T>(false, true, H, H, c, T(1), sc.dx2c + jc, c, sc.vc + jc, c, T(1), sc.ds, H);
  tile_gemm<T>(true, false, H, c, H, T(1), sc.p, H, sc.dx2c + jc, c, T(0), sc.dvc + jc, c);
  softmax_and_mask_backward_tile<T>(sc.p, sc.ds, sc.C + j * H, H, sc.dC);
  tile_gemm<T>(false, false, H, d, H, scale, sc.ds, H, sc.kc + jd, d, T(0), sc.dqc + jd, d);
  tile_gemm<T>(true, false, H, d, H, scale, sc.ds, H, sc.qc + jd, d, T(0), sc.dkc + jd, d);
  criss_cross::cumsum_grad(sc.dC, H, b.dlb + bh * H * W + l0 + j, W);
}

// Column blocks [t0, t1) of head bh, each gathered, run column by column (column_backward)
// and scattered back.
template <typename T>
void columns_backward(const BackwardData<T>& b, int64_t bh, int64_t t0, int64_t t1) {
  const LineOperands<T>& in = b.in;
  const int64_t H = in.H, W = in.W, d = in.d, c = in.c;
  const ColumnBackwardScratch<T> sc(in);
  const int64_t qh = bh * H * W * d, vh = bh * H * W * c;
  for (int64_t t = t0; t < t1; ++t) {
    const auto [l0, n] = ColumnBlock(t, W);
    const T* Nc = gather_column_operands(in, bh, l0, n, sc.C, sc.Nc, sc.qc, sc.kc, sc.vc);
    gather_columns(b.g + vh, H, W, c, l0, n, sc.gc);
    gather_columns(b.x1 + vh, H, W, c, l0, n, sc.x1c);
    gather_columns(b.dx2 + vh, H, W, c, l0, n, sc.dx2c);
    for (int64_t j = 0; j < n; ++j) column_backward(b, sc, Nc, bh, l0, j);
    scatter_columns(sc.dx1c, H, W, c, l0, n, b.dx1 + vh);
    scatter_columns(sc.dqc, H, W, d, l0, n, b.dq + qh);
    scatter_columns(sc.dkc, H, W, d, l0, n, b.dk + qh);
    scatter_columns(sc.dvc, H, W, c, l0, n, b.dv + vh);
  }
}

// Rows [i0, i1) of head bh: dÂ = dX₁ Vᵀ + ½ g X₂ᵀ → dS; the row parts of dq, dk, dv
// (accumulated onto the column parts) and d log_alpha.
template <typename T>
void rows_backward(const BackwardData<T>& b, int64_t bh, int64_t i0, int64_t i1) {
  const LineOperands<T>& in = b.in;
  const int64_t H = in.H, W = in.W, d = in.d, c = in.c;
  T* ds = scratch<T, 1>(W * W + W);
  T* dC = ds + W * W;
  for (int64_t r = bh * H + i0; r < bh * H + i1; ++r) {
    const T* p = b.probs + r * W * W;
    const int64_t ro = r * W * c, qo = r * W * d;
    tile_gemm<T>(false, true, W, W, c, T(1), b.dx1 + ro, c, in.v + ro, c, T(0), ds, W);
    tile_gemm<T>(false, true, W, W, c, T(0.5), b.g + ro, c, b.x2 + ro, c, T(1), ds, W);
    tile_gemm<T>(true, false, W, c, W, T(1), p, W, b.dx1 + ro, c, T(1), b.dv + ro, c);
    softmax_and_mask_backward_tile<T>(p, ds, in.ca + r * W, W, dC);
    tile_gemm<T>(false, false, W, d, W, in.scale, ds, W, in.k + qo, d, T(1), b.dq + qo, d);
    tile_gemm<T>(true, false, W, d, W, in.scale, ds, W, in.q + qo, d, T(1), b.dk + qo, d);
    criss_cross::cumsum_grad(dC, W, b.dla + r * W, int64_t(1));
  }
}

// The saved row softmaxes are exactly 0 on blocked pairs, and so are the recomputed column
// ones: those pairs add nothing to dS, hence nothing to any gradient.
template <typename T>
void backward_impl(const at::Tensor& grad_out, const AttentionInputs& inputs,
                   const CrissCrossSaved& saved, CrissCrossGrads& grads) {
  const BackwardData<T> b(grad_out, inputs, saved, grads);
  const Phase rows_first{b.in.H, [&](int64_t bh, int64_t i0, int64_t i1) {
                           rows_first_backward(b, bh, i0, i1);
                         }};
  const Phase columns{ColumnBlock::count(b.in.W), [&](int64_t bh, int64_t t0, int64_t t1) {
                        columns_backward(b, bh, t0, t1);
                      }};
  const Phase rows{b.in.H, [&](int64_t bh, int64_t i0, int64_t i1) {
                     rows_backward(b, bh, i0, i1);
                   }};
  run_phases(b.in.BH, {rows_first, columns, rows});
}

}  // namespace

void criss_cross_attention_fwd(const AttentionInputs& in, at::Tensor& out,
                               const CrissCrossSaved& saved) {
  if (in.q.scalar_type() == at::kDouble) {
    forward_impl<double>(in, out, saved);
  } else {
    forward_impl<float>(in, out, saved);
  }
}

void criss_cross_attention_bwd(const at::Tensor& grad_out, const AttentionInputs& in,
                               const CrissCrossSaved& saved, CrissCrossGrads& grads) {
  if (in.q.scalar_type() == at::kDouble) {
    backward_impl<double>(grad_out, in, saved, grads);
  } else {
    backward_impl<float>(grad_out, in, saved, grads);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace ppma
