// Channels-last depthwise convolution, CPU kernels (compiled once per ISA; see CMakeLists.txt).
//
// The PPMA blocks run three depthwise convolutions each (CPE 3×3, LePE 5×5, the feed-forward's
// 3×3) on (B, H, W, C) token maps. On small maps oneDNN spends far longer on setup than on the
// few hundred thousand multiply-adds. Here a pixel's C channels are contiguous, so every tap
// is one vector multiply-add over a block of channels held in registers, with no layout
// conversion and no im2col.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "depthwise_conv2d_kernel.h"

namespace ppma {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Channels per register block: four vectors of accumulators (32 floats or 16 doubles on
// AVX2, 64 floats on AVX-512). Channels past the last whole block go one vector at a time,
// then one channel at a time: small models have 16 to 48 channels, fewer than one block.
template <typename T>
constexpr int64_t kChannelBlock = 4 * Vectorized<T>::size();
template <typename T>
constexpr int64_t kVector = Vectorized<T>::size();

// Work (multiply-adds) below which a parallel chunk is not worth a thread.
constexpr int64_t kGrainMacs = 1 << 15;

// Accumulators for N channels, kept in registers across a loop of multiply-adds.
template <typename T, int64_t N>
struct Accumulator {
  static constexpr int64_t kVectors = N / Vectorized<T>::size();
  static_assert(kVectors * Vectorized<T>::size() == N, "a block is whole vectors");
  Vectorized<T> v[kVectors];

  void set(const T* from) {  // from == nullptr: zeros
    for (int64_t i = 0; i < kVectors; ++i)
      v[i] = from ? Vectorized<T>::loadu(from + i * Vectorized<T>::size()) : Vectorized<T>(T(0));
  }
  void fma(const T* a, const T* b) {  // += a · b
    for (int64_t i = 0; i < kVectors; ++i) {
      const int64_t o = i * Vectorized<T>::size();
      v[i] = at::vec::fmadd(Vectorized<T>::loadu(a + o), Vectorized<T>::loadu(b + o), v[i]);
    }
  }
  void store(T* to) const {
    for (int64_t i = 0; i < kVectors; ++i) v[i].store(to + i * Vectorized<T>::size());
  }
  void add_to(T* to) const {
    for (int64_t i = 0; i < kVectors; ++i) {
      const int64_t o = i * Vectorized<T>::size();
      (Vectorized<T>::loadu(to + o) + v[i]).store(to + o);
    }
  }
};

// One channel (the tail after the whole blocks).
template <typename T>
struct Accumulator<T, 1> {
  T v;
  void set(const T* from) { v = from ? *from : T(0); }
  void fma(const T* a, const T* b) { v += *a * *b; }
  void store(T* to) const { *to = v; }
  void add_to(T* to) const { *to += v; }
};

// Rows [lo, hi) of taps that stay inside a side of length `size` at position p (padding k/2).
struct TapRange {
  int64_t lo, hi;
};
inline TapRange taps_inside(int64_t p, int64_t size, int64_t k) {
  const int64_t pad = k / 2;
  return {std::max<int64_t>(0, pad - p), std::min<int64_t>(k, size + pad - p)};
}

// One output pixel, channels [0, N) of a block: bias + Σ over the in-bounds taps. origin is
// the element offset of the pixel's tap (0, 0), which may lie outside the map (it is only
// added to in-bounds tap offsets).
template <typename T, int64_t N>
inline void correlate_pixel(const T* x, int64_t origin, const T* taps, const T* bias, T* out,
                            int64_t C, int64_t W, int64_t kw, TapRange rows, TapRange cols) {
  Accumulator<T, N> acc;
  acc.set(bias);
  for (int64_t di = rows.lo; di < rows.hi; ++di)
    for (int64_t dj = cols.lo; dj < cols.hi; ++dj)
      acc.fma(taps + (di * kw + dj) * C, x + (origin + (di * W + dj) * C));
  acc.store(out);
}

// grad_taps[tap, 0:N] += Σ over row r of grad_out · x shifted by the tap. A row of grad_out
// and the kh rows of x it meets stay in cache across the taps; each tap's sum over the row
// is held in registers.
template <typename T, int64_t N>
inline void taps_grad_row(const T* gy, const T* x, T* grad_taps, int64_t r, int64_t H,
                          int64_t W, int64_t C, int64_t kh, int64_t kw) {
  const TapRange rows = taps_inside(r % H, H, kh);
  const T* g = gy + r * W * C;
  for (int64_t di = rows.lo; di < rows.hi; ++di) {
    for (int64_t dj = 0; dj < kw; ++dj) {
      Accumulator<T, N> acc;
      acc.set(nullptr);
      // Output columns whose tap (di, dj) lands inside the map.
      const int64_t j0 = std::max<int64_t>(0, kw / 2 - dj);
      const int64_t j1 = std::min<int64_t>(W, W + kw / 2 - dj);
      const int64_t shift = ((r + di - kh / 2) * W + (dj - kw / 2)) * C;
      for (int64_t j = j0; j < j1; ++j) acc.fma(g + j * C, x + (shift + j * C));
      acc.add_to(grad_taps + (di * kw + dj) * C);
    }
  }
}

template <typename T>
void correlate(const at::Tensor& x_t, const at::Tensor& taps_t, const at::Tensor& bias_t,
               at::Tensor& out_t) {
  const int64_t B = x_t.size(0), H = x_t.size(1), W = x_t.size(2), C = x_t.size(3);
  const int64_t kh = taps_t.size(0), kw = taps_t.size(1);
  const T* x = x_t.data_ptr<T>();
  const T* taps = taps_t.data_ptr<T>();
  const T* bias = bias_t.defined() ? bias_t.data_ptr<T>() : nullptr;
  T* out = out_t.data_ptr<T>();
  constexpr int64_t K = kChannelBlock<T>, V = kVector<T>;
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, W * C * kh * kw));
  at::parallel_for(0, B * H, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r % H;
      const TapRange rows = taps_inside(i, H, kh);
      for (int64_t j = 0; j < W; ++j) {
        const TapRange cols = taps_inside(j, W, kw);
        const int64_t origin = ((r - kh / 2) * W + (j - kw / 2)) * C;
        T* o = out + (r * W + j) * C;
        int64_t c = 0;
        for (; c + K <= C; c += K)
          correlate_pixel<T, K>(x, origin + c, taps + c, bias ? bias + c : nullptr, o + c, C, W,
                                kw, rows, cols);
        for (; c + V <= C; c += V)
          correlate_pixel<T, V>(x, origin + c, taps + c, bias ? bias + c : nullptr, o + c, C, W,
                                kw, rows, cols);
        for (; c < C; ++c)
          correlate_pixel<T, 1>(x, origin + c, taps + c, bias ? bias + c : nullptr, o + c, C, W,
                                kw, rows, cols);
      }
    }
  });
}

