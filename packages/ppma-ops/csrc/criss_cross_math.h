// Per-line math of criss-cross polyline attention (docs/design.md §2.4), shared by the CPU kernels
// (csrc/cpu/criss_cross_attention_kernel.cpp: tails and the double path) and, under nvcc, CUDA
// kernels. A "line" is one grid row (n = W tokens, C = that row of Ca) or one grid column
// (n = H, C = that column of Cb); its score tile S is n×n, row-major with leading dimension ld.
//
// Internal linkage on purpose: this header is compiled into one object per instruction set,
// and an inline function shared across those objects could be resolved to an AVX-512 copy.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace ppma::criss_cross {
namespace {

// 1-D log mask −|C[query] − C[key]|: log A_i[j, l] for a row, log B_l[i, k] for a column.
template <typename T>
PPMA_HOST_DEVICE inline T log_mask(T c_query, T c_key) {
  using std::fabs;  // the float overload for float (host and device)
  return -fabs(c_query - c_key);
}

// Blocked paths (docs/design.md §2.7): with log decays of −inf, C holds the line's sums of the
// finite log decays and Nc counts the −inf ones so far. Counts never decrease along a line, so
// the tokens with equal counts form segments; a path is open exactly inside one.
// The end (exclusive) of the segment that starts at `begin`.
template <typename T>
PPMA_HOST_DEVICE inline int64_t segment_end(const T* Nc, int64_t n, int64_t begin) {
  int64_t end = begin + 1;
  while (end < n && Nc[end] == Nc[begin]) ++end;
  return end;
}

// Row `row` of the line softmax: s[x] ← softmax_x(s[x] + log_mask(C[row], C[x])). Nc: the
// counts of −inf log decays, or null; keys outside the row's segment get probability 0 (their
// score becomes −inf; the row's own token keeps the maximum finite).
template <typename T>
PPMA_HOST_DEVICE inline void masked_softmax_row(T* s, int64_t n, const T* C, const T* Nc,
                                                int64_t row) {
  using std::exp;
  T m = -INFINITY;
  for (int64_t x = 0; x < n; ++x) {
    s[x] = (Nc != nullptr && Nc[x] != Nc[row]) ? T(-INFINITY) : s[x] + log_mask(C[row], C[x]);
    m = s[x] > m ? s[x] : m;
  }
  T sum = 0;
  for (int64_t x = 0; x < n; ++x) {
    s[x] = exp(s[x] - m);
    sum += s[x];
  }
  const T inv = T(1) / sum;
  for (int64_t x = 0; x < n; ++x) s[x] *= inv;
}

// Softmax backward of one row, in place: dp ← p ⊙ (dp − Σ p ⊙ dp).
template <typename T>
PPMA_HOST_DEVICE inline void softmax_backward_row(const T* p, T* dp, int64_t n) {
  T dot = 0;
  for (int64_t x = 0; x < n; ++x) dot += p[x] * dp[x];
  for (int64_t x = 0; x < n; ++x) dp[x] = p[x] * (dp[x] - dot);
}

// Row r of the score gradient dS feeds the gradient of the cumsum table C of its line:
// d log_mask(C[a], C[b]) / dC[a] = −sign(C[a] − C[b]), which is sign(a − b) because the log
// decays are ≤ 0 and C is non-increasing along the line, and 0 where C[a] = C[b] (decays of
// exactly 1: torch.abs's subgradient, as in the reference and the vanilla op). So
// dC[m] = Σ_x sign(m − x)·[C[m] ≠ C[x]]·(dS[m, x] + dS[x, m]); this adds row r's share: the
// dS[r, x] terms to dC[r] and the dS[r, m] terms (x = r) to every dC[m].
template <typename T>
PPMA_HOST_DEVICE inline void mask_grad_row(const T* ds_row, const T* C, int64_t n, int64_t r,
                                           T* dC) {
  T own = 0;
  for (int64_t x = 0; x < r; ++x) {
    const T g = C[x] != C[r] ? ds_row[x] : T(0);
    own += g;
    dC[x] -= g;
  }
  for (int64_t x = r + 1; x < n; ++x) {
    const T g = C[x] != C[r] ? ds_row[x] : T(0);
    own -= g;
    dC[x] += g;
  }
  dC[r] += own;
}

// C[m] = Σ_{t ≤ m} log_decay[t], so d log_decay[t] = Σ_{m ≥ t} dC[m] (a reverse cumsum, written
// with stride). Step 0's decay never enters the mask: its gradient is exactly zero.
template <typename T>
PPMA_HOST_DEVICE inline void cumsum_grad(const T* dC, int64_t n, T* grad_log_decay,
                                         int64_t stride) {
  T acc = 0;
  for (int64_t t = n - 1; t >= 1; --t) {
    acc += dC[t];
    grad_log_decay[t * stride] = acc;
  }
  if (n > 0) grad_log_decay[0] = T(0);
}

}  // namespace
}  // namespace ppma::criss_cross
