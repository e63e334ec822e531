// Row-major block products for the CPU kernels: C[M x N] = A[M x K] B[K x N] (+ C when add), with
// leading dimensions in elements.
// - float: ATen's batch-reduce GEMM entry (at::native::cpublas::brgemm), which runs oneDNN's
//   micro-kernel where the CPU has one and the BLAS torch was built with (MKL, OpenBLAS) otherwise.
//   Deterministic: the same shapes give the same bits, whatever thread calls it.
// - double (the fp64 test path) and float with use_blas == false: plain loops in i-k-j order, which
//   the compiler vectorises along the contiguous rows of B and C.
#pragma once
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>

namespace attnkit::cpu {

template <typename A>
inline void gemm_loops(int64_t M, int64_t N, int64_t K, const A* __restrict a, int64_t lda, const A* __restrict b,
                       int64_t ldb, A* __restrict c, int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; ++i) {
    A* crow = c + i * ldc;
    if (!add) std::fill(crow, crow + N, A(0));
    const A* arow = a + i * lda;
    for (int64_t kk = 0; kk < K; ++kk) {
      const A x = arow[kk];
      const A* brow = b + kk * ldb;
      for (int64_t j = 0; j < N; ++j) crow[j] += x * brow[j];
    }
  }
}

inline void gemm_nn(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* c, int64_t ldc, bool add, bool use_blas = true) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0 || !use_blas) return gemm_loops(M, N, K, a, lda, b, ldb, c, ldc, add);
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, a, b, c, /*is_vnni=*/false);
}

inline void gemm_nn(int64_t M, int64_t N, int64_t K, const double* a, int64_t lda, const double* b, int64_t ldb,
                    double* c, int64_t ldc, bool add, bool /*use_blas*/ = true) {
  if (M <= 0 || N <= 0) return;
  gemm_loops(M, N, K, a, lda, b, ldb, c, ldc, add);
}

}  // namespace attnkit::cpu
