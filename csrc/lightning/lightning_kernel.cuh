// Lightning attention CUDA kernels: the chunk pass (lightning_params.h), the segment scan, the d slopes
// reduction and the decode step. Included by the per-instantiation .cu files and by lightning_launch.cu.
//
// Tensor cores: 16-bit inputs use mma.sync.m16n8k16 (fp32 accumulators) fed by ldmatrix from shared
// memory; fp32 inputs run the same code with a plain-FMA "mma" over the same fragment layout.
// The host launch code sits at the end. The CPU emulator (tests/cuda_emu) compiles this file as host
// C++ through the hooks of common/ (mma.cuh, launch.cuh) and its stand-in CUDA headers.
//
// Pass kernel, one thread block per (sequence*head, o' column slab of bv, segment), BT/16 warps:
//   per chunk of BT rows: load q' (BT x dk), k' (BT x dk), v' (BT x bv) into shared memory;
//     warp w owns chunk rows [16w, 16w+16):
//       scores  A = q' k'^T (only the 16-column tiles at or left of the diagonal), masked with
//               out_scale * lambda^(i-j) for j <= i, written to shared memory as 16-bit;
//       inter   O = q' S (S: fp32 state in shared memory, rounded to 16-bit for the MMA),
//               rows scaled by out_scale * lambda^(i+1);
//       intra   O += A v';  stored to global memory;
//     state update S = lambda^n S + k'^T (lambda^(n-1-j) v'_j), warps split S by 16-row tiles.
//   Derivative mode adds T (dS/dlambda) and the dot with dout (see lightning_params.h).
#pragma once

#include <cstdint>
#include <type_traits>

#include "lightning/lightning_params.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/launch.cuh"
#include "common/mma.cuh"

#define LT_DEV __device__ __forceinline__

namespace attnkit::lightning::kern {

constexpr int kMaxBv = 64;  // o' columns per block at most (8 MMA n-tiles)
// Derivative-mode weights (i - j) lambda^(i-j-1) reach 63x the values they weight; they enter the
// 16-bit MMA operands divided by 64 (exact) and the fp32 products are multiplied back.
constexpr float kDerivDown = 1.f / 64.f, kDerivUp = 64.f;

// ------------------------------------------------------------------------------------------------
// Element conversion
// ------------------------------------------------------------------------------------------------

template <typename T>
LT_DEV float to_f(T x);
template <>
LT_DEV float to_f<float>(float x) {
  return x;
}
template <>
LT_DEV float to_f<__half>(__half x) {
  return __half2float(x);
}
template <>
LT_DEV float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
LT_DEV T from_f(float x);
template <>
LT_DEV float from_f<float>(float x) {
  return x;
}
template <>
LT_DEV __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
LT_DEV __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two values as one 32-bit register of 16-bit elements, `lo` in the low half.
template <typename T>
LT_DEV uint32_t pack2(float lo, float hi);
template <>
LT_DEV uint32_t pack2<__half>(float lo, float hi) {
  return uint32_t(__half_as_ushort(__float2half_rn(lo))) | (uint32_t(__half_as_ushort(__float2half_rn(hi))) << 16);
}
template <>
LT_DEV uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// ------------------------------------------------------------------------------------------------
// Warp-level helpers (ldmatrix / mma.sync: common/mma.cuh)
// ------------------------------------------------------------------------------------------------

LT_DEV int lane_id() { return int(threadIdx.x) & 31; }

// ldmatrix and mma.sync come from common/mma.cuh (ldmatrix_x4, ldmatrix_x4_trans, MmaOp<T>::run).
LT_DEV float warp_sum(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}
LT_DEV float warp_max(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}
LT_DEV void copy16(void* dst, const void* src) { *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src); }
LT_DEV void zero16(void* dst) { *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0); }

// ------------------------------------------------------------------------------------------------
// MMA operands from shared memory. Accumulators use mma.m16n8k16's C layout for every element type:
// with g = lane / 4, t = lane % 4, c[0], c[1] are (row g, cols 2t, 2t+1) and c[2], c[3] (row g + 8,
// same cols) of a 16x8 tile.
// ------------------------------------------------------------------------------------------------

