// Warp-level tensor-core helpers for sm80+: cp.async, ldmatrix, mma.sync.m16n8k16 (fp16/bf16 in,
// fp32 accumulate), and the fragment conversions the flash core needs.
//
// Fragment layouts of mma.m16n8k16 (lane = threadIdx.x % 32, g = lane / 4, t = lane % 4):
//   A (16x16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][8+2t..], a3 = A[g+8][8+2t..]
//   B (16x8, "col"):      b0 = B[2t..2t+1][g],  b1 = B[8+2t..8+2t+1][g]
//   C (16x8, fp32):       c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
//
// ATTNKIT_CUDA_EMU (tests/cuda_emu only, never set by the build): the PTX primitives (cp.async,
// ldmatrix, mma_m16n8k16) come from the CPU emulator (same names and semantics, executed on the
// emulated warp); everything built on them (MmaOp, warp_gemm, warp_gemm_rs, ...) is this file's code
// unchanged.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#ifdef ATTNKIT_CUDA_EMU
#include "emu_mma_prims.h"
#endif

namespace attnkit {

#ifndef ATTNKIT_CUDA_EMU
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous global->shared copy; copies zeros when !pred (gmem is then not read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// D = A B + D, A 16x16 (row), B 16x8 (col), fp32 accumulators; T is the 16-bit input type.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                     uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif  // !ATTNKIT_CUDA_EMU

template <typename T>
struct MmaOp;

template <>
struct MmaOp<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16<__half>(c, a, b0, b1);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct MmaOp<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16<__nv_bfloat16>(c, a, b0, b1);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// ---- Warp GEMM tiles on shared memory ----
// A shared-memory tile is `rows x cols` 16-bit elements with a row pitch of `ld` elements
// (pitch * 2 bytes a multiple of 16, chosen so that ldmatrix is free of bank conflicts).
//
// warp_gemm accumulates C[16 x 8*NT] += A[16 x K] * B[K x 8*NT] for one warp, with
//   A_ROWMAJOR: A(m, k) at a[m * lda + k]   else A(m, k) at a[k * lda + m] (A stored transposed)
//   B_NK:       B(k, n) at b[n * ldb + k]   else B(k, n) at b[k * ldb + n]
// `a` points at A(0, 0) of the warp's 16 rows, `b` at B(0, 0) of its 8*NT columns. K % 16 == 0, NT even.
template <typename T, int K, int NT, bool A_ROWMAJOR, bool B_NK>
__device__ __forceinline__ void warp_gemm(float (&acc)[NT][4], const T* a, int lda, const T* b, int ldb) {
  static_assert(K % 16 == 0 && NT % 2 == 0, "warp_gemm tile shape");
  const int lane = threadIdx.x & 31;
  const int mi = lane >> 3;  // which 8x8 matrix this lane addresses
  const int ri = lane & 7;   // row within it
#pragma unroll
  for (int kk = 0; kk < K; kk += 16) {
    uint32_t af[4];
    if constexpr (A_ROWMAJOR) {
      // matrices: (m0-7,k0-7) (m8-15,k0-7) (m0-7,k8-15) (m8-15,k8-15)
      ldmatrix_x4(af, a + (lane & 15) * lda + kk + (lane >> 4) * 8);
    } else {
      ldmatrix_x4_trans(af, a + (kk + ri + (mi >> 1) * 8) * lda + (mi & 1) * 8);
    }
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      if constexpr (B_NK) {
        // matrices: (n0-7,k0-7) (n0-7,k8-15) (n8-15,k0-7) (n8-15,k8-15)
        ldmatrix_x4(bf, b + (np * 16 + ri + (mi >> 1) * 8) * ldb + kk + (mi & 1) * 8);
      } else {
        // matrices: (k0-7,n0-7) (k8-15,n0-7) (k0-7,n8-15) (k8-15,n8-15), transposed on load
        ldmatrix_x4_trans(bf, b + (kk + ri + (mi & 1) * 8) * ldb + np * 16 + (mi >> 1) * 8);
      }
      MmaOp<T>::run(acc[2 * np], af, bf[0], bf[1]);
      MmaOp<T>::run(acc[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

// Same product with A taken from registers: the accumulator fragments of a previous 16 x K
// product (C layout), converted to T. This is how P = softmax(S) feeds P V without shared memory.
template <typename T, int K, int NT, bool B_NK>
__device__ __forceinline__ void warp_gemm_rs(float (&acc)[NT][4], const float (&a)[K / 8][4], const T* b, int ldb) {
  static_assert(K % 16 == 0 && NT % 2 == 0, "warp_gemm_rs tile shape");
  const int lane = threadIdx.x & 31;
  const int mi = lane >> 3;
  const int ri = lane & 7;
#pragma unroll
  for (int kk = 0; kk < K; kk += 16) {
    const int j = kk / 8;
    uint32_t af[4];
    af[0] = MmaOp<T>::pack(a[j][0], a[j][1]);
    af[1] = MmaOp<T>::pack(a[j][2], a[j][3]);
    af[2] = MmaOp<T>::pack(a[j + 1][0], a[j + 1][1]);
    af[3] = MmaOp<T>::pack(a[j + 1][2], a[j + 1][3]);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      if constexpr (B_NK) {
        ldmatrix_x4(bf, b + (np * 16 + ri + (mi >> 1) * 8) * ldb + kk + (mi & 1) * 8);
      } else {
        ldmatrix_x4_trans(bf, b + (kk + ri + (mi & 1) * 8) * ldb + np * 16 + (mi >> 1) * 8);
      }
      MmaOp<T>::run(acc[2 * np], af, bf[0], bf[1]);
      MmaOp<T>::run(acc[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

template <int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }
}

}  // namespace attnkit
