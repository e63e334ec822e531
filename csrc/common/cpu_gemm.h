// Row-major block products for the CPU kernels: C[M x N] = op(A) op(B) (+ C when add), op(X) = X or
// X^T, leading dimensions in elements (the row stride of the matrix as stored: A is stored M x K, or
// K x M when transposed; B is stored K x N, or N x K when transposed).
// - float: the Fortran sgemm_ of the BLAS linked into libtorch (MKL on x86-64 wheels) when libtorch
//   exports it; else ATen's block GEMM (at::native::cpublas::brgemm: oneDNN's micro-kernel or
//   torch's BLAS), transposed operands copied first. Deterministic: the same shapes give the same
//   bits whichever thread calls it.
// - double (the fp64 test path), and float with use_blas == false: plain loops.
#pragma once
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <vector>

// Weak: resolved from libtorch when it exports the symbol, null otherwise.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

// MKL's per-thread thread count (returns the previous one; 0 = the global setting), when libtorch
// exports it. Weak as well.
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));

namespace attnkit::cpu {

// While alive, BLAS calls from this thread run on this thread only: the kernels already split their
// work over the intra-op threads, and a BLAS that threads each small product as well oversubscribes
// the cores (its workers spin while waiting).
class SingleThreadBlas {
 public:
  SingleThreadBlas() : active_(MKL_Set_Num_Threads_Local != nullptr) {
    if (active_) prev_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadBlas() {
    if (active_) MKL_Set_Num_Threads_Local(prev_);
  }
  SingleThreadBlas(const SingleThreadBlas&) = delete;
  SingleThreadBlas& operator=(const SingleThreadBlas&) = delete;

 private:
  bool active_;
  int prev_ = 0;
};

template <typename X>
inline void gemm_loops(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const X* a, int64_t lda, const X* b,
                       int64_t ldb, X* __restrict c, int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; ++i) {
    X* crow = c + i * ldc;
    if (!add) std::fill(crow, crow + N, X(0));
    if (!tb) {  // i-k-j: contiguous rows of B and C
      for (int64_t kk = 0; kk < K; ++kk) {
        const X x = ta ? a[kk * lda + i] : a[i * lda + kk];
        const X* brow = b + kk * ldb;
        for (int64_t j = 0; j < N; ++j) crow[j] += x * brow[j];
      }
    } else {  // dot products along the rows of B
      for (int64_t j = 0; j < N; ++j) {
        const X* brow = b + j * ldb;
        X acc = X(0);
        for (int64_t kk = 0; kk < K; ++kk) acc += (ta ? a[kk * lda + i] : a[i * lda + kk]) * brow[kk];
        crow[j] += acc;
      }
    }
  }
}

// dst[c][r] = src[r][c] for a rows x cols matrix, dst row stride rows.
inline void transpose_copy(float* dst, const float* src, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * ld + c];
}

inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool add, bool use_blas = true) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0 || !use_blas) return gemm_loops(ta, tb, M, N, K, a, lda, b, ldb, c, ldc, add);
  if (sgemm_ != nullptr) {  // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T
    const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
    const float one = 1.f, beta = add ? 1.f : 0.f;
    sgemm_(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &one, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  thread_local std::vector<float> at_buf, bt_buf;
  if (ta) {
    at_buf.resize(size_t(M) * K);
    transpose_copy(at_buf.data(), a, lda, K, M);
    a = at_buf.data();
    lda = K;
  }
  if (tb) {
    bt_buf.resize(size_t(K) * N);
    transpose_copy(bt_buf.data(), b, ldb, N, K);
    b = bt_buf.data();
    ldb = N;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, a, b, c, /*is_vnni=*/false);
}

inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const double* a, int64_t lda, const double* b,
                 int64_t ldb, double* c, int64_t ldc, bool add, bool /*use_blas*/ = true) {
  if (M <= 0 || N <= 0) return;
  gemm_loops(ta, tb, M, N, K, a, lda, b, ldb, c, ldc, add);
}

// C = A B, no transposes.
template <typename X>
inline void gemm_nn(int64_t M, int64_t N, int64_t K, const X* a, int64_t lda, const X* b, int64_t ldb, X* c,
                    int64_t ldc, bool add, bool use_blas = true) {
  gemm(false, false, M, N, K, a, lda, b, ldb, c, ldc, add, use_blas);
}

}  // namespace attnkit::cpu