template <typename T>
struct Mma {  // 16-bit: ldmatrix + mma.sync
  struct FA {
    uint32_t r[4];
  };
  struct FB {
    uint32_t r[2];
  };
  // A[m][k] = s[m * ld + k], rows m0.., cols k0..
  static LT_DEV void ld_a(FA& f, const T* s, int ld, int m0, int k0) {
    const int l = lane_id(), mi = l >> 3, r = l & 7;
    ::attnkit::ldmatrix_x4(f.r, s + (m0 + r + (mi & 1) * 8) * ld + k0 + (mi >> 1) * 8);
  }
  // A[m][k] = s[k * ld + m]
  static LT_DEV void ld_a_t(FA& f, const T* s, int ld, int m0, int k0) {
    const int l = lane_id(), mi = l >> 3, r = l & 7;
    ::attnkit::ldmatrix_x4_trans(f.r, s + (k0 + r + (mi >> 1) * 8) * ld + m0 + (mi & 1) * 8);
  }
  // Two n-tiles (n0, n0 + 8) of B[k][n] = s[n * ld + k].
  static LT_DEV void ld_b2_n(FB (&f)[2], const T* s, int ld, int n0, int k0) {
    const int l = lane_id(), mi = l >> 3, r = l & 7;
    uint32_t x[4];
    ::attnkit::ldmatrix_x4(x, s + (n0 + r + (mi >> 1) * 8) * ld + k0 + (mi & 1) * 8);
    f[0].r[0] = x[0];
    f[0].r[1] = x[1];
    f[1].r[0] = x[2];
    f[1].r[1] = x[3];
  }
  // Two n-tiles (n0, n0 + 8) of B[k][n] = s[k * ld + n].
  static LT_DEV void ld_b2_k(FB (&f)[2], const T* s, int ld, int k0, int n0) {
    const int l = lane_id(), mi = l >> 3, r = l & 7;
    uint32_t x[4];
    ::attnkit::ldmatrix_x4_trans(x, s + (k0 + r + (mi & 1) * 8) * ld + n0 + (mi >> 1) * 8);
    f[0].r[0] = x[0];
    f[0].r[1] = x[1];
    f[1].r[0] = x[2];
    f[1].r[1] = x[3];
  }
  // One n-tile of B[k][n] = sc * s[k * ld + n] from fp32 shared memory, rounded to T.
  static LT_DEV void ld_b_f32(FB& f, const float* s, int ld, int k0, int n0, float sc) {
    const int l = lane_id(), g = l >> 2, t = l & 3;
    const float* p = s + (k0 + 2 * t) * ld + n0 + g;
    f.r[0] = pack2<T>(sc * p[0], sc * p[ld]);
    f.r[1] = pack2<T>(sc * p[8 * ld], sc * p[9 * ld]);
  }
  static LT_DEV void mma(float (&c)[4], const FA& a, const FB& b) {
    ::attnkit::MmaOp<T>::run(c, a.r, b.r[0], b.r[1]);
  }
};

