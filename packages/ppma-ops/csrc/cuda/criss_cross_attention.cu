// Criss-cross polyline attention (docs/design.md §2.4), CUDA kernels for the schemas that
// csrc/criss_cross_attention.cpp defines (ppma::criss_cross_attention_fwd / _backward), with
// the same saved tensors as the CPU kernels.
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
#include <torch/library.h>

#include <tuple>
#include <utility>

#include "../criss_cross_math.h"
#include "cuda_common.cuh"

namespace ppma::cuda {
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

// Tables with each line contiguous, in the accumulation dtype (docs/design.md §1, §2.7): sums
// of the finite log decays Ca (B·heads, H, W) for the rows and Cbᵀ (B·heads, W, H) for the
// columns, and the counts of −inf log decays Na, Nbᵀ in the same layouts.
struct LineTables {
  at::Tensor ca, cb_t, na, nb_t;
};

LineTables line_tables(const at::Tensor& log_alpha, const at::Tensor& log_beta,
                       at::ScalarType acc, int64_t BH, int64_t H, int64_t W) {
  LineTables t;
  std::tie(t.ca, t.na) = decay_tables(as_acc(log_alpha, acc).view({BH, H, W}), BH, H, W,
                                      /*along_rows=*/true);
  at::Tensor cb, nb;
  std::tie(cb, nb) = decay_tables(as_acc(log_beta, acc).view({BH, H, W}), BH, H, W,
                                  /*along_rows=*/false);
  t.cb_t = cb.transpose(-1, -2).contiguous();
  t.nb_t = nb.transpose(-1, -2).contiguous();
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> criss_cross_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_alpha,
    const at::Tensor& log_beta, double scale) {
  check_attention_args("criss_cross_attention", q, k, v, log_alpha, log_beta);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = accumulation_type(q.scalar_type());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t BH = B * heads, d = q.size(4), c = v.size(4);
  const auto opts = q.options().dtype(acc);
  at::Tensor out = at::zeros({BH, H, W, c}, opts);
  at::Tensor row_probs = at::zeros({BH, H, W, W}, opts);
  // Not returned: the backward recomputes the column softmaxes (O(N·H) per head) instead.
  at::Tensor col_probs = at::empty({BH, W, H, H}, opts);
  at::Tensor rows_v = at::zeros({BH, H, W, c}, opts);
  at::Tensor cols_v = at::zeros({BH, H, W, c}, opts);
  if (BH * H * W > 0) {
    const at::Tensor qf = as_acc(q, acc), kf = as_acc(k, acc), vf = as_acc(v, acc);
    const LineTables tb = line_tables(log_alpha, log_beta, acc, BH, H, W);
    const Lines rows = Lines::rows(H, W), cols = Lines::columns(H, W);
    const int64_t n_rows = BH * H, n_cols = BH * W;
    AT_DISPATCH_FLOATING_TYPES(acc, "ppma_criss_cross_fwd", [&] {
      const auto s = static_cast<scalar_t>(scale);
      const scalar_t* qp = qf.const_data_ptr<scalar_t>();
      const scalar_t* kp = kf.const_data_ptr<scalar_t>();
      const scalar_t* vp = vf.const_data_ptr<scalar_t>();
      scalar_t* rp = row_probs.mutable_data_ptr<scalar_t>();
      scalar_t* cp = col_probs.mutable_data_ptr<scalar_t>();
      scalar_t* x1 = rows_v.mutable_data_ptr<scalar_t>();
      scalar_t* x2 = cols_v.mutable_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      launch(line_softmax_kernel<scalar_t>, n_rows * W, qp, kp, tb.ca.const_data_ptr<scalar_t>(),
             tb.na.const_data_ptr<scalar_t>(), rows, n_rows, d, s, rp);
      launch(line_softmax_kernel<scalar_t>, n_cols * H, qp, kp,
             tb.cb_t.const_data_ptr<scalar_t>(), tb.nb_t.const_data_ptr<scalar_t>(), cols, n_cols,
             d, s, cp);
      const scalar_t one = 1, half = 0.5;
      launch(line_apply_kernel<scalar_t>, n_rows * W * c, static_cast<const scalar_t*>(rp), vp,
             rows, n_rows, c, false, one, false, x1);
      launch(line_apply_kernel<scalar_t>, n_cols * H * c, static_cast<const scalar_t*>(cp), vp,
             cols, n_cols, c, false, one, false, x2);
      launch(line_apply_kernel<scalar_t>, n_cols * H * c, static_cast<const scalar_t*>(cp),
             static_cast<const scalar_t*>(x1), cols, n_cols, c, false, half, false, op);
      launch(line_apply_kernel<scalar_t>, n_rows * W * c, static_cast<const scalar_t*>(rp),
             static_cast<const scalar_t*>(x2), rows, n_rows, c, false, half, true, op);
    });
  }
  return {out.view({B, heads, H, W, c}).to(v.scalar_type()),
          row_probs.view({B, heads, H, W, W}), rows_v.view({B, heads, H, W, c}),
          cols_v.view({B, heads, H, W, c})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> criss_cross_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& log_alpha, const at::Tensor& log_beta, const at::Tensor& row_probs,
    const at::Tensor& rows_v, const at::Tensor& cols_v, double scale) {
  constexpr const char* op = "criss_cross_attention_backward";
  check_attention_args(op, q, k, v, log_alpha, log_beta);
  TORCH_CHECK(grad_out.sizes() == v.sizes(), op, ": grad_out must have the shape of v ",
              v.sizes(), ", got ", grad_out.sizes());
  const auto acc = accumulation_type(q.scalar_type());
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3);
  const int64_t BH = B * heads, d = q.size(4), c = v.size(4);
  const auto dev = q.device();
  TORCH_CHECK(grad_out.device() == dev, op, ": grad_out is on ", grad_out.device(),
              " but q is on ", dev);
  check_like(op, "row_probs", row_probs, {B, heads, H, W, W}, acc, dev);
  check_like(op, "rows_v", rows_v, {B, heads, H, W, c}, acc, dev);
  check_like(op, "cols_v", cols_v, {B, heads, H, W, c}, acc, dev);
  const c10::cuda::CUDAGuard guard(dev);
  const auto opts = q.options().dtype(acc);
  at::Tensor dq = at::zeros({BH, H, W, d}, opts), dk = at::zeros({BH, H, W, d}, opts);
  at::Tensor dv = at::zeros({BH, H, W, c}, opts);
  at::Tensor dla = at::zeros({BH, H, W}, opts), dlb = at::zeros({BH, H, W}, opts);
  if (BH * H * W > 0) {
    const at::Tensor g = as_acc(grad_out, acc);
    const at::Tensor qf = as_acc(q, acc), kf = as_acc(k, acc), vf = as_acc(v, acc);
    const at::Tensor rp = row_probs.contiguous();
    at::Tensor cp = at::empty({BH, W, H, H}, opts);  // B̂, recomputed below
    const at::Tensor x1 = rows_v.contiguous(), x2 = cols_v.contiguous();
    const LineTables tb = line_tables(log_alpha, log_beta, acc, BH, H, W);
    at::Tensor dx1 = at::empty({BH, H, W, c}, opts), dx2 = at::empty({BH, H, W, c}, opts);
    at::Tensor ds_rows = at::empty({BH, H, W, W}, opts);
    at::Tensor ds_cols = at::empty({BH, W, H, H}, opts);
    at::Tensor scratch = at::empty({BH * H * W}, opts);  // n per line, for either direction
    const Lines rows = Lines::rows(H, W), cols = Lines::columns(H, W);
    const int64_t n_rows = BH * H, n_cols = BH * W;
    AT_DISPATCH_FLOATING_TYPES(acc, "ppma_criss_cross_backward", [&] {
      using T = scalar_t;
      const T one = 1, half = 0.5;
      const T* gp = g.const_data_ptr<T>();
      const T* vp = vf.const_data_ptr<T>();
      const T* rpp = rp.const_data_ptr<T>();
      // The same kernel and inputs as the forward's, so bitwise the same column softmaxes.
      launch(line_softmax_kernel<T>, n_cols * H, qf.const_data_ptr<T>(), kf.const_data_ptr<T>(),
             tb.cb_t.const_data_ptr<T>(), tb.nb_t.const_data_ptr<T>(), cols, n_cols, d,
             static_cast<T>(scale), cp.mutable_data_ptr<T>());
      const T* cpp = cp.const_data_ptr<T>();
      const T* x1p = x1.const_data_ptr<T>();
      const T* x2p = x2.const_data_ptr<T>();
      T* dx1p = dx1.mutable_data_ptr<T>();
      T* dx2p = dx2.mutable_data_ptr<T>();
      T* dvp = dv.mutable_data_ptr<T>();
      // dX₁ = ½·Ccᵀ(g), dX₂ = ½·Rᵀ(g); dV = Rᵀ(dX₁) + Ccᵀ(dX₂).
      launch(line_apply_kernel<T>, n_cols * H * c, cpp, gp, cols, n_cols, c, true, half, false,
             dx1p);
      launch(line_apply_kernel<T>, n_rows * W * c, rpp, gp, rows, n_rows, c, true, half, false,
             dx2p);
      launch(line_apply_kernel<T>, n_rows * W * c, rpp, static_cast<const T*>(dx1p), rows,
             n_rows, c, true, one, false, dvp);
      launch(line_apply_kernel<T>, n_cols * H * c, cpp, static_cast<const T*>(dx2p), cols,
             n_cols, c, true, one, true, dvp);
      // dÂ = dX₁·Vᵀ + ½·g·X₂ᵀ; dB̂ = ½·g·X₁ᵀ + dX₂·Vᵀ; then the softmax backward.
      launch(line_score_grad_kernel<T>, n_rows * W, rpp, static_cast<const T*>(dx1p), vp, one,
             gp, x2p, half, rows, n_rows, c, ds_rows.mutable_data_ptr<T>());
      launch(line_score_grad_kernel<T>, n_cols * H, cpp, gp, x1p, half,
             static_cast<const T*>(dx2p), vp, one, cols, n_cols, c,
             ds_cols.mutable_data_ptr<T>());
      launch(qk_grad_kernel<T>, BH * H * W * d, qf.const_data_ptr<T>(), kf.const_data_ptr<T>(),
             static_cast<const T*>(ds_rows.const_data_ptr<T>()),
             static_cast<const T*>(ds_cols.const_data_ptr<T>()), BH, H, W, d,
             static_cast<T>(scale), dq.mutable_data_ptr<T>(), dk.mutable_data_ptr<T>());
      // Blocked pairs have probability 0, hence dS = 0: they add nothing here.
      launch(line_mask_grad_kernel<T>, n_rows, ds_rows.const_data_ptr<T>(),
             tb.ca.const_data_ptr<T>(), rows, n_rows, scratch.mutable_data_ptr<T>(),
             dla.mutable_data_ptr<T>());
      launch(line_mask_grad_kernel<T>, n_cols, ds_cols.const_data_ptr<T>(),
             tb.cb_t.const_data_ptr<T>(), cols, n_cols, scratch.mutable_data_ptr<T>(),
             dlb.mutable_data_ptr<T>());
    });
    dla = finish_decay_grad(dla, log_alpha, /*along_rows=*/true);
    dlb = finish_decay_grad(dlb, log_beta, /*along_rows=*/false);
  }
  const auto dt = q.scalar_type();
  return {dq.view({B, heads, H, W, d}).to(dt), dk.view({B, heads, H, W, d}).to(dt),
          dv.view({B, heads, H, W, c}).to(v.scalar_type()), dla.view({B, heads, H, W}).to(dt),
          dlb.view({B, heads, H, W}).to(dt)};
}

// The forward's output alone (the saved tensors are dropped as soon as it returns).
at::Tensor criss_cross_inference_cuda(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& log_alpha,
                                      const at::Tensor& log_beta, double scale) {
  return std::get<0>(criss_cross_fwd_cuda(q, k, v, log_alpha, log_beta, scale));
}

}  // namespace
}  // namespace ppma::cuda

TORCH_LIBRARY_IMPL(ppma, CUDA, m) {
  m.impl("criss_cross_attention_fwd", &ppma::cuda::criss_cross_fwd_cuda);
  m.impl("criss_cross_attention_backward", &ppma::cuda::criss_cross_backward_cuda);
  m.impl("criss_cross_attention_inference", &ppma::cuda::criss_cross_inference_cuda);
}
