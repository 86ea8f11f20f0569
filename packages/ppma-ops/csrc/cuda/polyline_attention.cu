// Vanilla polyline attention (docs/design.md §2.3), CUDA kernels behind the entry points of
// polyline_attention_kernel.h (called by the host code in csrc/polyline_attention.cpp).
//
// Forward, FlashAttention style without tensor cores: one thread owns one query row, a block
// of kFwdThreads consecutive queries sweeps the keys in tiles of kFwdKeyTile kept in shared
// memory. Each score s = scale·q·k is computed once and feeds both online-softmax states
// (mask M and mask Mᵀ); both masks come from the cumsum tables Ca, Cb (in shared memory when
// they fit, else read through the cache). Nothing of size N×N exists.
//
// Backward, deterministic without atomics: P₁, P₂ are recomputed from the saved log-sum-exps
// in two passes, each output element having exactly one owner thread:
//   query pass (one thread per query u = (i, j)): dQ, the query-side mask terms dCa[i,j],
//     dCb[i,j], and the cross terms dCa[i,l], dCb[i,l] (query row i, key column l);
//   key pass (one thread per key v = (k, l)): dK, dV, the key-side terms dCa[k,l], dCb[k,l],
//     and the cross terms dCa[k,j], dCb[k,j] (key row k, query column j).
// Cross terms are first collected per thread in shared memory, then summed in a fixed order by
// one owner thread per (grid row of the block, column) into a per-block partial buffer. Blocks
// are aligned to grid rows (polyline::Tiling), so a grid row spans one block or, for rows longer
// than a block, a fixed set of row segments summed afterwards in segment order. The host code
// then turns the table gradients into log-decay gradients (reverse cumsums along W / H).
#include <ATen/ATen.h>

#include <vector>

#include "../polyline_attention_kernel.h"
#include "../polyline_attention_math.h"
#include "cuda_common.cuh"

