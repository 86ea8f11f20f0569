// Criss-cross polyline attention (docs/design.md §2.4), CUDA kernels behind the entry points of
// criss_cross_attention_kernel.h (called by the host code in csrc/criss_cross_attention.cpp),
// with the same saved tensors as the CPU kernels.
//
// A "line" is one grid row (n = W) or one grid column (n = H) of one head (cuda_common.cuh,
// Lines). Every step is a kernel over lines in which each output element has one owner thread,
// so nothing needs atomics and results are reproducible bit for bit. The per-line arithmetic
// (masked softmax, softmax backward, mask gradients, reverse cumsum) is the shared host/device
// code of criss_cross_math.h, which the CPU tests exercise.
//
// Forward, with X₁ = R(V) and X₂ = Cc(V):   out = ½·Cc(X₁) + ½·R(X₂).
// Backward, with g = dout:
//   dX₁ = ½·Ccᵀ(g), dX₂ = ½·Rᵀ(g), dV = Rᵀ(dX₁) + Ccᵀ(dX₂),
//   dÂ = dX₁·Vᵀ + ½·g·X₂ᵀ (per row), dB̂ = ½·g·X₁ᵀ + dX₂·Vᵀ (per column),
//   dS = softmax backward, then dQ, dK and the mask gradients per line.
#include <ATen/ATen.h>

#include "../criss_cross_attention_kernel.h"
#include "../criss_cross_math.h"
#include "cuda_common.cuh"

namespace ppma {
namespace cuda {
namespace {

constexpr int kThreads = 128;

// probs[line, pos, :] = softmax_x(scale·q[pos]·k[x] − |C[pos] − C[x]|): one thread per
// (line, pos). The scores are written to the output row, then normalised in place. Nc: the
// lines' counts of −inf log decays (docs/design.md §2.7); keys across one get probability 0.
template <typename acc_t>
__global__ void line_softmax_kernel(const acc_t* __restrict__ q, const acc_t* __restrict__ k,
                                    const acc_t* __restrict__ C, const acc_t* __restrict__ Nc,
                                    Lines lines, int64_t num_lines, int64_t d, acc_t scale,
                                    acc_t* __restrict__ probs) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = lines.n;
  if (idx >= num_lines * n) return;
  const int64_t line = idx / n, pos = idx - line * n;
  const acc_t* qp = q + lines.token(line, pos) * d;
  acc_t* row = probs + idx * n;
  for (int64_t x = 0; x < n; ++x) {
    const acc_t* kp = k + lines.token(line, x) * d;
    acc_t s = 0;
    for (int64_t e = 0; e < d; ++e) s += qp[e] * kp[e];
    row[x] = scale * s;
  }
  criss_cross::masked_softmax_row(row, n, C + line * n, Nc + line * n, pos);
}

// y[line, pos, e] (=|+=) alpha·Σ_x P[pos, x]·x_in[line, x, e], with P = probs[line] or its
// transpose: one thread per output element, consecutive threads along e (coalesced).
template <typename acc_t>
__global__ void line_apply_kernel(const acc_t* __restrict__ probs, const acc_t* __restrict__ x_in,
                                  Lines lines, int64_t num_lines, int64_t c, bool transpose,
                                  acc_t alpha, bool accumulate, acc_t* __restrict__ y) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = lines.n;
  if (idx >= num_lines * n * c) return;
  const int64_t e = idx % c, lp = idx / c;  // lp = line·n + pos
  const int64_t line = lp / n, pos = lp - line * n;
  const acc_t* P = probs + line * n * n;
  acc_t sum = 0;
  for (int64_t x = 0; x < n; ++x) {
    const acc_t p = transpose ? P[x * n + pos] : P[pos * n + x];
    sum += p * x_in[lines.token(line, x) * c + e];
  }
  acc_t* out = y + lines.token(line, pos) * c + e;
  *out = accumulate ? *out + alpha * sum : alpha * sum;
}

// ds[line, pos, :] = softmax backward of probs[line, pos, :] with
// dP[pos, x] = a1·A1[pos]·B1[x] + a2·A2[pos]·B2[x] (dot products over c): one thread per row.
template <typename acc_t>
__global__ void line_score_grad_kernel(const acc_t* __restrict__ probs,
                                       const acc_t* __restrict__ A1, const acc_t* __restrict__ B1,
                                       acc_t a1, const acc_t* __restrict__ A2,
                                       const acc_t* __restrict__ B2, acc_t a2, Lines lines,
                                       int64_t num_lines, int64_t c, acc_t* __restrict__ ds) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = lines.n;
  if (idx >= num_lines * n) return;
  const int64_t line = idx / n, pos = idx - line * n;
  const int64_t tp = lines.token(line, pos) * c;
  acc_t* row = ds + idx * n;
  for (int64_t x = 0; x < n; ++x) {
    const int64_t tx = lines.token(line, x) * c;
    acc_t s1 = 0, s2 = 0;
    for (int64_t e = 0; e < c; ++e) {
      s1 += A1[tp + e] * B1[tx + e];
      s2 += A2[tp + e] * B2[tx + e];
    }
    row[x] = a1 * s1 + a2 * s2;
  }
  criss_cross::softmax_backward_row(probs + idx * n, row, n);
}

