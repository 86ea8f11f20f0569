// Small row-major GEMMs on tiles held by one thread (called inside at::parallel_for, so the
// BLAS runs single-threaded). Uses the BLAS that libtorch_cpu exports (MKL on x86 wheels)
// when CMake found its symbols, else a plain loop the compiler vectorises.
#pragma once

#include <cstdint>

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

// Row-major C (m×n) = alpha·op(A)·op(B) + beta·C, op(X) = Xᵀ when trans_x.
// A is m×k (k×m stored when trans_a), B is k×n (n×k stored when trans_b).
template <typename T>
inline void tile_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                      const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                      int64_t ldc) {
  if (m == 0 || n == 0) return;
#if defined(PPMA_HAVE_BLAS)
  blas_gemm(trans_a ? "T" : "N", trans_b ? "T" : "N", static_cast<int>(m), static_cast<int>(n),
            static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
            c, static_cast<int>(ldc));
#else
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = beta == T(0) ? T(0) : beta * ci[j];
    for (int64_t p = 0; p < k; ++p) {
      const T aip = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
      if (trans_b) {
        for (int64_t j = 0; j < n; ++j) ci[j] += aip * b[j * ldb + p];
      } else {
        const T* bp = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) ci[j] += aip * bp[j];
      }
    }
  }
#endif
}

}  // namespace
}  // namespace ppma
