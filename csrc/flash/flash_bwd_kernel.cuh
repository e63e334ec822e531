// Flash backward (FlashAttention-2 schedule, KV-stationary): one thread block per (key block, KV
// head, batch * segment). It keeps dK and dV of its 64 keys in registers and loops over every output
// head that reads this KV head and over the query blocks that see the key block, so the reduction of
// dK/dV over grouped query heads is done in-block, in a fixed order: deterministic, no atomics.
// dQ is accumulated in fp32 into dq_accum (atomics, or one slice per key block for a deterministic
// dq, see FlashParams::dq_splits) and converted by a small epilogue kernel.
//
// 8 warps. Per query block:
//   phase 1 (4 x 2 warps over the 64 x 64 score block): S = Q K^T, P = exp(S - lse),
//            dP = dO V^T, dS = P (dP - delta); P and dS go to shared memory (and dbias sums);
//   phase 2 (4 x 2 warps over 64 keys x D): dV += P^T dO, dK += dS^T Q;
//   phase 3 (4 x 2 warps over 64 queries x D): dQ += dS K (atomics).
#pragma once
#include "common/cuda_check.h"
#include "flash/flash.h"
#include "flash/flash_common.cuh"

namespace attnkit::flash {

template <typename T, int D>
struct BwdTraits {
  static constexpr int kBlockM = kBwdBlockM;
  static constexpr int kBlockN = kBwdBlockN;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLd = D + 8;
  static constexpr int kLdP = kBlockN + 8;
  static constexpr int kTile = 64 * kLd;
  static constexpr int kPTile = kBlockM * kLdP;
  static constexpr size_t kSmem = sizeof(T) * (4 * kTile + 2 * kPTile) + sizeof(ColTile<kBlockN>) +
                                  sizeof(float) * (2 * kBlockM + 4 * kBlockN);
  static_assert(kBlockM == 64 && kBlockN == 64, "warp layout assumes 64 x 64 blocks");
  static_assert((D / 2) % 16 == 0, "head dim split over two warps");
};

template <typename T, int D>
__global__ void __launch_bounds__(BwdTraits<T, D>::kThreads) flash_bwd_kernel(const FlashParams p) {
  using Tr = BwdTraits<T, D>;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, LD = Tr::kLd, LDP = Tr::kLdP, NTH = Tr::kThreads;
  constexpr int DH = D / 2;       // head-dim slice of one warp in phases 2 and 3
  constexpr int NT_D = DH / 8;    // n8 tiles in that slice

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + Tr::kTile;
  T* sK = sdO + Tr::kTile;
  T* sV = sK + Tr::kTile;
  T* sP = sV + Tr::kTile;
  T* sdS = sP + Tr::kPTile;
  ColTile<BN>* sCols = reinterpret_cast<ColTile<BN>*>(sdS + Tr::kPTile);
  float* sLse = reinterpret_cast<float*>(sCols + 1);  // log2 domain, +inf for rows without keys
  float* sDelta = sLse + BM;
  float* sDB = sDelta + BM;  // [4][BN] per-warp-row partial column sums of dS

  const int n_block = blockIdx.x;
  const int hk = blockIdx.y;
  const int bz = blockIdx.z;
  const int n0 = n_block * BN;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int wr = warp & 3;   // row group (16 rows) in every phase
  const int wc = warp >> 2;  // column half in every phase

  // K, V of this block: gathered with the first head of the group (gathers require kv_group == 1)
  const BlockCoord c0 = make_coord(p, bz, hk * p.kv_group);
  if (n0 >= c0.lk) return;  // per-batch lengths: the grid covers the longest sequence
  {
    const T* kb =
        static_cast<const T*>(p.k) + c0.b * p.k_batch_stride + c0.k_off * p.k_row_stride + c0.hk * p.k_head_stride;
    const T* vb =
        static_cast<const T*>(p.v) + c0.b * p.v_batch_stride + c0.k_off * p.v_row_stride + c0.hk * p.v_head_stride;
    load_tile<T, BN, D, LD, NTH>(sK, kb, p.k_row_stride, c0.k_rows, c0.seg, c0.lk, n0, p.head_dim);
    load_tile<T, BN, D, LD, NTH>(sV, vb, p.v_row_stride, c0.k_rows, c0.seg, c0.lk, n0, p.head_dim);
    cp_async_commit();
  }

  float acc_dk[NT_D][4], acc_dv[NT_D][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);
  const bool row_bias = p.bias && p.bias_row_stride != 0;
  const bool col_dbias = p.dbias && p.bias && !row_bias;
  float dbias_acc = 0.f;  // thread t < BN owns column n0 + t of the row-broadcast dbias

  for (int g = 0; g < p.kv_group; ++g) {
    const int h = hk * p.kv_group + g;
    const BlockCoord c = make_coord(p, bz, h);
    const MaskCtx mctx = make_mask_ctx(p, c);
    if (threadIdx.x < BN) {
      // (re)fill column data: the bias head may change with h
      const int j = threadIdx.x;
      const int col = n0 + j;
      const bool valid = col < c.lk;
      sCols->pos[j] = valid ? (c.k_rows ? c.k_rows[col] : col) : 0;
      sCols->bias[j] = (valid && mctx.bias_base && !mctx.row_bias) ? mctx.bias_base[col] : 0.f;
    }
    const T* qb = static_cast<const T*>(p.q) + c.b * p.q_batch_stride + c.q_off * p.q_row_stride + c.hq * p.q_head_stride;
    const T* dob =
        static_cast<const T*>(p.dout) + c.b * p.do_batch_stride + c.q_off * p.do_row_stride + c.h * p.do_head_stride;
    const float* lse_b =
        p.lse + c.b * p.lse_batch_stride + c.h * p.lse_head_stride + int64_t(c.seg) * p.seqlen_q + c.q_off;
    const float* delta_b =
        p.delta + c.b * p.lse_batch_stride + c.h * p.lse_head_stride + int64_t(c.seg) * p.seqlen_q + c.q_off;
    float* dqa_b = p.dq_accum + c.b * p.dqa_batch_stride + c.q_off * p.dqa_row_stride + c.hq * p.dqa_head_stride;
    if (p.dq_splits > 0) dqa_b += int64_t(h % p.q_group) * p.dqa_split_stride;
    // deterministic dq: key block n stores into slice (n - base) * q_group + h % q_group, base = the
    // first key block query block mb can see when the slices are windowed (dq_slices_windowed), else 0
    const bool windowed_slices = p.dq_splits > 0 && p.causal && p.window_left >= 0 && !mctx.index && !p.active_list;

    const BlockIter it = bwd_blocks<BM, BN>(p, mctx, c, n_block);
    for (int t = 0; t < it.count(); ++t) {
      const int mb = it.at(t);
      const int m0 = mb * BM;
      float* dqa_m = dqa_b;
      if (p.dq_splits > 0) {
        const int base = windowed_slices ? max(0, floor_div(m0 + mctx.shift - p.window_left, BN)) : 0;
        dqa_m += int64_t(n_block - base) * p.q_group * p.dqa_split_stride;
      }
      load_tile<T, BM, D, LD, NTH>(sQ, qb, p.q_row_stride, c.q_rows, c.seg, c.rows_q, m0, p.head_dim);
      // dout lives in segment space: contiguous rows, no gather
      load_tile<T, BM, D, LD, NTH>(sdO, dob + int64_t(c.seg) * p.seqlen_q * p.do_row_stride, p.do_row_stride,
                                   nullptr, 0, c.rows_q, m0, p.head_dim);
      cp_async_commit();
      if (threadIdx.x < BM) {
        const int i = m0 + threadIdx.x;
        float l = INFINITY, d = 0.f;
        if (i < c.rows_q) {
          const float lv = lse_b[i];
          l = lv == -INFINITY ? INFINITY : lv * kLog2e;
          d = delta_b[i];
        }
        sLse[threadIdx.x] = l;
        sDelta[threadIdx.x] = d;
      }
      RowMask rm;
      fill_rows(rm, mctx, c, m0 + wr * 16);
      cp_async_wait<0>();
      __syncthreads();

      // ---- phase 1: P and dS for rows wr*16.., columns wc*32.. ----
      {
        float s[4][4], dp[4][4];
        zero_acc(s);
        zero_acc(dp);
        warp_gemm<T, D, 4, true, true>(s, sQ + wr * 16 * LD, LD, sK + wc * 32 * LD, LD);
        warp_gemm<T, D, 4, true, true>(dp, sdO + wr * 16 * LD, LD, sV + wc * 32 * LD, LD);
        uint32_t self_flags = 0;
        scores_log2<4, BN>(s, mctx, rm, *sCols, n_block, wc * 32, tile_needs_mask<BM, BN>(mctx, m0, n_block),
                           &self_flags);
        float colsum[4][2];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          colsum[j][0] = colsum[j][1] = 0.f;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int rl = wr * 16 + (lane >> 2) + 8 * (e >> 1);  // local row
            const float pr = exp2f(s[j][e] - sLse[rl]);
            float ds = pr * (dp[j][e] - sDelta[rl]);
            if (self_flags & (1u << (j * 4 + e))) ds = 0.f;
            s[j][e] = pr;
            dp[j][e] = ds;
            colsum[j][e & 1] += ds;
          }
          const int cl = wc * 32 + j * 8 + 2 * (lane & 3);  // local column of e = 0, 2
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            const int rl = wr * 16 + (lane >> 2) + 8 * k;
            *reinterpret_cast<uint32_t*>(sP + rl * LDP + cl) = MmaOp<T>::pack(s[j][2 * k], s[j][2 * k + 1]);
            *reinterpret_cast<uint32_t*>(sdS + rl * LDP + cl) = MmaOp<T>::pack(dp[j][2 * k], dp[j][2 * k + 1]);
            if (row_bias && p.dbias) {
              const int row = m0 + rl;
#pragma unroll
              for (int e2 = 0; e2 < 2; ++e2) {
                const int col = n0 + cl + e2;
                if (row < p.seqlen_q && col < p.seqlen_k) {
                  p.dbias[c.b * p.dbias_batch_stride + c.h * p.dbias_head_stride + int64_t(row) * p.dbias_row_stride +
                          col] = dp[j][2 * k + e2];
                }
              }
            }
          }
        }
        if (col_dbias) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e2 = 0; e2 < 2; ++e2) {
              float v = colsum[j][e2];
              v += __shfl_xor_sync(0xffffffff, v, 4);
              v += __shfl_xor_sync(0xffffffff, v, 8);
              v += __shfl_xor_sync(0xffffffff, v, 16);
              if (lane < 4) sDB[wr * BN + wc * 32 + j * 8 + 2 * lane + e2] = v;
            }
          }
        }
      }
      __syncthreads();

      if (col_dbias && threadIdx.x < BN) {
        const int j = threadIdx.x;
        dbias_acc += ((sDB[j] + sDB[BN + j]) + sDB[2 * BN + j]) + sDB[3 * BN + j];
      }

      // ---- phase 2: dV += P^T dO, dK += dS^T Q for keys wr*16.., head dims wc*DH.. ----
      warp_gemm<T, BM, NT_D, false, false>(acc_dv, sP + wr * 16, LDP, sdO + wc * DH, LD);
      warp_gemm<T, BM, NT_D, false, false>(acc_dk, sdS + wr * 16, LDP, sQ + wc * DH, LD);

      // ---- phase 3: dQ += scale * dS K for queries wr*16.., head dims wc*DH.. ----
      {
        float acc_dq[NT_D][4];
        zero_acc(acc_dq);
        warp_gemm<T, BN, NT_D, true, false>(acc_dq, sdS + wr * 16 * LDP, LDP, sK + wc * DH, LD);
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const int row = m0 + wr * 16 + (lane >> 2) + 8 * k;
          if (row < c.rows_q) {
            float* dst = dqa_m + (int64_t(c.seg) * p.seqlen_q + row) * p.dqa_row_stride + wc * DH + 2 * (lane & 3);
            // dq_accum has the tensor's head dim: columns of the padding (>= head_dim) are skipped
            if (p.dq_splits > 0) {  // this block owns the slice: one store per element
#pragma unroll
              for (int j = 0; j < NT_D; ++j) {
                if (wc * DH + j * 8 >= p.head_dim) continue;
                *reinterpret_cast<float2*>(dst + j * 8) =
                    make_float2(acc_dq[j][2 * k] * p.scale, acc_dq[j][2 * k + 1] * p.scale);
              }
            } else {
#pragma unroll
              for (int j = 0; j < NT_D; ++j) {
                if (wc * DH + j * 8 >= p.head_dim) continue;
                atomicAdd(dst + j * 8, acc_dq[j][2 * k] * p.scale);
                atomicAdd(dst + j * 8 + 1, acc_dq[j][2 * k + 1] * p.scale);
              }
            }
          }
        }
      }
      __syncthreads();  // sQ, sdO, sP, sdS, sLse are refilled next
    }

    // flush the row-broadcast dbias when the next head belongs to another bias head (or at the end)
    if (col_dbias) {
      const int hb = h / p.bias_head_group;
      const bool last = g + 1 == p.kv_group || (h + 1) / p.bias_head_group != hb;
      if (last) {
        if (threadIdx.x < BN && n0 + threadIdx.x < p.seqlen_k) {
          p.dbias[c.b * p.dbias_batch_stride + int64_t(hb) * p.dbias_head_stride + int64_t(c.seg) * p.seqlen_k + n0 +
                  threadIdx.x] = dbias_acc;
        }
        dbias_acc = 0.f;
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // with no query block at all, the K/V copies may still be landing

  // ---- epilogue: stage dK (scaled) and dV through sK / sV, store 16-byte chunks ----
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int rl = wr * 16 + (lane >> 2) + 8 * k;
#pragma unroll
    for (int j = 0; j < NT_D; ++j) {
      const int cl = wc * DH + j * 8 + 2 * (lane & 3);
      *reinterpret_cast<uint32_t*>(sK + rl * LD + cl) =
          MmaOp<T>::pack(acc_dk[j][2 * k] * p.scale, acc_dk[j][2 * k + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(sV + rl * LD + cl) = MmaOp<T>::pack(acc_dv[j][2 * k], acc_dv[j][2 * k + 1]);
    }
  }
  __syncthreads();
  T* dkb = static_cast<T*>(p.dk) + c0.b * p.dk_batch_stride + c0.k_off * p.dk_row_stride + c0.hk * p.dk_head_stride;
  T* dvb = static_cast<T*>(p.dv) + c0.b * p.dv_batch_stride + c0.k_off * p.dv_row_stride + c0.hk * p.dv_head_stride;
  constexpr int kChunks = D / 8;
  for (int ch = threadIdx.x; ch < BN * kChunks; ch += NTH) {
    const int r = ch / kChunks;
    const int col = (ch % kChunks) * 8;
    const int row = n0 + r;
    if (row < c0.lk && col < p.head_dim) {  // padded head-dim columns are not stored
      const int64_t orow = int64_t(c0.seg) * p.seqlen_k + row;
      *reinterpret_cast<uint4*>(dkb + orow * p.dk_row_stride + col) = *reinterpret_cast<const uint4*>(sK + r * LD + col);
      *reinterpret_cast<uint4*>(dvb + orow * p.dv_row_stride + col) = *reinterpret_cast<const uint4*>(sV + r * LD + col);
    }
  }
}

template <typename T, int D>
void launch_flash_bwd_main(const FlashParams& p, cudaStream_t stream) {
  using Tr = BwdTraits<T, D>;
  const dim3 grid((p.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN, p.h_kv, p.batch * p.num_segments);
  if (grid.x == 0 || grid.z == 0 || p.h_kv == 0) return;
  auto kernel = &flash_bwd_kernel<T, D>;
  if (Tr::kSmem > 48 * 1024) {
    ATTNKIT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Tr::kSmem)));
  }
  ATTNKIT_LAUNCH_KERNEL(kernel, grid, Tr::kThreads, Tr::kSmem, stream, p);
  ATTNKIT_LAUNCH_CHECK();
}

}  // namespace attnkit::flash