// dq, dk for one (token, e), from the row score gradients ds_rows (BH, H, W, W) and the column
// ones ds_cols (BH, W, H, H):
//   dq[i,j] = scale·(Σ_l dSr_i[j,l]·k[i,l] + Σ_k dSc_j[i,k]·k[k,j])
//   dk[i,j] = scale·(Σ_x dSr_i[x,j]·q[i,x] + Σ_x dSc_j[x,i]·q[x,j])
template <typename acc_t>
__global__ void qk_grad_kernel(const acc_t* __restrict__ q, const acc_t* __restrict__ k,
                               const acc_t* __restrict__ ds_rows,
                               const acc_t* __restrict__ ds_cols, int64_t BH, int64_t H,
                               int64_t W, int64_t d, acc_t scale, acc_t* __restrict__ dq,
                               acc_t* __restrict__ dk) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t N = H * W;
  if (idx >= BH * N * d) return;
  const int64_t e = idx % d, tok = idx / d;  // tok = bh·N + i·W + j
  const int64_t bh = tok / N, i = (tok % N) / W, j = tok % W;
  const acc_t* q_h = q + bh * N * d;
  const acc_t* k_h = k + bh * N * d;
  const acc_t* dsr = ds_rows + (bh * H + i) * W * W;  // row line i: W×W
  const acc_t* dsc = ds_cols + (bh * W + j) * H * H;  // column line j: H×H
  acc_t gq = 0, gk = 0;
  for (int64_t x = 0; x < W; ++x) {
    gq += dsr[j * W + x] * k_h[(i * W + x) * d + e];
    gk += dsr[x * W + j] * q_h[(i * W + x) * d + e];
  }
  for (int64_t x = 0; x < H; ++x) {
    gq += dsc[i * H + x] * k_h[(x * W + j) * d + e];
    gk += dsc[x * H + i] * q_h[(x * W + j) * d + e];
  }
  dq[idx] = scale * gq;
  dk[idx] = scale * gk;
}

