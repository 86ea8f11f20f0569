// Small row-major GEMMs on tiles held by one thread (called inside at::parallel_for, so they
// run single-threaded). Two paths: a register-blocked kernel written with ATen's Vectorized
// (compiled per instruction set) for the small tiles of the line and block attention kernels,
// where a BLAS call costs more in argument checks and operand packing than in arithmetic; and
// the BLAS that libtorch_cpu exports (MKL on x86 wheels), when CMake found its symbols, for
// larger products.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifndef PPMA_SMALL_GEMM_MAX_WORK
#define PPMA_SMALL_GEMM_MAX_WORK 131072
#endif

#if defined(PPMA_HAVE_BLAS)
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}
#endif

// Internal linkage: this header is compiled into every per-ISA kernel object; with external
// linkage the linker could keep an AVX-512 copy for callers on CPUs without it.
namespace ppma {
namespace {

#if defined(PPMA_HAVE_BLAS)
// Column-major BLAS on row-major data: C (m×n) row-major is Cᵀ column-major, so compute
// Cᵀ = op(B)ᵀ·op(A)ᵀ with the operands swapped.
inline void blas_gemm(const char* ta, const char* tb, int m, int n, int k, float alpha,
                      const float* a, int lda, const float* b, int ldb, float beta, float* c,
                      int ldc) {
  sgemm_(tb, ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}
inline void blas_gemm(const char* ta, const char* tb, int m, int n, int k, double alpha,
                      const double* a, int lda, const double* b, int ldb, double beta, double* c,
                      int ldc) {
  dgemm_(tb, ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}
#endif

// Rows [0, MR) of C = alpha·A·B + beta·C over columns [j, j + NV·L) (count: valid columns of
// the last vector, < L for a ragged edge). A(i, p) = a[i·a_rs + p·a_cs], so one kernel serves A
// and Aᵀ; B is row-major (k × n, leading dimension ldb). beta == 0 never reads C.
template <typename T, int MR, int NV>
inline void gemm_block(int64_t k, T alpha, const T* a, int64_t a_rs, int64_t a_cs, const T* b,
                       int64_t ldb, T beta, T* c, int64_t ldc, int64_t j, int64_t count) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t L = Vec::size();
  Vec acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec(T(0));
  const bool ragged = count < L;
  for (int64_t p = 0; p < k; ++p) {
    const T* bp = b + p * ldb + j;
    Vec bv[NV];
    for (int v = 0; v < NV; ++v) {
      bv[v] = (ragged && v == NV - 1) ? Vec::loadu(bp + v * L, count) : Vec::loadu(bp + v * L);
    }
    for (int r = 0; r < MR; ++r) {
      const Vec ar(a[r * a_rs + p * a_cs]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, bv[v], acc[r][v]);
    }
  }
  const Vec va(alpha), vb(beta);
  for (int r = 0; r < MR; ++r) {
    T* cr = c + r * ldc + j;
    for (int v = 0; v < NV; ++v) {
      const int64_t n_valid = (ragged && v == NV - 1) ? count : L;
      Vec out = acc[r][v] * va;
      if (beta != T(0)) out = at::vec::fmadd(vb, Vec::loadu(cr + v * L, n_valid), out);
      if (n_valid == L) {
        out.store(cr + v * L);
      } else {
        out.store(cr + v * L, n_valid);
      }
    }
  }
}

// Rows [i0, m) of C over the column block [j, j + NV·L), MR rows at a time.
template <typename T, int MR, int NV>
inline void gemm_column_block(int64_t m, int64_t k, T alpha, const T* a, int64_t a_rs,
                              int64_t a_cs, const T* b, int64_t ldb, T beta, T* c, int64_t ldc,
                              int64_t j, int64_t count) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) {
    gemm_block<T, MR, NV>(k, alpha, a + i * a_rs, a_rs, a_cs, b, ldb, beta, c + i * ldc, ldc, j,
                          count);
  }
  // Ragged rows: the largest power-of-two blocks first (at most log2(MR) calls).
  const T* ai = a + i * a_rs;
  T* ci = c + i * ldc;
  int64_t left = m - i;
  const auto rows = [&](auto block) {
    constexpr int R = decltype(block)::value;
    if constexpr (R < MR) {
      if (left >= R) {
        gemm_block<T, R, NV>(k, alpha, ai, a_rs, a_cs, b, ldb, beta, ci, ldc, j, count);
        ai += R * a_rs;
        ci += R * ldc;
        left -= R;
      }
    }
  };
  rows(std::integral_constant<int, 8>{});
  rows(std::integral_constant<int, 4>{});
  rows(std::integral_constant<int, 2>{});
  rows(std::integral_constant<int, 1>{});
}

// dst (cols × rows, row-major) = src (rows × cols, leading dimension ld)ᵀ, in square blocks of
// one vector's width (ATen's shuffle transposes: 8×8 for AVX2 floats, 16×16 for AVX-512
// floats, where 8×8 blocks would each run the 16×16 kernel with masked loads and stores) with
// scalar edges.
template <typename T>
inline void transpose_into(const T* src, int64_t ld, int64_t rows, int64_t cols, T* dst) {
  constexpr int64_t B = at::vec::Vectorized<T>::size() >= 16 ? 16 : 8;
  const int64_t rb = rows - rows % B, cb = cols - cols % B;
  for (int64_t r = 0; r < rb; r += B)
    for (int64_t c = 0; c < cb; c += B)
      at::vec::transpose_mxn<T, B, B>(src + r * ld + c, ld, dst + c * rows + r, rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c0 = r < rb ? cb : 0;  // full-block rows only miss the ragged columns
    for (int64_t c = c0; c < cols; ++c) dst[c * rows + r] = src[r * ld + c];
  }
}

// Register-blocked C (m×n) = alpha·op(A)·op(B) + beta·C for small tiles; same contract as
// tile_gemm. Column blocks of two vectors take 6 rows at a time (12 accumulators), one block
// of three vectors (when the count of full vectors is odd) 4 rows, a last single (possibly
// ragged) vector 12 rows: each keeps enough independent FMAs in flight and fits 16 AVX2
// registers. (Measured on Zen: 56×56×16 at 71 GF/s per core against 55 with 2-vector blocks
// and a single-vector tail.) op(B) = Bᵀ is first packed into a per-thread k×n buffer so that every
// kernel streams contiguous rows of B.
template <typename T>
inline void small_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                       const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                       int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (trans_b) {
    thread_local std::vector<T> packed;
    if (static_cast<int64_t>(packed.size()) < k * n) packed.resize(k * n);
    transpose_into(b, ldb, n, k, packed.data());
    b = packed.data();
    ldb = n;
  }
  const int64_t a_rs = trans_a ? 1 : lda, a_cs = trans_a ? lda : 1;
  constexpr int64_t L = at::vec::Vectorized<T>::size();
  int64_t j = 0;
  if ((n / L) % 2 == 1 && n >= 3 * L) {  // an odd count of full vectors: one 3-wide block
    gemm_column_block<T, 4, 3>(m, k, alpha, a, a_rs, a_cs, b, ldb, beta, c, ldc, j, L);
    j += 3 * L;
  }
  for (; j + 2 * L <= n; j += 2 * L) {
    gemm_column_block<T, 6, 2>(m, k, alpha, a, a_rs, a_cs, b, ldb, beta, c, ldc, j, L);
  }
  for (; j < n; j += L) {
    gemm_column_block<T, 12, 1>(m, k, alpha, a, a_rs, a_cs, b, ldb, beta, c, ldc, j,
                                std::min(L, n - j));
  }
}

// Products up to this many multiply-adds take the register-blocked path even when a BLAS is
// linked. (The line tiles of criss-cross attention, 56×56×16, are ~50k.)
inline constexpr int64_t kSmallGemmMaxWork = PPMA_SMALL_GEMM_MAX_WORK;

// Row-major C (m×n) = alpha·op(A)·op(B) + beta·C, op(X) = Xᵀ when trans_x.
// A is m×k (k×m stored when trans_a), B is k×n (n×k stored when trans_b).
template <typename T>
inline void tile_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                      const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                      int64_t ldc) {
  if (m == 0 || n == 0) return;
#if defined(PPMA_HAVE_BLAS)
  if (m * n * k > kSmallGemmMaxWork) {
    blas_gemm(trans_a ? "T" : "N", trans_b ? "T" : "N", static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b,
              static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
    return;
  }
#endif
  small_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace
}  // namespace ppma