template <typename T>
void taps_grad(const at::Tensor& gy_t, const at::Tensor& x_t, at::Tensor& grad_taps_t) {
  const int64_t B = x_t.size(0), H = x_t.size(1), W = x_t.size(2), C = x_t.size(3);
  const int64_t kh = grad_taps_t.size(0), kw = grad_taps_t.size(1), taps = kh * kw;
  const T* gy = gy_t.data_ptr<T>();
  const T* x = x_t.data_ptr<T>();
  constexpr int64_t K = kChannelBlock<T>, V = kVector<T>;
  // Rows are split into a number of chunks that depends on the shape only (at most 32, each
  // at least kGrainMacs of work), each chunk sums into its own buffer, and the buffers are
  // added in chunk order: the same bits whatever the thread count.
  const int64_t rows = B * H;
  const int64_t work = rows * W * C * taps;
  const int64_t chunks = std::clamp<int64_t>(work / kGrainMacs, 1, std::min<int64_t>(rows, 32));
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  std::vector<T> partial(static_cast<size_t>(chunks * taps * C), T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      T* p = partial.data() + chunk * taps * C;
      const int64_t r1 = std::min(rows, (chunk + 1) * chunk_rows);
      for (int64_t r = chunk * chunk_rows; r < r1; ++r) {
        int64_t c = 0;
        for (; c + K <= C; c += K) taps_grad_row<T, K>(gy + c, x + c, p + c, r, H, W, C, kh, kw);
        for (; c + V <= C; c += V) taps_grad_row<T, V>(gy + c, x + c, p + c, r, H, W, C, kh, kw);
        for (; c < C; ++c) taps_grad_row<T, 1>(gy + c, x + c, p + c, r, H, W, C, kh, kw);
      }
    }
  });
  T* grad_taps = grad_taps_t.data_ptr<T>();  // zeroed by the caller
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const T* p = partial.data() + chunk * taps * C;
    for (int64_t t = 0; t < taps * C; ++t) grad_taps[t] += p[t];
  }
}

}  // namespace

void depthwise_correlate(const at::Tensor& x, const at::Tensor& taps, const at::Tensor& bias,
                         at::Tensor& out) {
  if (x.scalar_type() == at::kDouble) {
    correlate<double>(x, taps, bias, out);
  } else {
    correlate<float>(x, taps, bias, out);
  }
}

void depthwise_taps_grad(const at::Tensor& grad_out, const at::Tensor& x, at::Tensor& grad_taps) {
  if (x.scalar_type() == at::kDouble) {
    taps_grad<double>(grad_out, x, grad_taps);
  } else {
    taps_grad<float>(grad_out, x, grad_taps);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace ppma