// Log-decay gradient of one line from its score gradient and its cumsum table C (n per line,
// contiguous): dC (scratch, n per line) collects both ends of every mask entry, then a reverse
// cumsum along the line. One thread per line.
template <typename acc_t>
__global__ void line_mask_grad_kernel(const acc_t* __restrict__ ds, const acc_t* __restrict__ C,
                                      Lines lines, int64_t num_lines,
                                      acc_t* __restrict__ dC_scratch,
                                      acc_t* __restrict__ grad_log_decay) {
  const int64_t line = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (line >= num_lines) return;
  const int64_t n = lines.n;
  acc_t* dC = dC_scratch + line * n;
  for (int64_t x = 0; x < n; ++x) dC[x] = 0;
  const acc_t* ds_line = ds + line * n * n;
  const acc_t* C_line = C + line * n;
  for (int64_t r = 0; r < n; ++r) {
    criss_cross::mask_grad_row(ds_line + r * n, C_line, n, r, dC);
  }
  criss_cross::cumsum_grad(dC, n, grad_log_decay + lines.base(line), lines.stride);
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t work, Args... args) {
  if (work <= 0) return;
  kernel<<<blocks_for(work, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tables with each line contiguous (docs/design.md §1, §2.7): the sums Ca (BH, H, W) and the
// counts Na of the rows as the host code built them, and Cbᵀ, Nbᵀ (BH, W, H) for the columns.
struct LineTables {
  at::Tensor ca, cb_t, na, nb_t;
};

LineTables line_tables(const DecayTables& t) {
  return {t.ca, t.cb.transpose(-1, -2).contiguous(), t.na,
          t.nb.transpose(-1, -2).contiguous()};
}

// The forward's launches for one accumulation dtype: both line softmaxes, then
// X₁ = R(V), X₂ = Cc(V), out = ½·Cc(X₁) + ½·R(X₂).
template <typename T>
void forward_launches(const AttentionInputs& in, const LineTables& tb, const at::Tensor& col_probs,
                      at::Tensor& out, const CrissCrossSaved& saved) {
  const int64_t BH = in.q.size(0), H = in.q.size(1), W = in.q.size(2);
  const int64_t d = in.q.size(3), c = in.v.size(3);
  const Lines rows = Lines::rows(H, W), cols = Lines::columns(H, W);
  const int64_t n_rows = BH * H, n_cols = BH * W;
  const T s = static_cast<T>(in.scale), one = 1, half = 0.5;
  const T* qp = in.q.const_data_ptr<T>();
  const T* kp = in.k.const_data_ptr<T>();
  const T* vp = in.v.const_data_ptr<T>();
  T* rp = saved.row_probs.mutable_data_ptr<T>();
  T* cp = col_probs.mutable_data_ptr<T>();
  T* x1 = saved.rows_v.mutable_data_ptr<T>();
  T* x2 = saved.cols_v.mutable_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  launch(line_softmax_kernel<T>, n_rows * W, qp, kp, tb.ca.const_data_ptr<T>(),
         tb.na.const_data_ptr<T>(), rows, n_rows, d, s, rp);
  launch(line_softmax_kernel<T>, n_cols * H, qp, kp, tb.cb_t.const_data_ptr<T>(),
         tb.nb_t.const_data_ptr<T>(), cols, n_cols, d, s, cp);
  launch(line_apply_kernel<T>, n_rows * W * c, static_cast<const T*>(rp), vp, rows, n_rows, c,
         false, one, false, x1);
  launch(line_apply_kernel<T>, n_cols * H * c, static_cast<const T*>(cp), vp, cols, n_cols, c,
         false, one, false, x2);
  launch(line_apply_kernel<T>, n_cols * H * c, static_cast<const T*>(cp),
         static_cast<const T*>(x1), cols, n_cols, c, false, half, false, op);
  launch(line_apply_kernel<T>, n_rows * W * c, static_cast<const T*>(rp),
         static_cast<const T*>(x2), rows, n_rows, c, false, half, true, op);
}

// The backward's scratch: B̂ (recomputed), dX₁, dX₂, the score gradients of rows and columns,
// and n values per line for the table gradient of either direction.
struct BackwardScratch {
  at::Tensor col_probs, dx1, dx2, ds_rows, ds_cols, line;
  BackwardScratch(int64_t BH, int64_t H, int64_t W, int64_t c, const at::TensorOptions& opts)
      : col_probs(at::empty({BH, W, H, H}, opts)), dx1(at::empty({BH, H, W, c}, opts)),
        dx2(at::empty({BH, H, W, c}, opts)), ds_rows(at::empty({BH, H, W, W}, opts)),
        ds_cols(at::empty({BH, W, H, H}, opts)), line(at::empty({BH * H * W}, opts)) {}
};

// dX₁ = ½·Ccᵀ(g), dX₂ = ½·Rᵀ(g), dV = Rᵀ(dX₁) + Ccᵀ(dX₂), then
// dÂ = dX₁·Vᵀ + ½·g·X₂ᵀ and dB̂ = ½·g·X₁ᵀ + dX₂·Vᵀ through the softmax backward.
template <typename T>
void value_and_score_grads(const T* g, const AttentionInputs& in, const CrissCrossSaved& saved,
                           BackwardScratch& sc, at::Tensor& dv) {
  const int64_t BH = in.q.size(0), H = in.q.size(1), W = in.q.size(2), c = in.v.size(3);
  const Lines rows = Lines::rows(H, W), cols = Lines::columns(H, W);
  const int64_t n_rows = BH * H, n_cols = BH * W;
  const T one = 1, half = 0.5;
  const T* vp = in.v.const_data_ptr<T>();
  const T* rpp = saved.row_probs.const_data_ptr<T>();
  const T* cpp = sc.col_probs.const_data_ptr<T>();
  const T* x1p = saved.rows_v.const_data_ptr<T>();
  const T* x2p = saved.cols_v.const_data_ptr<T>();
  T* dx1p = sc.dx1.mutable_data_ptr<T>();
  T* dx2p = sc.dx2.mutable_data_ptr<T>();
  T* dvp = dv.mutable_data_ptr<T>();
  launch(line_apply_kernel<T>, n_cols * H * c, cpp, g, cols, n_cols, c, true, half, false, dx1p);
  launch(line_apply_kernel<T>, n_rows * W * c, rpp, g, rows, n_rows, c, true, half, false, dx2p);
  launch(line_apply_kernel<T>, n_rows * W * c, rpp, static_cast<const T*>(dx1p), rows, n_rows, c,
         true, one, false, dvp);
  launch(line_apply_kernel<T>, n_cols * H * c, cpp, static_cast<const T*>(dx2p), cols, n_cols, c,
         true, one, true, dvp);
  launch(line_score_grad_kernel<T>, n_rows * W, rpp, static_cast<const T*>(dx1p), vp, one, g,
         x2p, half, rows, n_rows, c, sc.ds_rows.mutable_data_ptr<T>());
  launch(line_score_grad_kernel<T>, n_cols * H, cpp, g, x1p, half, static_cast<const T*>(dx2p),
         vp, one, cols, n_cols, c, sc.ds_cols.mutable_data_ptr<T>());
}

// The backward's launches for one accumulation dtype (see the file comment).
template <typename T>
void backward_launches(const T* g, const AttentionInputs& in, const LineTables& tb,
                       const CrissCrossSaved& saved, CrissCrossGrads& grads) {
  const int64_t BH = in.q.size(0), H = in.q.size(1), W = in.q.size(2);
  const int64_t d = in.q.size(3), c = in.v.size(3);
  const Lines rows = Lines::rows(H, W), cols = Lines::columns(H, W);
  const int64_t n_rows = BH * H, n_cols = BH * W;
  const T scale = static_cast<T>(in.scale);
  const T* qp = in.q.const_data_ptr<T>();
  const T* kp = in.k.const_data_ptr<T>();
  BackwardScratch sc(BH, H, W, c, in.q.options());
  // The same kernel and inputs as the forward's, so bitwise the same column softmaxes.
  launch(line_softmax_kernel<T>, n_cols * H, qp, kp, tb.cb_t.const_data_ptr<T>(),
         tb.nb_t.const_data_ptr<T>(), cols, n_cols, d, scale, sc.col_probs.mutable_data_ptr<T>());
  value_and_score_grads<T>(g, in, saved, sc, grads.dv);
  const T* ds_rows = sc.ds_rows.const_data_ptr<T>();
  const T* ds_cols = sc.ds_cols.const_data_ptr<T>();
  launch(qk_grad_kernel<T>, BH * H * W * d, qp, kp, ds_rows, ds_cols, BH, H, W, d, scale,
         grads.dq.mutable_data_ptr<T>(), grads.dk.mutable_data_ptr<T>());
  // Blocked pairs have probability 0, hence dS = 0: they add nothing here.
  launch(line_mask_grad_kernel<T>, n_rows, ds_rows, tb.ca.const_data_ptr<T>(), rows, n_rows,
         sc.line.mutable_data_ptr<T>(), grads.d_log_alpha.mutable_data_ptr<T>());
  launch(line_mask_grad_kernel<T>, n_cols, ds_cols, tb.cb_t.const_data_ptr<T>(), cols, n_cols,
         sc.line.mutable_data_ptr<T>(), grads.d_log_beta.mutable_data_ptr<T>());
}

}  // namespace
}  // namespace cuda