namespace ppma {
namespace cuda {
namespace {

using polyline::Tiling;

constexpr int kFwdThreads = 128;  // queries per forward block
constexpr int kFwdKeyTile = 32;   // keys per shared-memory tile (forward)
constexpr int kBwdThreads = 64;   // queries (query pass) or keys (key pass) per backward block
constexpr int kBwdTile = 32;      // keys (query pass) or queries (key pass) per smem tile
constexpr int kContribLd = kBwdTile + 1;  // padded row of the cross-term scratch
// Tables go to shared memory only while a block stays small enough for several blocks per SM.
constexpr size_t kTableSmemCap = 100 * 1024;

template <typename T>
__device__ __forceinline__ T exp_of(T x) {
  if constexpr (sizeof(T) == 4) {
    return expf(x);
  } else {
    return exp(x);
  }
}

template <typename T>
__device__ __forceinline__ T log_of(T x) {
  if constexpr (sizeof(T) == 4) {
    return logf(x);
  } else {
    return log(x);
  }
}

// Points `ca`, `cb` at a shared-memory copy of this head's tables when requested. The caller
// synchronises before the first use.
template <typename acc_t>
__device__ __forceinline__ void stage_tables(bool in_smem, acc_t* smem, int64_t N,
                                             const acc_t*& ca, const acc_t*& cb) {
  if (!in_smem) return;
  for (int64_t x = threadIdx.x; x < N; x += blockDim.x) {
    smem[x] = ca[x];
    smem[N + x] = cb[x];
  }
  ca = smem;
  cb = smem + N;
}

// The device pointers every kernel reads: q, k, v (BH, N, ·), the tables (BH, H, W) and one
// flag per head that says whether it has a −inf log decay, with the problem's sizes.
template <typename acc_t>
struct Operands {
  const acc_t* q;
  const acc_t* k;
  const acc_t* v;
  const acc_t* ca;
  const acc_t* cb;
  const acc_t* na;
  const acc_t* nb;
  const unsigned char* head_blocked;
  int64_t H, W, d, c;
  acc_t scale;
};

// Count tables of head bh (docs/design.md §2.7) when that head has a −inf log decay, else
// null: the kernels then evaluate the plain masks. The flag is uniform over a block (one head
// per block), so plain heads pay one predictable branch per score.
template <typename acc_t>
struct HeadCounts {
  const acc_t* na = nullptr;
  const acc_t* nb = nullptr;
  __device__ HeadCounts(const Operands<acc_t>& op, int64_t bh) {
    const int64_t N = op.H * op.W;
    if (op.head_blocked[bh]) {
      na = op.na + bh * N;
      nb = op.nb + bh * N;
    }
  }
  // log M for query (i, j), key (k, l), given its plain value; blocked per §2.7. The operands
  // of polyline::path_open are those of polyline::log_mask, with counts for sums.
  __device__ __forceinline__ acc_t mask1(acc_t plain, int64_t W, int64_t i, int64_t j,
                                         int64_t k, int64_t l) const {
    if (na == nullptr) return plain;
    return polyline::path_open(na[i * W + j], na[i * W + l], nb[i * W + l], nb[k * W + l])
               ? plain
               : acc_t(-INFINITY);
  }
  // log Mᵀ for the same pair.
  __device__ __forceinline__ acc_t mask2(acc_t plain, int64_t W, int64_t i, int64_t j,
                                         int64_t k, int64_t l) const {
    if (na == nullptr) return plain;
    return polyline::path_open(na[k * W + j], na[k * W + l], nb[k * W + j], nb[i * W + j])
               ? plain
               : acc_t(-INFINITY);
  }
};

// Copies rows [row0, row0 + rows) of a (·, width) matrix into a (tile_rows, kDim) tile, zero
// outside (so register loops may run over the full kDim without bounds).
template <typename acc_t, int kDim>
__device__ __forceinline__ void load_tile(acc_t* tile, int tile_rows, const acc_t* src,
                                          int64_t rows, int64_t width) {
  for (int x = threadIdx.x; x < tile_rows * kDim; x += blockDim.x) {
    const int t = x / kDim, e = x - t * kDim;
    tile[x] = (t < rows && e < width) ? src[t * width + e] : acc_t(0);
  }
}

// reg ← row[0, width) in registers, zero beyond width and for inactive threads.
template <typename acc_t, int kDim>
__device__ __forceinline__ void load_row(acc_t (&reg)[kDim], const acc_t* row, bool active,
                                         int64_t width) {
#pragma unroll
  for (int e = 0; e < kDim; ++e) reg[e] = (active && e < width) ? row[e] : acc_t(0);
}

// row[0, width) ← factor·reg.
template <typename acc_t, int kDim>
__device__ __forceinline__ void store_row(acc_t* row, const acc_t (&reg)[kDim], acc_t factor,
                                          int64_t width) {
#pragma unroll
  for (int e = 0; e < kDim; ++e) {
    if (e < width) row[e] = factor * reg[e];
  }
}

// ------------------------------------------------------------------------------- forward

// One score x of an online softmax with running maximum m, sum l and accumulator acc: rescales
// l and acc when x raises the maximum, then adds the key's weight and its value row vt.
template <typename acc_t, int kDim>
__device__ __forceinline__ void online_softmax_step(acc_t x, const acc_t* vt, acc_t& m,
                                                    acc_t& l, acc_t (&acc)[kDim]) {
  if (x > m) {
    const acc_t f = polyline::rescale_factor(m, x);
    l *= f;
#pragma unroll
    for (int e = 0; e < kDim; ++e) acc[e] *= f;
    m = x;
  }
  // 0 for a blocked key, also while every key so far was blocked (m = −inf).
  const acc_t p = polyline::online_softmax_weight(x, m);
  l += p;
#pragma unroll
  for (int e = 0; e < kDim; ++e) acc[e] += p * vt[e];
}

// The finished query u of head bh: O₁, O₂, their average and log-sum-exps.
template <typename acc_t, int kDim>
__device__ __forceinline__ void write_query(int64_t bh, int64_t u, int64_t N, int64_t c,
                                            const acc_t (&acc1)[kDim], const acc_t (&acc2)[kDim],
                                            acc_t m1, acc_t l1, acc_t m2, acc_t l2,
                                            acc_t* __restrict__ out, acc_t* __restrict__ parts,
                                            acc_t* __restrict__ lse) {
  const acc_t inv1 = acc_t(1) / l1, inv2 = acc_t(1) / l2;
  acc_t* o1 = parts + ((bh * 2 + 0) * N + u) * c;
  acc_t* o2 = parts + ((bh * 2 + 1) * N + u) * c;
  acc_t* o = out + (bh * N + u) * c;
#pragma unroll
  for (int e = 0; e < kDim; ++e) {
    if (e < c) {
      const acc_t a = acc1[e] * inv1, b = acc2[e] * inv2;
      o1[e] = a;
      o2[e] = b;
      o[e] = acc_t(0.5) * (a + b);
    }
  }
  lse[(bh * 2 + 0) * N + u] = m1 + log_of(l1);
  lse[(bh * 2 + 1) * N + u] = m2 + log_of(l2);
}

template <typename acc_t, int kDim>
__global__ void __launch_bounds__(kFwdThreads)
    polyline_forward_kernel(Operands<acc_t> op, int64_t query_blocks, bool tables_in_smem,
                            acc_t* __restrict__ out, acc_t* __restrict__ parts,
                            acc_t* __restrict__ lse) {
  extern __shared__ __align__(16) unsigned char ppma_smem[];
  acc_t* k_tile = reinterpret_cast<acc_t*>(ppma_smem);  // [kFwdKeyTile][kDim]
  acc_t* v_tile = k_tile + kFwdKeyTile * kDim;          // [kFwdKeyTile][kDim]
  acc_t* tables = v_tile + kFwdKeyTile * kDim;          // [2][N] when tables_in_smem

  const int64_t W = op.W, N = op.H * W;
  const int64_t bh = blockIdx.x / query_blocks;
  const int64_t u = (blockIdx.x % query_blocks) * kFwdThreads + threadIdx.x;
  const bool active = u < N;
  const acc_t* ca = op.ca + bh * N;
  const acc_t* cb = op.cb + bh * N;
  stage_tables(tables_in_smem, tables, N, ca, cb);
  const HeadCounts<acc_t> counts(op, bh);

  const int64_t uu = active ? u : 0;  // inactive threads still join every barrier
  const int64_t i = uu / W, j = uu - i * W;
  acc_t qr[kDim], acc1[kDim] = {}, acc2[kDim] = {};
  load_row(qr, op.q + (bh * N + uu) * op.d, active, op.d);
  acc_t m1 = -INFINITY, m2 = -INFINITY, l1 = 0, l2 = 0;
  __syncthreads();  // tables staged
  const acc_t* ca_i = ca + i * W;
  const acc_t* cb_i = cb + i * W;
  const acc_t ca_ij = ca_i[j], cb_ij = cb_i[j];

  for (int64_t v0 = 0; v0 < N; v0 += kFwdKeyTile) {
    const int64_t nk = N - v0 < kFwdKeyTile ? N - v0 : kFwdKeyTile;
    __syncthreads();  // the previous tile is consumed
    load_tile<acc_t, kDim>(k_tile, kFwdKeyTile, op.k + (bh * N + v0) * op.d, nk, op.d);
    load_tile<acc_t, kDim>(v_tile, kFwdKeyTile, op.v + (bh * N + v0) * op.c, nk, op.c);
    __syncthreads();
    if (!active) continue;
    int64_t kr = v0 / W, l = v0 - kr * W;  // key (k, l), advanced along the tile
    for (int t = 0; t < nk; ++t) {
      const acc_t* kt = k_tile + t * kDim;
      acc_t s = 0;
#pragma unroll
      for (int e = 0; e < kDim; ++e) s += qr[e] * kt[e];
      s *= op.scale;
      const acc_t* ca_k = ca + kr * W;
      const acc_t* cb_k = cb + kr * W;
      const acc_t x1 =
          s + counts.mask1(polyline::log_mask(ca_ij, ca_i[l], cb_i[l], cb_k[l]), W, i, j, kr, l);
      const acc_t x2 =
          s + counts.mask2(polyline::log_mask(ca_k[j], ca_k[l], cb_k[j], cb_ij), W, i, j, kr, l);
      online_softmax_step<acc_t, kDim>(x1, v_tile + t * kDim, m1, l1, acc1);
      online_softmax_step<acc_t, kDim>(x2, v_tile + t * kDim, m2, l2, acc2);
      if (++l == W) {
        l = 0;
        ++kr;
      }
    }
  }
  if (active) {
    write_query<acc_t, kDim>(bh, u, N, op.c, acc1, acc2, m1, l1, m2, l2, out, parts, lse);
  }
}

// ------------------------------------------------------------------------------ backward

// Sums the cross-term scratch of one smem tile into the block's partial buffer. Owner
// (r_loc, col) sums contrib[a][b] over the block's threads a in grid row first_row + r_loc
// (tokens [a0, a1) of the block) and the tile entries b whose token (tile tokens [b0, b0 + nb))
// lies in grid column col, in a fixed order, then adds to partial[r_loc][col]. One owner per
// entry, the same thread for every tile: no races, deterministic.
template <typename acc_t>
__device__ __forceinline__ void reduce_cross_terms(const acc_t* contrib_a, const acc_t* contrib_b,
                                                   int64_t a0, int64_t a1, int64_t first_row,
                                                   int64_t rows, int64_t b0, int64_t nb,
                                                   int64_t W, acc_t* partial_a,
                                                   acc_t* partial_b) {
  for (int64_t o = threadIdx.x; o < rows * W; o += blockDim.x) {
    const int64_t r_loc = o / W, col = o - r_loc * W;
    const int64_t row = first_row + r_loc;
    const int64_t abeg = (row * W > a0 ? row * W : a0) - a0;
    const int64_t aend = ((row + 1) * W < a1 ? (row + 1) * W : a1) - a0;
    acc_t sum_a = 0, sum_b = 0;
    for (int64_t br = b0 / W; br <= (b0 + nb - 1) / W; ++br) {
      const int64_t b = br * W + col - b0;
      if (b < 0 || b >= nb) continue;
      for (int64_t a = abeg; a < aend; ++a) {
        sum_a += contrib_a[a * kContribLd + b];
        sum_b += contrib_b[a * kContribLd + b];
      }
    }
    partial_a[o] += sum_a;
    partial_b[o] += sum_b;
  }
}

// The per-block outputs of a backward pass: per-token table gradients (BH, N) and the
// per-block partial rows of the cross terms (BH, tiles, rows_per_tile, W).
template <typename acc_t>
struct TableGradOut {
  acc_t* own_ca;
  acc_t* own_cb;
  acc_t* cross_ca;
  acc_t* cross_cb;
};

// A backward block: head bh and tile `tile` of the tiling (its tokens [t0, t1), the grid rows
// it touches), this thread's slot r and token (valid when active), and the block's partial
// rows of the cross terms.
template <typename acc_t>
struct BackwardBlock {
  int64_t bh, tile, t0, t1, first_row, rows, token;
  int r;
  bool active;
  acc_t* partial_a;
  acc_t* partial_b;

