// Vanilla polyline attention (docs/design.md §2.3), CUDA kernels for the schemas that
// csrc/polyline_attention.cpp defines (ppma::polyline_attention_fwd / _backward).
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
// than a block, a fixed set of row segments summed afterwards in segment order. The table
// gradients then reach log_alpha / log_beta by reverse cumsums along W / H.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../polyline_attention_math.h"
#include "cuda_common.cuh"

namespace ppma::cuda {
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

// Count tables of head bh (docs/design.md §2.7) when that head has a −inf log decay, else
// null: the kernels then evaluate the plain masks. The flag is uniform over a block (one head
// per block), so plain heads pay one predictable branch per score.
template <typename acc_t>
struct HeadCounts {
  const acc_t* na = nullptr;
  const acc_t* nb = nullptr;
  __device__ HeadCounts(const acc_t* na_all, const acc_t* nb_all,
                        const unsigned char* head_blocked, int64_t bh, int64_t N) {
    if (head_blocked[bh]) {
      na = na_all + bh * N;
      nb = nb_all + bh * N;
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

template <typename acc_t, int kDim>
__global__ void __launch_bounds__(kFwdThreads)
    polyline_forward_kernel(const acc_t* __restrict__ q, const acc_t* __restrict__ k,
                            const acc_t* __restrict__ v, const acc_t* __restrict__ ca_all,
                            const acc_t* __restrict__ cb_all, const acc_t* __restrict__ na_all,
                            const acc_t* __restrict__ nb_all,
                            const unsigned char* __restrict__ head_blocked, int64_t H, int64_t W,
                            int64_t d, int64_t c, acc_t scale, int64_t query_blocks,
                            bool tables_in_smem, acc_t* __restrict__ out,
                            acc_t* __restrict__ parts, acc_t* __restrict__ lse) {
  extern __shared__ __align__(16) unsigned char ppma_smem[];
  acc_t* k_tile = reinterpret_cast<acc_t*>(ppma_smem);  // [kFwdKeyTile][kDim]
  acc_t* v_tile = k_tile + kFwdKeyTile * kDim;          // [kFwdKeyTile][kDim]
  acc_t* tables = v_tile + kFwdKeyTile * kDim;          // [2][N] when tables_in_smem

  const int64_t N = H * W;
  const int64_t bh = blockIdx.x / query_blocks;
  const int64_t u = (blockIdx.x % query_blocks) * kFwdThreads + threadIdx.x;
  const bool active = u < N;
  const acc_t* ca = ca_all + bh * N;
  const acc_t* cb = cb_all + bh * N;
  stage_tables(tables_in_smem, tables, N, ca, cb);
  const HeadCounts<acc_t> counts(na_all, nb_all, head_blocked, bh, N);

  const int64_t uu = active ? u : 0;  // inactive threads still join every barrier
  const int64_t i = uu / W, j = uu - i * W;
  acc_t qr[kDim], acc1[kDim], acc2[kDim];
#pragma unroll
  for (int e = 0; e < kDim; ++e) {
    qr[e] = (active && e < d) ? q[(bh * N + uu) * d + e] : acc_t(0);
    acc1[e] = 0;
    acc2[e] = 0;
  }
  acc_t m1 = -INFINITY, m2 = -INFINITY, l1 = 0, l2 = 0;
  __syncthreads();  // tables staged
  const acc_t* ca_i = ca + i * W;
  const acc_t* cb_i = cb + i * W;
  const acc_t ca_ij = ca_i[j], cb_ij = cb_i[j];

  for (int64_t v0 = 0; v0 < N; v0 += kFwdKeyTile) {
    const int64_t nk = N - v0 < kFwdKeyTile ? N - v0 : kFwdKeyTile;
    __syncthreads();  // the previous tile is consumed
    load_tile<acc_t, kDim>(k_tile, kFwdKeyTile, k + (bh * N + v0) * d, nk, d);
    load_tile<acc_t, kDim>(v_tile, kFwdKeyTile, v + (bh * N + v0) * c, nk, c);
    __syncthreads();
    if (!active) continue;
    int64_t kr = v0 / W, l = v0 - kr * W;  // key (k, l), advanced along the tile
    for (int t = 0; t < nk; ++t) {
      const acc_t* kt = k_tile + t * kDim;
      acc_t s = 0;
#pragma unroll
      for (int e = 0; e < kDim; ++e) s += qr[e] * kt[e];
      s *= scale;
      const acc_t* ca_k = ca + kr * W;
      const acc_t* cb_k = cb + kr * W;
      const acc_t x1 =
          s + counts.mask1(polyline::log_mask(ca_ij, ca_i[l], cb_i[l], cb_k[l]), W, i, j, kr, l);
      const acc_t x2 =
          s + counts.mask2(polyline::log_mask(ca_k[j], ca_k[l], cb_k[j], cb_ij), W, i, j, kr, l);
      if (x1 > m1) {
        const acc_t f = polyline::rescale_factor(m1, x1);
        l1 *= f;
#pragma unroll
        for (int e = 0; e < kDim; ++e) acc1[e] *= f;
        m1 = x1;
      }
      if (x2 > m2) {
        const acc_t f = polyline::rescale_factor(m2, x2);
        l2 *= f;
#pragma unroll
        for (int e = 0; e < kDim; ++e) acc2[e] *= f;
        m2 = x2;
      }
      // 0 for a blocked key, also while every key so far was blocked (m = −inf).
      const acc_t p1 = polyline::online_softmax_weight(x1, m1);
      const acc_t p2 = polyline::online_softmax_weight(x2, m2);
      l1 += p1;
      l2 += p2;
      const acc_t* vt = v_tile + t * kDim;
#pragma unroll
      for (int e = 0; e < kDim; ++e) {
        acc1[e] += p1 * vt[e];
        acc2[e] += p2 * vt[e];
      }
      if (++l == W) {
        l = 0;
        ++kr;
      }
    }
  }
  if (!active) return;
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

// delta[bh, p, u] = ½·dO_u·O_p,u: the softmax-backward row sums (the ½ of the average included).
template <typename acc_t>
__global__ void softmax_delta_kernel(const acc_t* __restrict__ grad_out,
                                     const acc_t* __restrict__ parts, int64_t N, int64_t c,
                                     int64_t total, acc_t* __restrict__ delta) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;  // idx = (bh·2 + p)·N + u
  const int64_t u = idx % N, bh = idx / (2 * N);
  const acc_t* g = grad_out + (bh * N + u) * c;
  const acc_t* o = parts + idx * c;
  acc_t sum = 0;
  for (int64_t e = 0; e < c; ++e) sum += g[e] * o[e];
  delta[idx] = acc_t(0.5) * sum;
}

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

// Query pass: dQ and the query-owned table gradients (see the file comment).
template <typename acc_t, int kDim>
__global__ void __launch_bounds__(kBwdThreads) polyline_backward_query_kernel(
    const acc_t* __restrict__ q, const acc_t* __restrict__ k, const acc_t* __restrict__ v,
    const acc_t* __restrict__ grad_out, const acc_t* __restrict__ ca_all,
    const acc_t* __restrict__ cb_all, const acc_t* __restrict__ na_all,
    const acc_t* __restrict__ nb_all, const unsigned char* __restrict__ head_blocked,
    const acc_t* __restrict__ lse, const acc_t* __restrict__ delta, int64_t H, int64_t W,
    int64_t d, int64_t c, acc_t scale, Tiling tiling, bool tables_in_smem,
    acc_t* __restrict__ dq, acc_t* __restrict__ own_ca, acc_t* __restrict__ own_cb,
    acc_t* __restrict__ cross_ca, acc_t* __restrict__ cross_cb) {
  extern __shared__ __align__(16) unsigned char ppma_smem[];
  acc_t* k_tile = reinterpret_cast<acc_t*>(ppma_smem);    // [kBwdTile][kDim]
  acc_t* v_tile = k_tile + kBwdTile * kDim;               // [kBwdTile][kDim]
  acc_t* contrib_a = v_tile + kBwdTile * kDim;            // [kBwdThreads][kContribLd]
  acc_t* contrib_b = contrib_a + kBwdThreads * kContribLd;  // [kBwdThreads][kContribLd]
  acc_t* tables = contrib_b + kBwdThreads * kContribLd;   // [2][N] when tables_in_smem

  const int64_t N = H * W;
  const int64_t bh = blockIdx.x / tiling.count;
  const int64_t tile = blockIdx.x % tiling.count;
  long long u0, u1;
  tiling.range(tile, &u0, &u1);
  const int r = threadIdx.x;
  const bool active = r < u1 - u0;
  const int64_t first_row = tiling.first_row(tile), rows = tiling.num_rows(tile);
  acc_t* partial_a = cross_ca + (bh * tiling.count + tile) * tiling.rows_per_tile * W;
  acc_t* partial_b = cross_cb + (bh * tiling.count + tile) * tiling.rows_per_tile * W;
  const acc_t* ca = ca_all + bh * N;
  const acc_t* cb = cb_all + bh * N;
  stage_tables(tables_in_smem, tables, N, ca, cb);
  const HeadCounts<acc_t> counts(na_all, nb_all, head_blocked, bh, N);

  const int64_t u = active ? u0 + r : u0;
  const int64_t i = u / W, j = u - i * W;
  acc_t qr[kDim], gr[kDim], dq_acc[kDim];
#pragma unroll
  for (int e = 0; e < kDim; ++e) {
    qr[e] = (active && e < d) ? q[(bh * N + u) * d + e] : acc_t(0);
    gr[e] = (active && e < c) ? grad_out[(bh * N + u) * c + e] : acc_t(0);
    dq_acc[e] = 0;
  }
  const acc_t lse1 = lse[(bh * 2 + 0) * N + u], lse2 = lse[(bh * 2 + 1) * N + u];
  const acc_t delta1 = delta[(bh * 2 + 0) * N + u], delta2 = delta[(bh * 2 + 1) * N + u];
  acc_t own_a = 0, own_b = 0;
  __syncthreads();  // tables staged
  const acc_t* ca_i = ca + i * W;
  const acc_t* cb_i = cb + i * W;
  const acc_t ca_ij = ca_i[j], cb_ij = cb_i[j];

  for (int64_t v0 = 0; v0 < N; v0 += kBwdTile) {
    const int64_t nk = N - v0 < kBwdTile ? N - v0 : kBwdTile;
    __syncthreads();  // previous tiles and cross-term scratch are consumed
    load_tile<acc_t, kDim>(k_tile, kBwdTile, k + (bh * N + v0) * d, nk, d);
    load_tile<acc_t, kDim>(v_tile, kBwdTile, v + (bh * N + v0) * c, nk, c);
    __syncthreads();
    if (active) {
      int64_t kr = v0 / W, l = v0 - kr * W;
      for (int t = 0; t < nk; ++t) {
        const acc_t* kt = k_tile + t * kDim;
        const acc_t* vt = v_tile + t * kDim;
        acc_t s = 0, dp = 0;
#pragma unroll
        for (int e = 0; e < kDim; ++e) {
          s += qr[e] * kt[e];
          dp += gr[e] * vt[e];
        }
        s *= scale;
        dp *= acc_t(0.5);
        const acc_t* ca_k = ca + kr * W;
        const acc_t* cb_k = cb + kr * W;
        const acc_t ca_il = ca_i[l], cb_il = cb_i[l], cb_kl = cb_k[l];
        const acc_t ca_kj = ca_k[j], ca_kl = ca_k[l], cb_kj = cb_k[j];
        // Blocked pairs: P = exp(−inf) = 0, so they add nothing to any gradient below.
        const acc_t m1 =
            counts.mask1(polyline::log_mask(ca_ij, ca_il, cb_il, cb_kl), W, i, j, kr, l);
        const acc_t m2 =
            counts.mask2(polyline::log_mask(ca_kj, ca_kl, cb_kj, cb_ij), W, i, j, kr, l);
        const acc_t p1 = exp_of(s + m1 - lse1);
        const acc_t p2 = exp_of(s + m2 - lse2);
        const acc_t g1 = polyline::softmax_grad(p1, dp, delta1);
        const acc_t g2 = polyline::softmax_grad(p2, dp, delta2);
        const acc_t ds = g1 + g2;
#pragma unroll
        for (int e = 0; e < kDim; ++e) dq_acc[e] += ds * kt[e];
        // M = −|Ca[i,j] − Ca[i,l]| − |Cb[i,l] − Cb[k,l]|; Mᵀ = −|Ca[k,j] − Ca[k,l]| − |Cb[k,j] − Cb[i,j]|.
        const acc_t sa1 = polyline::abs_grad(ca_ij - ca_il) * g1;
        const acc_t sb1 = polyline::abs_grad(cb_il - cb_kl) * g1;
        own_a -= sa1;                                        // dCa[i,j]
        own_b += polyline::abs_grad(cb_kj - cb_ij) * g2;     // dCb[i,j]
        contrib_a[r * kContribLd + t] = sa1;                 // dCa[i,l]
        contrib_b[r * kContribLd + t] = -sb1;                // dCb[i,l]
        if (++l == W) {
          l = 0;
          ++kr;
        }
      }
    }
    __syncthreads();  // scratch complete
    reduce_cross_terms(contrib_a, contrib_b, static_cast<int64_t>(u0), static_cast<int64_t>(u1),
                       first_row, rows, v0, nk, W, partial_a, partial_b);
  }
  if (!active) return;
#pragma unroll
  for (int e = 0; e < kDim; ++e) {
    if (e < d) dq[(bh * N + u) * d + e] = scale * dq_acc[e];
  }
  own_ca[bh * N + u] = own_a;
  own_cb[bh * N + u] = own_b;
}

// Key pass: dK, dV and the key-owned table gradients (see the file comment).
template <typename acc_t, int kDim>
__global__ void __launch_bounds__(kBwdThreads) polyline_backward_key_kernel(
    const acc_t* __restrict__ q, const acc_t* __restrict__ k, const acc_t* __restrict__ v,
    const acc_t* __restrict__ grad_out, const acc_t* __restrict__ ca_all,
    const acc_t* __restrict__ cb_all, const acc_t* __restrict__ na_all,
    const acc_t* __restrict__ nb_all, const unsigned char* __restrict__ head_blocked,
    const acc_t* __restrict__ lse, const acc_t* __restrict__ delta, int64_t H, int64_t W,
    int64_t d, int64_t c, acc_t scale, Tiling tiling, bool tables_in_smem,
    acc_t* __restrict__ dk, acc_t* __restrict__ dv, acc_t* __restrict__ own_ca,
    acc_t* __restrict__ own_cb, acc_t* __restrict__ cross_ca, acc_t* __restrict__ cross_cb) {
  extern __shared__ __align__(16) unsigned char ppma_smem[];
  acc_t* q_tile = reinterpret_cast<acc_t*>(ppma_smem);      // [kBwdTile][kDim]
  acc_t* g_tile = q_tile + kBwdTile * kDim;                 // [kBwdTile][kDim]
  acc_t* stats = g_tile + kBwdTile * kDim;                  // [4][kBwdTile]: lse1 lse2 δ1 δ2
  acc_t* contrib_a = stats + 4 * kBwdTile;                  // [kBwdThreads][kContribLd]
  acc_t* contrib_b = contrib_a + kBwdThreads * kContribLd;  // [kBwdThreads][kContribLd]
  acc_t* tables = contrib_b + kBwdThreads * kContribLd;     // [2][N] when tables_in_smem

  const int64_t N = H * W;
  const int64_t bh = blockIdx.x / tiling.count;
  const int64_t tile = blockIdx.x % tiling.count;
  long long k0, k1;
  tiling.range(tile, &k0, &k1);
  const int r = threadIdx.x;
  const bool active = r < k1 - k0;
  const int64_t first_row = tiling.first_row(tile), rows = tiling.num_rows(tile);
  acc_t* partial_a = cross_ca + (bh * tiling.count + tile) * tiling.rows_per_tile * W;
  acc_t* partial_b = cross_cb + (bh * tiling.count + tile) * tiling.rows_per_tile * W;
  const acc_t* ca = ca_all + bh * N;
  const acc_t* cb = cb_all + bh * N;
  stage_tables(tables_in_smem, tables, N, ca, cb);
  const HeadCounts<acc_t> counts(na_all, nb_all, head_blocked, bh, N);

  const int64_t key = active ? k0 + r : k0;
  const int64_t kr = key / W, l = key - kr * W;
  acc_t kreg[kDim], vreg[kDim], dk_acc[kDim], dv_acc[kDim];
#pragma unroll
  for (int e = 0; e < kDim; ++e) {
    kreg[e] = (active && e < d) ? k[(bh * N + key) * d + e] : acc_t(0);
    vreg[e] = (active && e < c) ? v[(bh * N + key) * c + e] : acc_t(0);
    dk_acc[e] = 0;
    dv_acc[e] = 0;
  }
  acc_t own_a = 0, own_b = 0;
  __syncthreads();  // tables staged
  const acc_t* ca_k = ca + kr * W;
  const acc_t* cb_k = cb + kr * W;
  const acc_t ca_kl = ca_k[l], cb_kl = cb_k[l];
  const acc_t* lse_bh = lse + bh * 2 * N;
  const acc_t* delta_bh = delta + bh * 2 * N;

  for (int64_t q0 = 0; q0 < N; q0 += kBwdTile) {
    const int64_t nq = N - q0 < kBwdTile ? N - q0 : kBwdTile;
    __syncthreads();  // previous tiles and cross-term scratch are consumed
    load_tile<acc_t, kDim>(q_tile, kBwdTile, q + (bh * N + q0) * d, nq, d);
    load_tile<acc_t, kDim>(g_tile, kBwdTile, grad_out + (bh * N + q0) * c, nq, c);
    for (int x = threadIdx.x; x < kBwdTile; x += blockDim.x) {
      const bool in = x < nq;
      stats[x] = in ? lse_bh[q0 + x] : acc_t(0);
      stats[kBwdTile + x] = in ? lse_bh[N + q0 + x] : acc_t(0);
      stats[2 * kBwdTile + x] = in ? delta_bh[q0 + x] : acc_t(0);
      stats[3 * kBwdTile + x] = in ? delta_bh[N + q0 + x] : acc_t(0);
    }
    __syncthreads();
    if (active) {
      int64_t i = q0 / W, j = q0 - i * W;  // query (i, j), advanced along the tile
      for (int t = 0; t < nq; ++t) {
        const acc_t* qt = q_tile + t * kDim;
        const acc_t* gt = g_tile + t * kDim;
        acc_t s = 0, dp = 0;
#pragma unroll
        for (int e = 0; e < kDim; ++e) {
          s += qt[e] * kreg[e];
          dp += gt[e] * vreg[e];
        }
        s *= scale;
        dp *= acc_t(0.5);
        const acc_t* ca_i = ca + i * W;
        const acc_t* cb_i = cb + i * W;
        const acc_t ca_ij = ca_i[j], cb_ij = cb_i[j], ca_il = ca_i[l], cb_il = cb_i[l];
        const acc_t ca_kj = ca_k[j], cb_kj = cb_k[j];
        // Blocked pairs: P = exp(−inf) = 0, so they add nothing to any gradient below.
        const acc_t m1 =
            counts.mask1(polyline::log_mask(ca_ij, ca_il, cb_il, cb_kl), W, i, j, kr, l);
        const acc_t m2 =
            counts.mask2(polyline::log_mask(ca_kj, ca_kl, cb_kj, cb_ij), W, i, j, kr, l);
        const acc_t p1 = exp_of(s + m1 - stats[t]);
        const acc_t p2 = exp_of(s + m2 - stats[kBwdTile + t]);
        const acc_t g1 = polyline::softmax_grad(p1, dp, stats[2 * kBwdTile + t]);
        const acc_t g2 = polyline::softmax_grad(p2, dp, stats[3 * kBwdTile + t]);
        const acc_t ds = g1 + g2;
        const acc_t pbar = acc_t(0.5) * (p1 + p2);
#pragma unroll
        for (int e = 0; e < kDim; ++e) {
          dk_acc[e] += ds * qt[e];
          dv_acc[e] += pbar * gt[e];
        }
        const acc_t sa2 = polyline::abs_grad(ca_kl - ca_kj) * g2;
        own_b += polyline::abs_grad(cb_il - cb_kl) * g1;                       // dCb[k,l]
        own_a -= sa2;                                                           // dCa[k,l]
        contrib_a[r * kContribLd + t] = sa2;                                    // dCa[k,j]
        contrib_b[r * kContribLd + t] = -polyline::abs_grad(cb_kj - cb_ij) * g2;  // dCb[k,j]
        if (++j == W) {
          j = 0;
          ++i;
        }
      }
    }
    __syncthreads();  // scratch complete
    reduce_cross_terms(contrib_a, contrib_b, static_cast<int64_t>(k0), static_cast<int64_t>(k1),
                       first_row, rows, q0, nq, W, partial_a, partial_b);
  }
  if (!active) return;
#pragma unroll
  for (int e = 0; e < kDim; ++e) {
    if (e < d) dk[(bh * N + key) * d + e] = scale * dk_acc[e];
    if (e < c) dv[(bh * N + key) * c + e] = dv_acc[e];
  }
  own_ca[bh * N + key] = own_a;
  own_cb[bh * N + key] = own_b;
}

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

// The tables of docs/design.md §1 and §2.7, (BH, H, W): Ca, Cb (sums of the finite log decays
// along rows / columns) and Na, Nb (counts of −inf ones), plus one flag per head that says
// whether it has any −inf log decay. All on the device: no host sync.
struct Tables {
  at::Tensor ca, cb, na, nb, head_blocked;
};

Tables decay_tables_of(const at::Tensor& log_alpha, const at::Tensor& log_beta,
                       at::ScalarType acc, int64_t BH, int64_t H, int64_t W) {
  Tables t;
  std::tie(t.ca, t.na) = decay_tables(as_acc(log_alpha, acc).view({BH, H, W}), BH, H, W, true);
  std::tie(t.cb, t.nb) = decay_tables(as_acc(log_beta, acc).view({BH, H, W}), BH, H, W, false);
  // Counts only grow along a line: its last entry says whether the line has a −inf step.
  t.head_blocked = at::logical_or(t.na.select(2, W - 1).amax(1) > 0,
                                  t.nb.select(1, H - 1).amax(1) > 0)
                       .to(at::kByte)
                       .contiguous();
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> polyline_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_alpha,
    const at::Tensor& log_beta, double scale) {
  constexpr const char* op = "polyline_attention";
  check_attention_args(op, q, k, v, log_alpha, log_beta);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = accumulation_type(q.scalar_type());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t BH = B * heads, N = H * W, d = q.size(4), c = v.size(4);
  const auto opts = q.options().dtype(acc);
  at::Tensor out = at::empty({BH, N, c}, opts);
  at::Tensor parts = at::empty({BH, 2, N, c}, opts);
  at::Tensor lse = at::empty({BH, 2, N}, opts);
  if (BH * N > 0) {
    const at::Tensor qf = as_acc(q, acc), kf = as_acc(k, acc), vf = as_acc(v, acc);
    const Tables tb = decay_tables_of(log_alpha, log_beta, acc, BH, H, W);
    const int64_t query_blocks = ceil_div(N, kFwdThreads);
    const int64_t dim = d > c ? d : c;
    AT_DISPATCH_FLOATING_TYPES(acc, "ppma_polyline_attention_fwd", [&] {
      PPMA_DISPATCH_DIM_BOUND(dim, kDim, [&] {
        const auto kernel = polyline_forward_kernel<scalar_t, kDim>;
        const size_t base = 2 * kFwdKeyTile * kDim * sizeof(scalar_t);
        const bool in_smem = tables_fit(base, N, sizeof(scalar_t));
        const size_t bytes = base + (in_smem ? 2 * N * sizeof(scalar_t) : 0);
        set_dynamic_smem(kernel, bytes);
        kernel<<<blocks_for(BH * query_blocks, 1), kFwdThreads, bytes,
                 c10::cuda::getCurrentCUDAStream()>>>(
            qf.const_data_ptr<scalar_t>(), kf.const_data_ptr<scalar_t>(),
            vf.const_data_ptr<scalar_t>(), tb.ca.const_data_ptr<scalar_t>(),
            tb.cb.const_data_ptr<scalar_t>(), tb.na.const_data_ptr<scalar_t>(),
            tb.nb.const_data_ptr<scalar_t>(), tb.head_blocked.const_data_ptr<unsigned char>(), H,
            W, d, c, static_cast<scalar_t>(scale), query_blocks, in_smem,
            out.mutable_data_ptr<scalar_t>(),
            parts.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {out.view({B, heads, H, W, c}).to(v.scalar_type()), parts.view({B, heads, 2, H, W, c}),
          lse.view({B, heads, 2, H, W})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
polyline_attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                 const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& log_alpha, const at::Tensor& log_beta,
                                 const at::Tensor& parts, const at::Tensor& lse, double scale) {
  constexpr const char* op = "polyline_attention_backward";
  check_attention_args(op, q, k, v, log_alpha, log_beta);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = accumulation_type(q.scalar_type());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t BH = B * heads, N = H * W, d = q.size(4), c = v.size(4);
  TORCH_CHECK(grad_out.sizes() == v.sizes() && grad_out.device() == q.device(), op,
              ": grad_out must have the shape of v ", v.sizes(), " on ", q.device(), ", got ",
              grad_out.sizes(), " on ", grad_out.device());
  check_like(op, "parts (from polyline_attention_fwd)", parts, {B, heads, 2, H, W, c}, acc,
             q.device());
  check_like(op, "lse (from polyline_attention_fwd)", lse, {B, heads, 2, H, W}, acc, q.device());
  const auto opts = q.options().dtype(acc);
  at::Tensor dq = at::zeros({BH, N, d}, opts), dk = at::zeros({BH, N, d}, opts);
  at::Tensor dv = at::zeros({BH, N, c}, opts);
  at::Tensor dca = at::zeros({BH, H, W}, opts), dcb = at::zeros({BH, H, W}, opts);
  if (BH * N > 0) {
    const at::Tensor go = as_acc(grad_out, acc);
    const at::Tensor qf = as_acc(q, acc), kf = as_acc(k, acc), vf = as_acc(v, acc);
    const Tables tb = decay_tables_of(log_alpha, log_beta, acc, BH, H, W);
    const at::Tensor parts_f = parts.contiguous();
    const at::Tensor lse_f = lse.contiguous();
    at::Tensor delta = at::empty({BH, 2, N}, opts);
    const Tiling tiling(H, W, kBwdThreads);
    const std::vector<int64_t> partial_shape = {BH, tiling.count, tiling.rows_per_tile, W};
    at::Tensor own_q_ca = at::empty({BH, N}, opts), own_q_cb = at::empty({BH, N}, opts);
    at::Tensor own_k_ca = at::empty({BH, N}, opts), own_k_cb = at::empty({BH, N}, opts);
    at::Tensor cross_q_ca = at::zeros(partial_shape, opts);
    at::Tensor cross_q_cb = at::zeros(partial_shape, opts);
    at::Tensor cross_k_ca = at::zeros(partial_shape, opts);
    at::Tensor cross_k_cb = at::zeros(partial_shape, opts);
    const int64_t dim = d > c ? d : c;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(acc, "ppma_polyline_attention_backward", [&] {
      using acc_t = scalar_t;
      softmax_delta_kernel<acc_t><<<blocks_for(BH * 2 * N, 256), 256, 0, stream>>>(
          go.const_data_ptr<acc_t>(), parts_f.const_data_ptr<acc_t>(), N, c, BH * 2 * N,
          delta.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      PPMA_DISPATCH_DIM_BOUND(dim, kDim, [&] {
        const size_t contrib = 2 * kBwdThreads * kContribLd * sizeof(acc_t);
        const size_t base_q = 2 * kBwdTile * kDim * sizeof(acc_t) + contrib;
        const size_t base_k = base_q + 4 * kBwdTile * sizeof(acc_t);
        const bool in_smem = tables_fit(base_k, N, sizeof(acc_t));
        const size_t table_bytes = in_smem ? 2 * N * sizeof(acc_t) : 0;
        const unsigned int blocks = blocks_for(BH * tiling.count, 1);

        const auto query_kernel = polyline_backward_query_kernel<acc_t, kDim>;
        set_dynamic_smem(query_kernel, base_q + table_bytes);
        query_kernel<<<blocks, kBwdThreads, base_q + table_bytes, stream>>>(
            qf.const_data_ptr<acc_t>(), kf.const_data_ptr<acc_t>(), vf.const_data_ptr<acc_t>(),
            go.const_data_ptr<acc_t>(), tb.ca.const_data_ptr<acc_t>(),
            tb.cb.const_data_ptr<acc_t>(), tb.na.const_data_ptr<acc_t>(),
            tb.nb.const_data_ptr<acc_t>(), tb.head_blocked.const_data_ptr<unsigned char>(),
            lse_f.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(), H, W, d, c,
            static_cast<acc_t>(scale), tiling, in_smem, dq.mutable_data_ptr<acc_t>(),
            own_q_ca.mutable_data_ptr<acc_t>(), own_q_cb.mutable_data_ptr<acc_t>(),
            cross_q_ca.mutable_data_ptr<acc_t>(), cross_q_cb.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();

        const auto key_kernel = polyline_backward_key_kernel<acc_t, kDim>;
        set_dynamic_smem(key_kernel, base_k + table_bytes);
        key_kernel<<<blocks, kBwdThreads, base_k + table_bytes, stream>>>(
            qf.const_data_ptr<acc_t>(), kf.const_data_ptr<acc_t>(), vf.const_data_ptr<acc_t>(),
            go.const_data_ptr<acc_t>(), tb.ca.const_data_ptr<acc_t>(),
            tb.cb.const_data_ptr<acc_t>(), tb.na.const_data_ptr<acc_t>(),
            tb.nb.const_data_ptr<acc_t>(), tb.head_blocked.const_data_ptr<unsigned char>(),
            lse_f.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(), H, W, d, c,
            static_cast<acc_t>(scale), tiling, in_smem, dk.mutable_data_ptr<acc_t>(),
            dv.mutable_data_ptr<acc_t>(), own_k_ca.mutable_data_ptr<acc_t>(),
            own_k_cb.mutable_data_ptr<acc_t>(), cross_k_ca.mutable_data_ptr<acc_t>(),
            cross_k_cb.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    // Table gradients: the four owners' shares, summed elementwise (fixed order).
    dca = own_q_ca.view({BH, H, W}) + own_k_ca.view({BH, H, W}) +
          reduce_row_partials(cross_q_ca, tiling, BH, H, W) +
          reduce_row_partials(cross_k_ca, tiling, BH, H, W);
    dcb = own_q_cb.view({BH, H, W}) + own_k_cb.view({BH, H, W}) +
          reduce_row_partials(cross_q_cb, tiling, BH, H, W) +
          reduce_row_partials(cross_k_cb, tiling, BH, H, W);
  }
  // Ca[i,j] = Σ_{t≤j} log_alpha[i,t] → d log_alpha[i,t] = Σ_{j≥t} dCa[i,j] (likewise along H).
  const at::Tensor dla = finish_decay_grad(
      line_cumsum(dca.contiguous(), BH, H, W, true, /*reverse=*/true), log_alpha, true);
  const at::Tensor dlb = finish_decay_grad(
      line_cumsum(dcb.contiguous(), BH, H, W, false, /*reverse=*/true), log_beta, false);
  return {dq.view({B, heads, H, W, d}).to(q.scalar_type()),
          dk.view({B, heads, H, W, d}).to(k.scalar_type()),
          dv.view({B, heads, H, W, c}).to(v.scalar_type()),
          dla.view({B, heads, H, W}).to(log_alpha.scalar_type()),
          dlb.view({B, heads, H, W}).to(log_beta.scalar_type())};
}

}  // namespace
}  // namespace ppma::cuda

TORCH_LIBRARY_IMPL(ppma, CUDA, m) {
  m.impl("polyline_attention_fwd", &ppma::cuda::polyline_attention_fwd_cuda);
  m.impl("polyline_attention_backward", &ppma::cuda::polyline_attention_backward_cuda);
}
