// Line math of the polyline scan (docs/design.md §1, Corollary 2): products with the 1-D symmetric
// semiseparable masks A_i and B_l by one forward and one backward scan, and their gradients.
//
// A "line" has n steps; each step holds `groups` groups of `c` contiguous lanes, element
// (t, g, ch) at base[t * step + g * c + ch]. Every group has its own log decay per step,
// dec[t * dstep + g * dgroup] (≤ 0). A row of the (H, W, c) grid is one line with one group
// (step = c, dstep = 1); a block of columns is one line with one group per column
// (step = W * c, dstep = W, dgroup = 1), so column scans stream contiguous memory.
//
// The 1-D mask is M[s, t] = Π exp(dec[r]) over r in (min(s, t), max(s, t)] (half-open: the
// decay of step 0 never enters). M x = F + G − x with the forward scan F_t = x_t + e^{a_t} F_{t−1}
// and the backward scan G_t = x_t + e^{a_{t+1}} G_{t+1}. Only multiplications by decays ≤ 1:
// stable for decays near 0 and near 1, nothing is ever divided by a cumulative product.
//
// Plain loops over raw pointers, so a CUDA kernel can run the same functions per line.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace ppma::scan {

template <typename acc_t>
PPMA_HOST_DEVICE inline acc_t decay(acc_t log_decay) {
  using std::exp;  // the float overload for float (host and device)
  return exp(log_decay);
}

// out = M x for one line. out must not alias x; carry holds groups * c values (scratch).
template <typename acc_t>
PPMA_HOST_DEVICE inline void mix_line(const acc_t* x, acc_t* out, int64_t n, int64_t groups,
                                      int64_t c, int64_t step, const acc_t* dec, int64_t dstep,
                                      int64_t dgroup, acc_t* carry) {
  if (n <= 0) return;
  const int64_t lanes = groups * c;
  for (int64_t e = 0; e < lanes; ++e) out[e] = x[e];
  for (int64_t t = 1; t < n; ++t) {  // forward scan, stored in out
    const acc_t* xt = x + t * step;
    const acc_t* prev = out + (t - 1) * step;
    acc_t* ot = out + t * step;
    for (int64_t g = 0; g < groups; ++g) {
      const acc_t a = decay(dec[t * dstep + g * dgroup]);
      for (int64_t ch = 0; ch < c; ++ch) ot[g * c + ch] = xt[g * c + ch] + a * prev[g * c + ch];
    }
  }
  // Backward scan in carry; out_t = F_t + (G_t − x_t) = F_t + e^{a_{t+1}}·G_{t+1}, added as that
  // product: forming G_t and subtracting x_t would turn an infinite x_t into inf − inf = NaN
  // (docs/design.md §2.7) and loses low bits of the tail to cancellation.
  const acc_t* xl = x + (n - 1) * step;
  for (int64_t e = 0; e < lanes; ++e) carry[e] = xl[e];
  for (int64_t t = n - 2; t >= 0; --t) {
    const acc_t* xt = x + t * step;
    acc_t* ot = out + t * step;
    for (int64_t g = 0; g < groups; ++g) {
      const acc_t a = decay(dec[(t + 1) * dstep + g * dgroup]);
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t e = g * c + ch;
        const acc_t tail = a * carry[e];
        ot[e] += tail;
        carry[e] = xt[e] + tail;
      }
    }
  }
}

// Gradients of y = M(dec) u for one line, given the output gradient gy:
//   grad_u = M gy (M is symmetric), written to grad_u (must not alias u or gy);
//   grad_dec[t] = e^{a_t} · Σ_ch (Ggy_t · Fu_{t−1} + Fgy_{t−1} · Gu_t) for t ≥ 1, 0 for t = 0,
// since M[s, r] for r < t ≤ s factors as M[s, t]·e^{a_t}·M[t−1, r] (likewise above the diagonal):
// the decay's gradient is the forward state of one side times the adjoint state of the other.
// grad_dec is written with the decay's strides (dstep, dgroup). fu: scratch of n steps of
// fstep ≥ groups * c values; carry_u, carry_g: groups * c scratch values each.
template <typename acc_t>
PPMA_HOST_DEVICE inline void mix_line_backward(const acc_t* u, const acc_t* gy, acc_t* grad_u,
                                               acc_t* grad_dec, int64_t n, int64_t groups,
                                               int64_t c, int64_t step, const acc_t* dec,
                                               int64_t dstep, int64_t dgroup, acc_t* fu,
                                               int64_t fstep, acc_t* carry_u, acc_t* carry_g) {
  if (n <= 0) return;
  const int64_t lanes = groups * c;
  // Forward scans: Fu in fu, Fgy in grad_u.
  for (int64_t e = 0; e < lanes; ++e) {
    fu[e] = u[e];
    grad_u[e] = gy[e];
  }
  for (int64_t t = 1; t < n; ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      const acc_t a = decay(dec[t * dstep + g * dgroup]);
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t e = t * step + g * c + ch;
        const int64_t f = t * fstep + g * c + ch;
        fu[f] = u[e] + a * fu[f - fstep];
        grad_u[e] = gy[e] + a * grad_u[e - step];
      }
    }
  }
  // Backward scans, running: carry_u = Gu_t, carry_g = Ggy_t.
  const int64_t last = (n - 1) * step;
  for (int64_t e = 0; e < lanes; ++e) {
    carry_u[e] = u[last + e];
    carry_g[e] = gy[last + e];
  }
  for (int64_t t = n - 1; t >= 1; --t) {
    // Here carry holds G_t; grad_u[t] still holds Fgy_t, grad_u[t−1] holds Fgy_{t−1}.
    for (int64_t g = 0; g < groups; ++g) {
      const acc_t a = decay(dec[t * dstep + g * dgroup]);
      acc_t dot = 0;
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t e = g * c + ch;
        const int64_t here = t * step + e;
        const int64_t prev = here - step;
        dot += carry_g[e] * fu[(t - 1) * fstep + e] + grad_u[prev] * carry_u[e];
        grad_u[here] += carry_g[e] - gy[here];
        // Step to G_{t−1} = x_{t−1} + e^{a_t} G_t.
        carry_u[e] = u[prev] + a * carry_u[e];
        carry_g[e] = gy[prev] + a * carry_g[e];
      }
      grad_dec[t * dstep + g * dgroup] = a * dot;
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    grad_dec[g * dgroup] = acc_t(0);
    for (int64_t ch = 0; ch < c; ++ch) grad_u[g * c + ch] += carry_g[g * c + ch] - gy[g * c + ch];
  }
}

}  // namespace ppma::scan