  __device__ BackwardBlock(const Tiling& tiling, int64_t W, const TableGradOut<acc_t>& out)
      : bh(blockIdx.x / tiling.count), tile(blockIdx.x % tiling.count) {
    tiling.range(tile, &t0, &t1);
    r = threadIdx.x;
    active = r < t1 - t0;
    token = active ? t0 + r : t0;
    first_row = tiling.first_row(tile);
    rows = tiling.num_rows(tile);
    const int64_t offset = (bh * tiling.count + tile) * tiling.rows_per_tile * W;
    partial_a = out.cross_ca + offset;
    partial_b = out.cross_cb + offset;
  }
};

// The table entries of one (query (i, j), key (k, l)) pair that both masks read.
template <typename acc_t>
struct PairTables {
  acc_t ca_ij, ca_il, cb_il, cb_kl;  // M = −|Ca[i,j] − Ca[i,l]| − |Cb[i,l] − Cb[k,l]|
  acc_t ca_kj, ca_kl, cb_kj, cb_ij;  // Mᵀ = −|Ca[k,j] − Ca[k,l]| − |Cb[k,j] − Cb[i,j]|
};

// The log-sum-exps and softmax-backward row sums of one query's two softmaxes.
template <typename acc_t>
struct QueryStats {
  acc_t lse1, lse2, delta1, delta2;
};

// P₁, P₂ of one pair recomputed from the log-sum-exps (0 for blocked pairs: they add nothing to
// any gradient), and the softmax gradients g = P·(dP − delta) of both.
template <typename acc_t>
struct PairGrads {
  acc_t p1, p2, g1, g2;
};

template <typename acc_t>
__device__ __forceinline__ PairGrads<acc_t> pair_grads(
    acc_t s, acc_t dp, const PairTables<acc_t>& t, const HeadCounts<acc_t>& counts,
    const QueryStats<acc_t>& st, int64_t W, int64_t i, int64_t j, int64_t k, int64_t l) {
  const acc_t m1 = counts.mask1(polyline::log_mask(t.ca_ij, t.ca_il, t.cb_il, t.cb_kl), W, i, j,
                                k, l);
  const acc_t m2 = counts.mask2(polyline::log_mask(t.ca_kj, t.ca_kl, t.cb_kj, t.cb_ij), W, i, j,
                                k, l);
  PairGrads<acc_t> g;
  g.p1 = exp_of(s + m1 - st.lse1);
  g.p2 = exp_of(s + m2 - st.lse2);
  g.g1 = polyline::softmax_grad(g.p1, dp, st.delta1);
  g.g2 = polyline::softmax_grad(g.p2, dp, st.delta2);
  return g;
}

// Query pass: dQ and the query-owned table gradients (see the file comment).
template <typename acc_t, int kDim>
__global__ void __launch_bounds__(kBwdThreads)
    polyline_backward_query_kernel(Operands<acc_t> op, const acc_t* __restrict__ grad_out,
                                   const acc_t* __restrict__ lse,
                                   const acc_t* __restrict__ delta, Tiling tiling,
                                   bool tables_in_smem, acc_t* __restrict__ dq,
                                   TableGradOut<acc_t> out) {
  extern __shared__ __align__(16) unsigned char ppma_smem[];
  acc_t* k_tile = reinterpret_cast<acc_t*>(ppma_smem);      // [kBwdTile][kDim]
  acc_t* v_tile = k_tile + kBwdTile * kDim;                 // [kBwdTile][kDim]
  acc_t* contrib_a = v_tile + kBwdTile * kDim;              // [kBwdThreads][kContribLd]
  acc_t* contrib_b = contrib_a + kBwdThreads * kContribLd;  // [kBwdThreads][kContribLd]
  acc_t* tables = contrib_b + kBwdThreads * kContribLd;     // [2][N] when tables_in_smem

  const int64_t W = op.W, N = op.H * W, d = op.d, c = op.c;
  const BackwardBlock<acc_t> blk(tiling, W, out);
  const int64_t bh = blk.bh, u = blk.token, i = u / W, j = u - i * W;
  const acc_t* ca = op.ca + bh * N;
  const acc_t* cb = op.cb + bh * N;
  stage_tables(tables_in_smem, tables, N, ca, cb);
  const HeadCounts<acc_t> counts(op, bh);
  acc_t qr[kDim], gr[kDim], dq_acc[kDim] = {};
  load_row(qr, op.q + (bh * N + u) * d, blk.active, d);
  load_row(gr, grad_out + (bh * N + u) * c, blk.active, c);
  const QueryStats<acc_t> st{lse[(bh * 2 + 0) * N + u], lse[(bh * 2 + 1) * N + u],
                             delta[(bh * 2 + 0) * N + u], delta[(bh * 2 + 1) * N + u]};
  acc_t own_a = 0, own_b = 0;
  __syncthreads();  // tables staged
  const acc_t* ca_i = ca + i * W;
  const acc_t* cb_i = cb + i * W;
  const acc_t ca_ij = ca_i[j], cb_ij = cb_i[j];
  for (int64_t v0 = 0; v0 < N; v0 += kBwdTile) {
    const int64_t nk = N - v0 < kBwdTile ? N - v0 : kBwdTile;
    __syncthreads();  // previous tiles and cross-term scratch are consumed
    load_tile<acc_t, kDim>(k_tile, kBwdTile, op.k + (bh * N + v0) * d, nk, d);
    load_tile<acc_t, kDim>(v_tile, kBwdTile, op.v + (bh * N + v0) * c, nk, c);
    __syncthreads();
    int64_t kr = v0 / W, l = v0 - kr * W;
    for (int t = 0; blk.active && t < nk; ++t) {
      const acc_t* kt = k_tile + t * kDim;
      const acc_t* vt = v_tile + t * kDim;
      acc_t s = 0, dp = 0;
#pragma unroll
      for (int e = 0; e < kDim; ++e) {
        s += qr[e] * kt[e];
        dp += gr[e] * vt[e];
      }
      const acc_t* ca_k = ca + kr * W;
      const acc_t* cb_k = cb + kr * W;
      const PairTables<acc_t> tb{ca_ij,   ca_i[l], cb_i[l], cb_k[l],
                                 ca_k[j], ca_k[l], cb_k[j], cb_ij};
      const PairGrads<acc_t> g =
          pair_grads(s * op.scale, dp * acc_t(0.5), tb, counts, st, W, i, j, kr, l);
      const acc_t ds = g.g1 + g.g2;
#pragma unroll
      for (int e = 0; e < kDim; ++e) dq_acc[e] += ds * kt[e];
      const acc_t sa1 = polyline::abs_grad(tb.ca_ij - tb.ca_il) * g.g1;
      own_a -= sa1;                                                    // dCa[i,j]
      own_b += polyline::abs_grad(tb.cb_kj - tb.cb_ij) * g.g2;         // dCb[i,j]
      contrib_a[blk.r * kContribLd + t] = sa1;                         // dCa[i,l]
      contrib_b[blk.r * kContribLd + t] =
          -polyline::abs_grad(tb.cb_il - tb.cb_kl) * g.g1;             // dCb[i,l]
      if (++l == W) {
        l = 0;
        ++kr;
      }
    }
    __syncthreads();  // scratch complete
    reduce_cross_terms(contrib_a, contrib_b, blk.t0, blk.t1, blk.first_row, blk.rows, v0, nk, W,
                       blk.partial_a, blk.partial_b);
  }
  if (!blk.active) return;
  store_row(dq + (bh * N + u) * d, dq_acc, op.scale, d);
  out.own_ca[bh * N + u] = own_a;
  out.own_cb[bh * N + u] = own_b;
}

// Loads the key pass's query-side tile statistics (lse₁, lse₂, δ₁, δ₂ of tile queries
// [q0, q0 + nq), zero beyond) into shared memory.
template <typename acc_t>
__device__ __forceinline__ void load_query_stats(acc_t* stats, const acc_t* lse_bh,
                                                 const acc_t* delta_bh, int64_t N, int64_t q0,
                                                 int64_t nq) {
  for (int x = threadIdx.x; x < kBwdTile; x += blockDim.x) {
    const bool in = x < nq;
    stats[x] = in ? lse_bh[q0 + x] : acc_t(0);
    stats[kBwdTile + x] = in ? lse_bh[N + q0 + x] : acc_t(0);
    stats[2 * kBwdTile + x] = in ? delta_bh[q0 + x] : acc_t(0);
    stats[3 * kBwdTile + x] = in ? delta_bh[N + q0 + x] : acc_t(0);
  }
}

// Key pass: dK, dV and the key-owned table gradients (see the file comment).
template <typename acc_t, int kDim>
__global__ void __launch_bounds__(kBwdThreads)
    polyline_backward_key_kernel(Operands<acc_t> op, const acc_t* __restrict__ grad_out,
                                 const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
                                 Tiling tiling, bool tables_in_smem, acc_t* __restrict__ dk,
                                 acc_t* __restrict__ dv, TableGradOut<acc_t> out) {
  extern __shared__ __align__(16) unsigned char ppma_smem[];
  acc_t* q_tile = reinterpret_cast<acc_t*>(ppma_smem);      // [kBwdTile][kDim]
  acc_t* g_tile = q_tile + kBwdTile * kDim;                 // [kBwdTile][kDim]
  acc_t* stats = g_tile + kBwdTile * kDim;                  // [4][kBwdTile]: lse1 lse2 δ1 δ2
  acc_t* contrib_a = stats + 4 * kBwdTile;                  // [kBwdThreads][kContribLd]
  acc_t* contrib_b = contrib_a + kBwdThreads * kContribLd;  // [kBwdThreads][kContribLd]
  acc_t* tables = contrib_b + kBwdThreads * kContribLd;     // [2][N] when tables_in_smem

  const int64_t W = op.W, N = op.H * W, d = op.d, c = op.c;
  const BackwardBlock<acc_t> blk(tiling, W, out);
  const int64_t bh = blk.bh, key = blk.token, kr = key / W, l = key - kr * W;
  const acc_t* ca = op.ca + bh * N;
  const acc_t* cb = op.cb + bh * N;
  stage_tables(tables_in_smem, tables, N, ca, cb);
  const HeadCounts<acc_t> counts(op, bh);
  acc_t kreg[kDim], vreg[kDim], dk_acc[kDim] = {}, dv_acc[kDim] = {};
  load_row(kreg, op.k + (bh * N + key) * d, blk.active, d);
  load_row(vreg, op.v + (bh * N + key) * c, blk.active, c);
  acc_t own_a = 0, own_b = 0;
  __syncthreads();  // tables staged
  const acc_t* ca_k = ca + kr * W;
  const acc_t* cb_k = cb + kr * W;
  const acc_t ca_kl = ca_k[l], cb_kl = cb_k[l];
  for (int64_t q0 = 0; q0 < N; q0 += kBwdTile) {
    const int64_t nq = N - q0 < kBwdTile ? N - q0 : kBwdTile;
    __syncthreads();  // previous tiles and cross-term scratch are consumed
    load_tile<acc_t, kDim>(q_tile, kBwdTile, op.q + (bh * N + q0) * d, nq, d);
    load_tile<acc_t, kDim>(g_tile, kBwdTile, grad_out + (bh * N + q0) * c, nq, c);
    load_query_stats(stats, lse + bh * 2 * N, delta + bh * 2 * N, N, q0, nq);
    __syncthreads();
    int64_t i = q0 / W, j = q0 - i * W;  // query (i, j), advanced along the tile
    for (int t = 0; blk.active && t < nq; ++t) {
      const acc_t* qt = q_tile + t * kDim;
      const acc_t* gt = g_tile + t * kDim;
      acc_t s = 0, dp = 0;
#pragma unroll
      for (int e = 0; e < kDim; ++e) {
        s += qt[e] * kreg[e];
        dp += gt[e] * vreg[e];
      }
      const acc_t* ca_i = ca + i * W;
      const acc_t* cb_i = cb + i * W;
      const PairTables<acc_t> tb{ca_i[j], ca_i[l], cb_i[l], cb_kl,
                                 ca_k[j], ca_kl,   cb_k[j], cb_i[j]};
      const QueryStats<acc_t> st{stats[t], stats[kBwdTile + t], stats[2 * kBwdTile + t],
                                 stats[3 * kBwdTile + t]};
      const PairGrads<acc_t> g =
          pair_grads(s * op.scale, dp * acc_t(0.5), tb, counts, st, W, i, j, kr, l);
      const acc_t ds = g.g1 + g.g2;
      const acc_t pbar = acc_t(0.5) * (g.p1 + g.p2);
#pragma unroll
      for (int e = 0; e < kDim; ++e) {
        dk_acc[e] += ds * qt[e];
        dv_acc[e] += pbar * gt[e];
      }
      const acc_t sa2 = polyline::abs_grad(tb.ca_kl - tb.ca_kj) * g.g2;
      own_b += polyline::abs_grad(tb.cb_il - tb.cb_kl) * g.g1;  // dCb[k,l]
      own_a -= sa2;                                             // dCa[k,l]
      contrib_a[blk.r * kContribLd + t] = sa2;                  // dCa[k,j]
      contrib_b[blk.r * kContribLd + t] =
          -polyline::abs_grad(tb.cb_kj - tb.cb_ij) * g.g2;      // dCb[k,j]
      if (++j == W) {
        j = 0;
        ++i;
      }
    }
    __syncthreads();  // scratch complete
    reduce_cross_terms(contrib_a, contrib_b, blk.t0, blk.t1, blk.first_row, blk.rows, q0, nq, W,
                       blk.partial_a, blk.partial_b);
  }
  if (!blk.active) return;
  store_row(dk + (bh * N + key) * d, dk_acc, op.scale, d);
  store_row(dv + (bh * N + key) * c, dv_acc, acc_t(1), c);
  out.own_ca[bh * N + key] = own_a;
  out.own_cb[bh * N + key] = own_b;
}

// ----------------------------------------------------------------------------- launches

// Per-block cross-term partials (BH, tiles, rows_per_tile, W) → (BH, H, W), summing the
// segments of split rows in segment order.
at::Tensor reduce_row_partials(const at::Tensor& partial, const Tiling& tiling, int64_t BH,
                               int64_t H, int64_t W) {
  if (tiling.segs_per_row == 1) {
    return partial.view({BH, tiling.count * tiling.rows_per_tile, W}).narrow(1, 0, H);
  }
  const at::Tensor p = partial.view({BH, H, tiling.segs_per_row, W});
  at::Tensor sum = p.select(2, 0).clone();
  for (int64_t s = 1; s < tiling.segs_per_row; ++s) sum.add_(p.select(2, s));
  return sum;
}

// Whether both (BH, H, W) tables fit next to `base` bytes of tiles in one block's smem.
bool tables_fit(size_t base, int64_t N, size_t elem) {
  const size_t with_tables = base + 2 * static_cast<size_t>(N) * elem;
  const size_t cap = smem_optin_bytes() < kTableSmemCap ? smem_optin_bytes() : kTableSmemCap;
  return with_tables <= cap;
}

// One flag per head: whether it has a −inf log decay (counts only grow along a line, so its
// last entry says whether the line has a −inf step). On the device: no host sync.
at::Tensor head_blocked_flags(const DecayTables& t) {
  const int64_t H = t.na.size(1), W = t.na.size(2);
  return at::logical_or(t.na.select(2, W - 1).amax(1) > 0, t.nb.select(1, H - 1).amax(1) > 0)
      .to(at::kByte)
      .contiguous();
}

template <typename acc_t>
Operands<acc_t> operands(const AttentionInputs& in, const at::Tensor& head_blocked) {
  const int64_t H = in.tables.ca.size(1), W = in.tables.ca.size(2);
  return {in.q.const_data_ptr<acc_t>(),  in.k.const_data_ptr<acc_t>(),
          in.v.const_data_ptr<acc_t>(),  in.tables.ca.const_data_ptr<acc_t>(),
          in.tables.cb.const_data_ptr<acc_t>(), in.tables.na.const_data_ptr<acc_t>(),
          in.tables.nb.const_data_ptr<acc_t>(), head_blocked.const_data_ptr<unsigned char>(),
          H, W, in.q.size(2), in.v.size(2), static_cast<acc_t>(in.scale)};
}

template <typename acc_t>
TableGradOut<acc_t> table_grad_out(at::Tensor& own_ca, at::Tensor& own_cb, at::Tensor& cross_ca,
                                   at::Tensor& cross_cb) {
  return {own_ca.mutable_data_ptr<acc_t>(), own_cb.mutable_data_ptr<acc_t>(),
          cross_ca.mutable_data_ptr<acc_t>(), cross_cb.mutable_data_ptr<acc_t>()};
}

// The per-token and per-block table gradients of one backward pass.
struct PassTableGrads {
  at::Tensor own_ca, own_cb, cross_ca, cross_cb;
  PassTableGrads(int64_t BH, int64_t N, const Tiling& tiling, int64_t W,
                 const at::TensorOptions& opts)
      : own_ca(at::empty({BH, N}, opts)), own_cb(at::empty({BH, N}, opts)),
        cross_ca(at::zeros({BH, tiling.count, tiling.rows_per_tile, W}, opts)),
        cross_cb(at::zeros({BH, tiling.count, tiling.rows_per_tile, W}, opts)) {}
};

}  // namespace
}  // namespace cuda

void polyline_attention_fwd_kernel_cuda(const AttentionInputs& in, PolylineForward& fwd) {
  using namespace cuda;
  const int64_t BH = in.q.size(0), N = in.q.size(1), d = in.q.size(2), c = in.v.size(2);
  const at::Tensor head_blocked = head_blocked_flags(in.tables);
  const int64_t query_blocks = ceil_div(N, kFwdThreads);
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "ppma_polyline_attention_fwd", [&] {
    PPMA_DISPATCH_DIM_BOUND(d > c ? d : c, kDim, [&] {
      const auto kernel = polyline_forward_kernel<scalar_t, kDim>;
      const size_t base = 2 * kFwdKeyTile * kDim * sizeof(scalar_t);
      const bool in_smem = tables_fit(base, N, sizeof(scalar_t));
      const size_t bytes = base + (in_smem ? 2 * N * sizeof(scalar_t) : 0);
      set_dynamic_smem(kernel, bytes);
      kernel<<<blocks_for(BH * query_blocks, 1), kFwdThreads, bytes,
               c10::cuda::getCurrentCUDAStream()>>>(
          operands<scalar_t>(in, head_blocked), query_blocks, in_smem,
          fwd.out.mutable_data_ptr<scalar_t>(), fwd.parts.mutable_data_ptr<scalar_t>(),
          fwd.lse.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void polyline_attention_bwd_kernel_cuda(const at::Tensor& grad_out, const AttentionInputs& in,
                                        const at::Tensor& lse, const at::Tensor& delta,
                                        PolylineGrads& grads) {
  using namespace cuda;
  const int64_t BH = in.q.size(0), N = in.q.size(1), d = in.q.size(2), c = in.v.size(2);
  const int64_t H = in.tables.ca.size(1), W = in.tables.ca.size(2);
  const at::Tensor head_blocked = head_blocked_flags(in.tables);
  const Tiling tiling(H, W, kBwdThreads);
  const auto opts = in.q.options();
  PassTableGrads query(BH, N, tiling, W, opts), key(BH, N, tiling, W, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "ppma_polyline_attention_bwd", [&] {
    using acc_t = scalar_t;
    PPMA_DISPATCH_DIM_BOUND(d > c ? d : c, kDim, [&] {
      const size_t contrib = 2 * kBwdThreads * kContribLd * sizeof(acc_t);
      const size_t base_q = 2 * kBwdTile * kDim * sizeof(acc_t) + contrib;
      const size_t base_k = base_q + 4 * kBwdTile * sizeof(acc_t);
      const bool in_smem = tables_fit(base_k, N, sizeof(acc_t));
      const size_t table_bytes = in_smem ? 2 * N * sizeof(acc_t) : 0;
      const unsigned int blocks = blocks_for(BH * tiling.count, 1);
      const Operands<acc_t> op = operands<acc_t>(in, head_blocked);
      const acc_t* go = grad_out.const_data_ptr<acc_t>();
      const acc_t* lp = lse.const_data_ptr<acc_t>();
      const acc_t* dp = delta.const_data_ptr<acc_t>();

      const auto query_kernel = polyline_backward_query_kernel<acc_t, kDim>;
      set_dynamic_smem(query_kernel, base_q + table_bytes);
      query_kernel<<<blocks, kBwdThreads, base_q + table_bytes, stream>>>(
          op, go, lp, dp, tiling, in_smem, grads.dq.mutable_data_ptr<acc_t>(),
          table_grad_out<acc_t>(query.own_ca, query.own_cb, query.cross_ca, query.cross_cb));
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      const auto key_kernel = polyline_backward_key_kernel<acc_t, kDim>;
      set_dynamic_smem(key_kernel, base_k + table_bytes);
      key_kernel<<<blocks, kBwdThreads, base_k + table_bytes, stream>>>(
          op, go, lp, dp, tiling, in_smem, grads.dk.mutable_data_ptr<acc_t>(),
          grads.dv.mutable_data_ptr<acc_t>(),
          table_grad_out<acc_t>(key.own_ca, key.own_cb, key.cross_ca, key.cross_cb));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // Table gradients: the four owners' shares, summed elementwise in a fixed order.
  grads.dca.copy_(query.own_ca.view({BH, H, W}))
      .add_(key.own_ca.view({BH, H, W}))
      .add_(reduce_row_partials(query.cross_ca, tiling, BH, H, W))
      .add_(reduce_row_partials(key.cross_ca, tiling, BH, H, W));
  grads.dcb.copy_(query.own_cb.view({BH, H, W}))
      .add_(key.own_cb.view({BH, H, W}))
      .add_(reduce_row_partials(query.cross_cb, tiling, BH, H, W))
      .add_(reduce_row_partials(key.cross_cb, tiling, BH, H, W));
}

}  // namespace ppma