template <>
struct Mma<float> {  // fp32: the operands stay in shared memory, the "mma" is 64 FMAs per thread
  struct FA {
    const float* p;  // A(m0 + g, k0)
    int ms, ks;
  };
  struct FB {
    const float* p;  // B(k0, n0 + 2t)
    int ns, ks;
  };
  static LT_DEV void ld_a(FA& f, const float* s, int ld, int m0, int k0) {
    f = {s + (m0 + (lane_id() >> 2)) * ld + k0, ld, 1};
  }
  static LT_DEV void ld_a_t(FA& f, const float* s, int ld, int m0, int k0) {
    f = {s + k0 * ld + m0 + (lane_id() >> 2), 1, ld};
  }
  static LT_DEV void ld_b2_n(FB (&f)[2], const float* s, int ld, int n0, int k0) {
    const int t = lane_id() & 3;
    f[0] = {s + (n0 + 2 * t) * ld + k0, ld, 1};
    f[1] = {s + (n0 + 8 + 2 * t) * ld + k0, ld, 1};
  }
  static LT_DEV void ld_b2_k(FB (&f)[2], const float* s, int ld, int k0, int n0) {
    const int t = lane_id() & 3;
    f[0] = {s + k0 * ld + n0 + 2 * t, 1, ld};
    f[1] = {s + k0 * ld + n0 + 8 + 2 * t, 1, ld};
  }
  static LT_DEV void ld_b_f32(FB& f, const float* s, int ld, int k0, int n0, float) {
    f = {s + k0 * ld + n0 + 2 * (lane_id() & 3), 1, ld};
  }
  static LT_DEV void mma(float (&c)[4], const FA& a, const FB& b) {
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const float a0 = a.p[k * a.ks], a1 = a.p[8 * a.ms + k * a.ks];
      const float b0 = b.p[k * b.ks], b1 = b.p[b.ns + k * b.ks];
      c[0] += a0 * b0;
      c[1] += a0 * b1;
      c[2] += a1 * b0;
      c[3] += a1 * b1;
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Shared memory layout of the pass kernel (shared by the kernel and the host planner)
// ------------------------------------------------------------------------------------------------

struct SmemLayout {
  int dkp;            // dk rounded up to 16 (zero-padded columns)
  int ldq, ldv, ldp;  // row strides (elements) of q'/k', v', scores; rows are 16-byte multiples
  int lds;            // row stride (floats) of the fp32 states
  size_t off_q, off_k, off_v, off_vd, off_p, off_s, off_t, off_vd2, off_pd, off_pow, off_red, total;
};

LT_HOST_DEVICE inline SmemLayout pass_smem_layout(int elem_size, int BT, int dk, int bv, bool deriv) {
  SmemLayout L;
  const int pad = 16 / elem_size;
  L.dkp = (dk + 15) / 16 * 16;
  L.ldq = L.dkp + pad;
  L.ldv = bv + pad;
  L.ldp = BT + pad;
  L.lds = bv + 4;
  size_t o = 0;
  auto take = [&](size_t bytes) {
    const size_t at = o;
    o += (bytes + 15) / 16 * 16;
    return at;
  };
  L.off_q = take(size_t(BT) * L.ldq * elem_size);
  L.off_k = take(size_t(BT) * L.ldq * elem_size);
  L.off_v = take(size_t(BT) * L.ldv * elem_size);
  L.off_vd = take(size_t(BT) * L.ldv * elem_size);
  L.off_p = take(size_t(BT) * L.ldp * elem_size);
  L.off_s = take(size_t(L.dkp) * L.lds * 4);
  L.off_t = deriv ? take(size_t(L.dkp) * L.lds * 4) : 0;
  L.off_vd2 = deriv ? take(size_t(BT) * L.ldv * elem_size) : 0;
  L.off_pd = deriv ? take(size_t(BT) * L.ldp * elem_size) : 0;
  L.off_pow = take(size_t(BT + 2) * 4);
  L.off_red = take(32 * 4);
  L.total = o;
  return L;
}

// ------------------------------------------------------------------------------------------------
// Pass kernel
// ------------------------------------------------------------------------------------------------

struct Bounds {
  int64_t b, start, len;
};

LT_DEV Bounds seq_bounds(const PassParams& p, int n) {
  if (p.cu_seqlens == nullptr) return {n, 0, p.seqlen};
  // Offsets are not validated on the host for CUDA tensors: clamp them into [0, seqlen].
  int64_t s = p.cu_seqlens[n], e = p.cu_seqlens[n + 1];
  s = s < 0 ? 0 : (s > p.seqlen ? p.seqlen : s);
  e = e < s ? s : (e > p.seqlen ? p.seqlen : e);
  return {0, s, e - s};
}

template <typename T>
LT_DEV bool vec_ok(const SeqTensor& t) {
  constexpr int epv = 16 / int(sizeof(T));
  return (reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0) && t.batch_stride % epv == 0 && t.row_stride % epv == 0 &&
         t.head_stride % epv == 0;
}

// Rows tau = t0 .. t0 + BT - 1 of a sequence into s[BT][ld]: columns [col0, col0 + ncols) of the
// tensor, times `scale`, zero beyond ncols (up to ncols_pad) and for rows i >= nr.
template <typename T, int BT, int NT>
LT_DEV void load_rows(T* s, int ld, int ncols_pad, const SeqTensor& t, const Bounds& sb, int h, bool reverse,
                      int64_t t0, int nr, int col0, int ncols, float scale, bool vec) {
  constexpr int epv = 16 / int(sizeof(T));
  const int cpr = ncols_pad / epv;
  for (int idx = int(threadIdx.x); idx < BT * cpr; idx += NT) {
    const int i = idx / cpr, c = (idx - i * cpr) * epv;
    T* dst = s + i * ld + c;
    if (i < nr && c < ncols) {
      const int64_t tau = t0 + i;
      const int64_t row = sb.start + (reverse ? sb.len - 1 - tau : tau);
      const T* src = static_cast<const T*>(t.ptr) + sb.b * t.batch_stride + row * t.row_stride +
                     int64_t(h) * t.head_stride + col0 + c;
      if (vec && scale == 1.f && c + epv <= ncols) {
        copy16(dst, src);
      } else {
#pragma unroll
        for (int e = 0; e < epv; ++e) dst[e] = from_f<T>(c + e < ncols ? scale * to_f<T>(src[e]) : 0.f);
      }
    } else {
      zero16(dst);
    }
  }
}

LT_DEV float& state_at(const StateTensor& s, int n, int h, int r, int c) {
  return static_cast<float*>(s.ptr)[n * s.n_stride + h * s.h_stride + r * s.r_stride + c * s.c_stride];
}

// fp16 keeps the fp32 states' range only up to 65504: before a state is rounded to fp16 for the
// q'.S product it is scaled by a power of two that brings its largest magnitude to <= 2^13 (the
// product is scaled back in fp32). bf16 and fp32 need no scaling.
template <typename T>
LT_DEV float state_scale(float max_abs) {
  if constexpr (std::is_same_v<T, __half>) {
    if (max_abs > 8192.f) return exp2f(-ceilf(log2f(max_abs * (1.f / 8192.f))));
  }
  return 1.f;
}

// phase 0: state-only (each non-last segment's local state from zero into seg_state);
// phase 1: main (outputs, final state, d lambda partials). kDeriv must equal p.deriv (a template
// argument so that the other passes carry no derivative registers).
template <typename T, int BT, bool kDeriv>
__global__ void __launch_bounds__(BT / 16 * 32) pass_kernel(const PassParams p, const int phase) {
  using M = Mma<T>;
  constexpr int NW = BT / 16, NT = NW * 32, MAXNT = kMaxBv / 8;
  constexpr bool deriv = kDeriv;
  const bool state_only = phase == 0;
  const int nh = int(blockIdx.x), slab = int(blockIdx.y), seg = int(blockIdx.z);
  const int n = nh / p.num_heads, h = nh - n * p.num_heads;
  const Bounds sb = seq_bounds(p, n);
  const SegmentPlan sp = lightning_segments(sb.len, BT, p.num_segments);
  if (seg >= sp.nseg) return;
  if (state_only && seg == sp.nseg - 1) return;

  const SmemLayout L = pass_smem_layout(int(sizeof(T)), BT, p.dk, p.bv, deriv);
  const int dk = p.dk, dkp = L.dkp;
  const int e0 = slab * p.bv;
  const int bvv = p.dv - e0 < p.bv ? p.dv - e0 : p.bv;  // valid o' columns of this slab
  const int bvp = (bvv + 15) / 16 * 16;
  const int nnt = bvp / 8;
  ATTNKIT_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem + L.off_q);
  T* sK = reinterpret_cast<T*>(smem + L.off_k);
  T* sV = reinterpret_cast<T*>(smem + L.off_v);
  T* sVd = reinterpret_cast<T*>(smem + L.off_vd);
  T* sP = reinterpret_cast<T*>(smem + L.off_p);
  float* sS = reinterpret_cast<float*>(smem + L.off_s);
  float* sT = reinterpret_cast<float*>(smem + L.off_t);
  T* sVd2 = reinterpret_cast<T*>(smem + L.off_vd2);
  T* sPd = reinterpret_cast<T*>(smem + L.off_pd);
  float* sPow = reinterpret_cast<float*>(smem + L.off_pow);
  float* sRed = reinterpret_cast<float*>(smem + L.off_red);  // 32 floats: state maxima, then d lambda

  const int tid = int(threadIdx.x), warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const float slope = static_cast<const float*>(p.slopes)[h];
  for (int m = tid; m < BT + 2; m += NT) sPow[m] = expf(-slope * float(m));  // lambda^m

  // Entering state of this segment (slab columns e0 .. e0 + bvv).
  const size_t ws_stride = size_t(dk) * p.dv;
  const size_t ws_base = (size_t(n) * p.num_heads + h) * p.num_segments;
  float max_s = 0.f, max_t = 0.f;  // largest |S|, |T| this thread holds (fp16 state scaling)
  for (int idx = tid; idx < dkp * bvp; idx += NT) {
    const int d = idx / bvp, e = idx - d * bvp;
    float s = 0.f, tv = 0.f;
    if (!state_only && d < dk && e < bvv) {
      if (seg == 0) {
        if (p.init.ptr) s = state_at(p.init, n, h, d, e0 + e);
      } else {
        const size_t at = (ws_base + seg - 1) * ws_stride + size_t(d) * p.dv + e0 + e;
        s = static_cast<const float*>(p.seg_state)[at];
        if (deriv) tv = static_cast<const float*>(p.seg_tstate)[at];
      }
    }
    sS[d * L.lds + e] = s;
    if (deriv) sT[d * L.lds + e] = tv;
    max_s = fmaxf(max_s, fabsf(s));
    max_t = fmaxf(max_t, fabsf(tv));
  }
  // sRed[0 .. NW) and sRed[NW .. 2 NW): per-warp maxima of |S| and |T| (read after a barrier).
  max_s = warp_max(max_s);
  max_t = warp_max(max_t);
  if (lane == 0) {
    sRed[warp] = max_s;
    sRed[NW + warp] = max_t;
  }
  int pshift = (!state_only && seg == 0 && p.init.ptr) ? p.init_shift : 0;
  __syncthreads();

  const float out_scale = float(p.out_scale), v_scale = float(p.v_scale);
  const bool vq = vec_ok<T>(p.q), vk = vec_ok<T>(p.k), vv = vec_ok<T>(p.v);
  float dl = 0.f;  // this thread's share of d lambda
  const int64_t c_begin = int64_t(seg) * sp.chunks_per_seg;
  const int64_t c_end = c_begin + sp.chunks_per_seg < sp.nchunks ? c_begin + sp.chunks_per_seg : sp.nchunks;
  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t t0 = c * BT;
    const int nr = int(sb.len - t0 < BT ? sb.len - t0 : BT);
    if (!state_only) load_rows<T, BT, NT>(sQ, L.ldq, dkp, p.q, sb, h, p.reverse, t0, nr, 0, dk, 1.f, vq);
    load_rows<T, BT, NT>(sK, L.ldq, dkp, p.k, sb, h, p.reverse, t0, nr, 0, dk, 1.f, vk);
    load_rows<T, BT, NT>(sV, L.ldv, bvp, p.v, sb, h, p.reverse, t0, nr, e0, bvv, v_scale, vv);
    __syncthreads();

    if (!state_only) {
      const int r0 = warp * 16;
      float acc_s[BT / 8][4], acc_o[MAXNT][4], acc_y[MAXNT][4];
#pragma unroll
      for (int x = 0; x < BT / 8; ++x) acc_s[x][0] = acc_s[x][1] = acc_s[x][2] = acc_s[x][3] = 0.f;
#pragma unroll
      for (int x = 0; x < MAXNT; ++x) {
        acc_o[x][0] = acc_o[x][1] = acc_o[x][2] = acc_o[x][3] = 0.f;
        acc_y[x][0] = acc_y[x][1] = acc_y[x][2] = acc_y[x][3] = 0.f;
      }
      float sc_s = 1.f, sc_t = 1.f;
      if constexpr (std::is_same_v<T, __half>) {
        float ms = 0.f, mt = 0.f;
        for (int w = 0; w < NW; ++w) {
          ms = fmaxf(ms, sRed[w]);
          mt = fmaxf(mt, sRed[NW + w]);
        }
        sc_s = state_scale<T>(ms);
        sc_t = state_scale<T>(mt);
      }
      // Scores q' k'^T (tiles at or left of the diagonal) and the inter products q' S (and q' T).
      for (int kk = 0; kk < dkp / 16; ++kk) {
        typename M::FA a;
        M::ld_a(a, sQ, L.ldq, r0, kk * 16);
#pragma unroll
        for (int np = 0; np < BT / 16; ++np) {
          if (np <= warp) {
            typename M::FB b[2];
            M::ld_b2_n(b, sK, L.ldq, np * 16, kk * 16);
            M::mma(acc_s[2 * np], a, b[0]);
            M::mma(acc_s[2 * np + 1], a, b[1]);
          }
        }
#pragma unroll
        for (int nt = 0; nt < MAXNT; ++nt) {
          if (nt < nnt) {
            typename M::FB b;
            M::ld_b_f32(b, sS, L.lds, kk * 16, nt * 8, sc_s);
            M::mma(acc_o[nt], a, b);
            if (deriv) {
              M::ld_b_f32(b, sT, L.lds, kk * 16, nt * 8, sc_t);
              M::mma(acc_y[nt], a, b);
            }
          }
        }
      }
      // Decay mask: P_ij = out_scale lambda^(i-j) s_ij (j <= i), and for T the derivative weights
      // out_scale (i-j) lambda^(i-j-1) (j < i). Rows i >= nr are zero.
#pragma unroll
      for (int nt = 0; nt < BT / 8; ++nt) {
        if (nt / 2 <= warp) {
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const int i = r0 + g + (x >> 1) * 8, j = nt * 8 + 2 * t4 + (x & 1);
            float pv = 0.f, pd = 0.f;
            if (i < nr && j <= i) {
              pv = out_scale * sPow[i - j] * acc_s[nt][x];
              if (j < i) pd = out_scale * (float(i - j) * kDerivDown) * sPow[i - j - 1] * acc_s[nt][x];
            }
            sP[i * L.ldp + j] = from_f<T>(pv);
            if (deriv) sPd[i * L.ldp + j] = from_f<T>(pd);
          }
        }
      }
      // Inter rows: o_i gets out_scale lambda^(i+1) q_i S; y_i gets out_scale (lambda^(i+1) q_i T +
      // (i+1) lambda^i q_i S) (undoing the fp16 state scaling).
      const float inv_s = 1.f / sc_s, inv_t = 1.f / sc_t;
#pragma unroll
      for (int nt = 0; nt < MAXNT; ++nt) {
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int i = r0 + g + (x >> 1) * 8;
          const float qs = acc_o[nt][x] * inv_s;
          if (deriv)  // kept divided by 64 until the (scaled-down) intra term is added
            acc_y[nt][x] = kDerivDown * out_scale * (sPow[i + 1] * acc_y[nt][x] * inv_t + float(i + 1) * sPow[i] * qs);
          acc_o[nt][x] = out_scale * sPow[i + 1 - pshift] * qs;
        }
      }
      __syncwarp();
      // Intra: += P v' (keys j <= i: k-steps up to the diagonal).
      for (int kk = 0; kk <= warp; ++kk) {
        typename M::FA a, ad;
        M::ld_a(a, sP, L.ldp, r0, kk * 16);
        ad = a;
        if (deriv) M::ld_a(ad, sPd, L.ldp, r0, kk * 16);
#pragma unroll
        for (int np = 0; np < MAXNT / 2; ++np) {
          if (2 * np < nnt) {
            typename M::FB b[2];
            M::ld_b2_k(b, sV, L.ldv, kk * 16, np * 16);
            M::mma(acc_o[2 * np], a, b[0]);
            M::mma(acc_o[2 * np + 1], a, b[1]);
            if (deriv) {
              M::mma(acc_y[2 * np], ad, b[0]);
              M::mma(acc_y[2 * np + 1], ad, b[1]);
            }
          }
        }
      }
      // Store o' (and contract y with dout).
#pragma unroll
      for (int nt = 0; nt < MAXNT; ++nt) {
        if (nt < nnt) {
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const int i = r0 + g + (x >> 1) * 8, e = nt * 8 + 2 * t4 + (x & 1);
            if (i < nr && e < bvv) {
              const int64_t tau = t0 + i;
              const int64_t row = sb.start + (p.reverse ? sb.len - 1 - tau : tau);
              if (p.o) {
                T* o = static_cast<T*>(p.o) + sb.b * p.o_batch_stride + row * p.o_row_stride +
                       int64_t(h) * p.o_head_stride + e0 + e;
                *o = from_f<T>(acc_o[nt][x]);
              }
              if (deriv) {
                const T* dr = static_cast<const T*>(p.dout.ptr) + sb.b * p.dout.batch_stride +
                              row * p.dout.row_stride + int64_t(h) * p.dout.head_stride + e0 + e;
                dl += to_f<T>(*dr) * (kDerivUp * acc_y[nt][x]);
              }
            }
          }
        }
      }
    }
    __syncthreads();

    // Decayed v' rows for the state update: lambda^(nr-1-j) v'_j (and (nr-1-j) lambda^(nr-2-j) v'_j).
    for (int idx = tid; idx < BT * bvp; idx += NT) {
      const int j = idx / bvp, e = idx - j * bvp;
      const float vj = to_f<T>(sV[j * L.ldv + e]);
      sVd[j * L.ldv + e] = from_f<T>(j < nr ? sPow[nr - 1 - j] * vj : 0.f);
      if (deriv)
        sVd2[j * L.ldv + e] = from_f<T>(j + 1 < nr ? (float(nr - 1 - j) * kDerivDown) * sPow[nr - 2 - j] * vj : 0.f);
    }
    __syncthreads();

    // S <- lambda^(nr - pshift) S + k'^T (decayed v');  T <- lambda^nr T + nr lambda^(nr-1) S + k'^T v''.
    {
      const int nkk = (nr + 15) / 16;
      const float a_s = sPow[nr - pshift], a_t = sPow[nr], a_ts = float(nr) * sPow[nr - 1];
      float ms = 0.f, mtv = 0.f;
      for (int mt = warp; mt < dkp / 16; mt += NW) {
        float acc[MAXNT][4], acct[MAXNT][4];
#pragma unroll
        for (int nt = 0; nt < MAXNT; ++nt) {
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            acc[nt][x] = 0.f;
            acct[nt][x] = 0.f;
            if (nt < nnt) {
              const int d = mt * 16 + g + (x >> 1) * 8, e = nt * 8 + 2 * t4 + (x & 1);
              const float s_old = sS[d * L.lds + e];
              acc[nt][x] = a_s * s_old;
              if (deriv) acct[nt][x] = kDerivDown * (a_t * sT[d * L.lds + e] + a_ts * s_old);
            }
          }
        }
        for (int kk = 0; kk < nkk; ++kk) {
          typename M::FA a;
          M::ld_a_t(a, sK, L.ldq, mt * 16, kk * 16);
#pragma unroll
          for (int np = 0; np < MAXNT / 2; ++np) {
            if (2 * np < nnt) {
              typename M::FB b[2];
              M::ld_b2_k(b, sVd, L.ldv, kk * 16, np * 16);
              M::mma(acc[2 * np], a, b[0]);
              M::mma(acc[2 * np + 1], a, b[1]);
              if (deriv) {
                M::ld_b2_k(b, sVd2, L.ldv, kk * 16, np * 16);
                M::mma(acct[2 * np], a, b[0]);
                M::mma(acct[2 * np + 1], a, b[1]);
              }
            }
          }
        }
#pragma unroll
        for (int nt = 0; nt < MAXNT; ++nt) {
          if (nt < nnt) {
#pragma unroll
            for (int x = 0; x < 4; ++x) {
              const int d = mt * 16 + g + (x >> 1) * 8, e = nt * 8 + 2 * t4 + (x & 1);
              sS[d * L.lds + e] = acc[nt][x];
              if (deriv) sT[d * L.lds + e] = kDerivUp * acct[nt][x];
              ms = fmaxf(ms, fabsf(acc[nt][x]));
              mtv = fmaxf(mtv, kDerivUp * fabsf(acct[nt][x]));
            }
          }
        }
      }
      ms = warp_max(ms);
      mtv = warp_max(mtv);
      if (lane == 0) {  // read by the next chunk after the barrier below
        sRed[warp] = ms;
        sRed[NW + warp] = mtv;
      }
    }
    pshift = 0;
    __syncthreads();
  }

  if (state_only) {
    for (int idx = tid; idx < dk * bvv; idx += NT) {
      const int d = idx / bvv, e = idx - d * bvv;
      const size_t at = (ws_base + seg) * ws_stride + size_t(d) * p.dv + e0 + e;
      static_cast<float*>(p.seg_state)[at] = sS[d * L.lds + e];
      if (deriv) static_cast<float*>(p.seg_tstate)[at] = sT[d * L.lds + e];
    }
    return;
  }
  const bool last = seg == sp.nseg - 1;
  if (last && p.final_state.ptr) {
    const int sh = p.final_shift - pshift;
    const float a = sPow[sh < 0 ? 0 : sh];
    for (int idx = tid; idx < dk * bvv; idx += NT) {
      const int d = idx / bvv, e = idx - d * bvv;
      state_at(p.final_state, n, h, d, e0 + e) = a * sS[d * L.lds + e];
    }
  }
  if (deriv) {
    if (last && p.dfinal.ptr) {
      for (int idx = tid; idx < dk * bvv; idx += NT) {
        const int d = idx / bvv, e = idx - d * bvv;
        dl += state_at(p.dfinal, n, h, d, e0 + e) * sT[d * L.lds + e];
      }
    }
    dl = warp_sum(dl);
    __syncthreads();  // (sRed held the state maxima)
    if (lane == 0) sRed[warp] = dl;
    __syncthreads();
    if (tid == 0) {
      float total = 0.f;
      for (int w = 0; w < NW; ++w) total += sRed[w];
      static_cast<float*>(p.dlambda_partial)[((size_t(n) * p.num_heads + h) * p.num_slabs + slab) * p.num_segments + seg] =
          total;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Segment scan: entering state of segments 1.. from the local states, one thread per state element.
// ------------------------------------------------------------------------------------------------

// (Templates only so that every translation unit may include this header: instantiated on use.)
template <int kUnused = 0>
__global__ void scan_kernel(const PassParams p) {
  const int nh = int(blockIdx.x);
  const int n = nh / p.num_heads, h = nh - n * p.num_heads;
  const int idx = int(blockIdx.y * blockDim.x + threadIdx.x);
  if (idx >= p.dk * p.dv) return;
  const int d = idx / p.dv, e = idx - d * p.dv;
  const Bounds sb = seq_bounds(p, n);
  const SegmentPlan sp = lightning_segments(sb.len, p.block_t, p.num_segments);
  if (sp.nseg <= 1) return;
  const float slope = static_cast<const float*>(p.slopes)[h];
  float S = p.init.ptr ? state_at(p.init, n, h, d, e) : 0.f;
  float Tv = 0.f;
  int ps = p.init.ptr ? p.init_shift : 0;
  const int64_t seg_rows = sp.chunks_per_seg * p.block_t;
  const size_t stride = size_t(p.dk) * p.dv;
  const size_t base = (size_t(n) * p.num_heads + h) * p.num_segments * stride + idx;
  for (int s = 0; s + 1 < sp.nseg; ++s) {
    const float len = float(sb.len - s * seg_rows < seg_rows ? sb.len - s * seg_rows : seg_rows);
    const size_t at = base + size_t(s) * stride;
    if (p.deriv) {
      Tv = expf(-slope * len) * Tv + len * expf(-slope * (len - 1.f)) * S + static_cast<float*>(p.seg_tstate)[at];
      static_cast<float*>(p.seg_tstate)[at] = Tv;
    }
    S = expf(-slope * (len - float(ps))) * S + static_cast<float*>(p.seg_state)[at];
    static_cast<float*>(p.seg_state)[at] = S;
    ps = 0;
  }
}

// ------------------------------------------------------------------------------------------------
// d slopes: dslopes[h] = -lambda_h * sum of the partials of head h (fp64 sum), one block per head.
// ------------------------------------------------------------------------------------------------

constexpr int kReduceThreads = 256;

template <int kUnused = 0>
__global__ void __launch_bounds__(kReduceThreads) reduce_dslopes_kernel(const PassParams p, float* dslopes) {
  __shared__ double red[kReduceThreads];
  const int h = int(blockIdx.x), tid = int(threadIdx.x);
  const int per = p.num_slabs * p.num_segments;
  double acc = 0.0;
  for (int idx = tid; idx < p.num_seqs * per; idx += kReduceThreads) {
    const int n = idx / per, r = idx - n * per;
    acc += double(static_cast<const float*>(p.dlambda_partial)[(size_t(n) * p.num_heads + h) * per + r]);
  }
  red[tid] = acc;
  __syncthreads();
  for (int s = kReduceThreads / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  if (tid == 0) {
    const double lam = exp(-double(static_cast<const float*>(p.slopes)[h]));
    dslopes[h] = float(-lam * red[0]);
  }
}

// ------------------------------------------------------------------------------------------------
// Decode: one step, bound by reading and writing the fp32 state once. Block (8, 32) per (b, h) and
// 32 state columns: threadIdx.x owns 4 consecutive columns (a warp covers 4 rows x 128 bytes),
// threadIdx.y every 32nd row; a thread issues up to 4 row loads before it stores (the state may be
// updated in place, so loads are not reordered past stores by the compiler). Partial outputs meet
// in shared memory.
// ------------------------------------------------------------------------------------------------

constexpr int kDecodeCols = 32;  // state columns per block
constexpr int kDecodeRows = 32;  // threadIdx.y extent
constexpr int kDecodeBatch = 4;  // rows in flight per thread

struct F4 {
  float x, y, z, w;
};
LT_DEV F4 ld4(const float* p) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  return {v.x, v.y, v.z, v.w};
}
LT_DEV void st4(float* p, const F4& v) { *reinterpret_cast<float4*>(p) = make_float4(v.x, v.y, v.z, v.w); }

template <typename T>
__global__ void __launch_bounds__(kDecodeCols / 4 * kDecodeRows) decode_kernel(const DecodeParams p) {
  __shared__ float red[kDecodeRows][kDecodeCols];
  const int bh = int(blockIdx.x);
  const int b = bh / p.num_heads, h = bh - b * p.num_heads;
  const int tx = int(threadIdx.x), ty = int(threadIdx.y);
  const int e = int(blockIdx.y) * kDecodeCols + tx * 4;
  const T* q = static_cast<const T*>(p.q) + int64_t(b) * p.q_batch_stride + int64_t(h) * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + int64_t(b) * p.k_batch_stride + int64_t(h) * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + int64_t(b) * p.v_batch_stride + int64_t(h) * p.v_head_stride;
  const float lam = expf(-static_cast<const float*>(p.slopes)[h]);
  const size_t base = size_t(bh) * p.dk * p.dv;
  const float* s_in = static_cast<const float*>(p.state_in) + base;
  float* s_out = static_cast<float*>(p.state_out) + base;
  float vv[4], acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int x = 0; x < 4; ++x) vv[x] = e + x < p.dv ? to_f<T>(v[e + x]) : 0.f;
  const bool vec = (p.dv % 4 == 0) && (reinterpret_cast<uintptr_t>(s_in) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(s_out) % 16 == 0);
  if (e < p.dv) {
    for (int d0 = ty; d0 < p.dk; d0 += kDecodeRows * kDecodeBatch) {
      if (vec) {
        F4 s[kDecodeBatch];
#pragma unroll
        for (int u = 0; u < kDecodeBatch; ++u) {
          const int d = d0 + u * kDecodeRows;
          if (d < p.dk) s[u] = ld4(s_in + size_t(d) * p.dv + e);
        }
#pragma unroll
        for (int u = 0; u < kDecodeBatch; ++u) {
          const int d = d0 + u * kDecodeRows;
          if (d < p.dk) {
            const float kd = to_f<T>(k[d]), qd = to_f<T>(q[d]);
            s[u].x = lam * s[u].x + kd * vv[0];
            s[u].y = lam * s[u].y + kd * vv[1];
            s[u].z = lam * s[u].z + kd * vv[2];
            s[u].w = lam * s[u].w + kd * vv[3];
            st4(s_out + size_t(d) * p.dv + e, s[u]);
            acc[0] += qd * s[u].x;
            acc[1] += qd * s[u].y;
            acc[2] += qd * s[u].z;
            acc[3] += qd * s[u].w;
          }
        }
      } else {
        for (int u = 0; u < kDecodeBatch; ++u) {
          const int d = d0 + u * kDecodeRows;
          if (d >= p.dk) break;
          const float kd = to_f<T>(k[d]), qd = to_f<T>(q[d]);
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            if (e + x < p.dv) {
              const float s = lam * s_in[size_t(d) * p.dv + e + x] + kd * vv[x];
              s_out[size_t(d) * p.dv + e + x] = s;
              acc[x] += qd * s;
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int x = 0; x < 4; ++x) red[ty][tx * 4 + x] = acc[x];
  __syncthreads();
  // 32 threads finish the 32 columns: thread (tx, ty) with ty < 4 sums column tx * 4 + ty.
  if (ty < 4) {
    const int col = tx * 4 + ty;
    const int ecol = int(blockIdx.y) * kDecodeCols + col;
    if (ecol < p.dv) {
      float sum = 0.f;
      for (int y = 0; y < kDecodeRows; ++y) sum += red[y][col];
      T* o = static_cast<T*>(p.o) + int64_t(b) * p.o_batch_stride + int64_t(h) * p.o_head_stride;
      o[ecol] = from_f<T>(float(p.scale) * sum);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host launch code
// ------------------------------------------------------------------------------------------------


// Runs a planned pass: state-only phase and scan when split, then the main phase.
template <typename T, int BT>
cudaError_t launch_pass(const PassParams& p, cudaStream_t stream) {
  const SmemLayout L = pass_smem_layout(int(sizeof(T)), BT, p.dk, p.bv, p.deriv);
  auto kernel = p.deriv ? pass_kernel<T, BT, true> : pass_kernel<T, BT, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(L.total));
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(p.num_seqs) * unsigned(p.num_heads), unsigned(p.num_slabs), unsigned(p.num_segments));
  const dim3 block(BT / 16 * 32);
  if (p.num_segments > 1) {
    ATTNKIT_LAUNCH_KERNEL(kernel, grid, block, L.total, stream, p, 0);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    const dim3 sgrid(unsigned(p.num_seqs) * unsigned(p.num_heads), unsigned((p.dk * p.dv + 255) / 256));
    ATTNKIT_LAUNCH_KERNEL(scan_kernel<0>, sgrid, dim3(256), 0, stream, p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  ATTNKIT_LAUNCH_KERNEL(kernel, grid, block, L.total, stream, p, 1);
  return cudaGetLastError();
}

template <int kUnused = 0>
cudaError_t launch_reduce_dslopes(const PassParams& p, float* dslopes, cudaStream_t stream) {
  ATTNKIT_LAUNCH_KERNEL(reduce_dslopes_kernel<0>, dim3(unsigned(p.num_heads)), dim3(kReduceThreads), 0, stream, p,
                        dslopes);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.batch) * unsigned(p.num_heads), unsigned((p.dv + kDecodeCols - 1) / kDecodeCols));
  ATTNKIT_LAUNCH_KERNEL(decode_kernel<T>, grid, dim3(kDecodeCols / 4, kDecodeRows), 0, stream, p);
  return cudaGetLastError();
}

}  // namespace attnkit::lightning::kern