void criss_cross_attention_fwd_kernel_cuda(const AttentionInputs& in, at::Tensor& out,
                                           const CrissCrossSaved& saved) {
  const int64_t BH = in.q.size(0), H = in.q.size(1), W = in.q.size(2), c = in.v.size(3);
  const auto opts = in.q.options();
  // Inference keeps nothing, but the kernels still need R, Â and both half-way products.
  const CrissCrossSaved kept = saved.row_probs.defined()
                                   ? saved
                                   : CrissCrossSaved{at::empty({BH, H, W, W}, opts),
                                                     at::empty({BH, H, W, c}, opts),
                                                     at::empty({BH, H, W, c}, opts)};
  // Not returned: the backward recomputes the column softmaxes (O(N·H) per head) instead.
  const at::Tensor col_probs = at::empty({BH, W, H, H}, opts);
  const cuda::LineTables tb = cuda::line_tables(in.tables);
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "ppma_criss_cross_fwd", [&] {
    cuda::forward_launches<scalar_t>(in, tb, col_probs, out, kept);
  });
}

void criss_cross_attention_bwd_kernel_cuda(const at::Tensor& grad_out,
                                           const AttentionInputs& in,
                                           const CrissCrossSaved& saved, CrissCrossGrads& grads) {
  const cuda::LineTables tb = cuda::line_tables(in.tables);
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "ppma_criss_cross_bwd", [&] {
    cuda::backward_launches<scalar_t>(grad_out.const_data_ptr<scalar_t>(), in, tb, saved, grads);
  });
}

}  // namespace ppma
