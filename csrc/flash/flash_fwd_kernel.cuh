// Flash forward kernel (FlashAttention-2 schedule): one thread block per (query block, output head,
// batch * segment); 4 warps, 16 query rows each; K/V tiles streamed through shared memory with
// cp.async (double-buffered when it fits); online softmax in registers; P fed to P.V from registers.
// Split-KV (FlashParams::num_splits > 1): one block per (split, query block, ...), each over its share
// of the key blocks, writing fp32 partial results that flash_launch.cu's combine kernel merges.
#pragma once
#include "common/cuda_check.h"
#include "flash/flash.h"
#include "flash/flash_common.cuh"

namespace attnkit::flash {

template <typename T, int D>
struct FwdTraits {
  static constexpr int kBlockM = kFwdBlockM;
  static constexpr int kBlockN = kFwdBlockN;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLd = D + 8;  // padded row pitch: conflict-free ldmatrix
  static constexpr int kStages = D <= 128 ? 2 : 1;
  static constexpr int kTileElems = kBlockM * kLd;
  static constexpr int kKVElems = kBlockN * kLd;
  static constexpr size_t kSmem =
      sizeof(T) * (kTileElems + 2 * kStages * kKVElems) + sizeof(ColTile<kBlockN>) * kStages;
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdTraits<T, D>::kThreads) flash_fwd_kernel(const FlashParams p) {
  using Tr = FwdTraits<T, D>;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, LD = Tr::kLd, NTH = Tr::kThreads;
  constexpr int NT_S = BN / 8;  // n8 tiles of the score row block
  constexpr int NT_O = D / 8;   // n8 tiles of the output row block

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Tr::kTileElems;
  T* sV = sK + Tr::kStages * Tr::kKVElems;
  ColTile<BN>* sCols = reinterpret_cast<ColTile<BN>*>(sV + Tr::kStages * Tr::kKVElems);

  // grid.x: split-major over the query blocks (one split unless split-KV)
  const int n_splits = p.num_splits > 1 ? p.num_splits : 1;
  const int n_mblocks = int(gridDim.x) / n_splits;
  const int split = int(blockIdx.x) / n_mblocks;
  const int mb = int(blockIdx.x) % n_mblocks;
  // causal: the last query blocks see the most keys; schedule them first for a better tail
  const int m_block = p.causal ? n_mblocks - 1 - mb : mb;
  const BlockCoord c = make_coord(p, blockIdx.z, blockIdx.y);
  const MaskCtx mctx = make_mask_ctx(p, c);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int m0 = m_block * BM;
  // past this batch's length (the grid covers the longest sequence) or past the compact row count of
  // this head (rows_q <= lq): nothing to compute or store
  if (m0 >= c.rows_q) return;

  const T* qb = static_cast<const T*>(p.q) + c.b * p.q_batch_stride + c.q_off * p.q_row_stride + c.hq * p.q_head_stride;
  const T* kb = static_cast<const T*>(p.k) + c.b * p.k_batch_stride + c.k_off * p.k_row_stride + c.hk * p.k_head_stride;
  const T* vb = static_cast<const T*>(p.v) + c.b * p.v_batch_stride + c.k_off * p.v_row_stride + c.hk * p.v_head_stride;

  BlockIter it = fwd_blocks<BM, BN>(p, mctx, c, m_block);
  if (n_splits > 1) it = split_share(it, split, n_splits);
  const int n_iter = it.count();

  auto load_kv = [&](int t, int stage) {
    const int nb = it.at(t);
    load_tile<T, BN, D, LD, NTH>(sK + stage * Tr::kKVElems, kb, p.k_row_stride, c.k_rows, c.seg, c.lk, nb * BN, p.head_dim);
    load_tile<T, BN, D, LD, NTH>(sV + stage * Tr::kKVElems, vb, p.v_row_stride, c.k_rows, c.seg, c.lk, nb * BN, p.head_dim);
    fill_cols<BN>(sCols[stage], mctx, c, nb);
  };

  load_tile<T, BM, D, LD, NTH>(sQ, qb, p.q_row_stride, c.q_rows, c.seg, c.rows_q, m0, p.head_dim);
  if (n_iter > 0) load_kv(0, 0);
  cp_async_commit();

  RowMask rm;
  fill_rows(rm, mctx, c, m0 + warp * 16);

  float acc_o[NT_O][4];
  zero_acc(acc_o);
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // per-thread partial sums over its columns

  for (int t = 0; t < n_iter; ++t) {
    const int stage = Tr::kStages == 2 ? (t & 1) : 0;
    if constexpr (Tr::kStages == 2) {
      if (t + 1 < n_iter) {
        load_kv(t + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
    } else {
      if (t > 0) {
        load_kv(t, 0);
        cp_async_commit();
      }
      cp_async_wait<0>();
    }
    __syncthreads();

    const int nb = it.at(t);
    const T* sKs = sK + stage * Tr::kKVElems;
    const T* sVs = sV + stage * Tr::kKVElems;

    float s[NT_S][4];
    zero_acc(s);
    warp_gemm<T, D, NT_S, true, true>(s, sQ + warp * 16 * LD, LD, sKs, LD);
    scores_log2<NT_S, BN>(s, mctx, rm, sCols[stage], nb, 0, tile_needs_mask<BM, BN>(mctx, m0, nb));

    // online softmax (log2 domain); the 4 lanes of a quad share a row
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      float mx = row_max[k];
#pragma unroll
      for (int j = 0; j < NT_S; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * k], s[j][2 * k + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      const float base = mx == -INFINITY ? 0.f : mx;
      const float corr = exp2f(row_max[k] - base);
      row_max[k] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < NT_S; ++j) {
        s[j][2 * k] = exp2f(s[j][2 * k] - base);
        s[j][2 * k + 1] = exp2f(s[j][2 * k + 1] - base);
        sum += s[j][2 * k] + s[j][2 * k + 1];
      }
      row_sum[k] = row_sum[k] * corr + sum;
#pragma unroll
      for (int j = 0; j < NT_O; ++j) {
        acc_o[j][2 * k] *= corr;
        acc_o[j][2 * k + 1] *= corr;
      }
    }

    warp_gemm_rs<T, BN, NT_O, false>(acc_o, s, sVs, LD);
    __syncthreads();  // the stage is refilled next iteration
  }
  cp_async_wait<0>();
  __syncthreads();  // with no key block at all, the Q copies may still be landing in sQ

  if (n_splits > 1) {
    // split-KV epilogue: this split's O normalised by its own row sums, and its lse, fp32 into the
    // workspaces (layouts in flash_params.h); no row offsets here (no cu_seqlens_q)
    const int64_t R = int64_t(p.num_segments) * p.seqlen_q;
    const int64_t plane = (int64_t(split) * p.batch + c.b) * p.h_out + c.h;  // (split, b, h)
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      float l = row_sum[k];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l += __shfl_xor_sync(0xffffffff, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int row = m0 + warp * 16 + (lane >> 2) + 8 * k;
      if (row < c.rows_q) {
        const int64_t r = plane * R + int64_t(c.seg) * p.seqlen_q + row;
        float* oa = p.o_accum + r * p.head_dim;
#pragma unroll
        for (int j = 0; j < NT_O; ++j) {
          const int col = j * 8 + 2 * (lane & 3);
          if (col < p.head_dim) {  // head_dim is a multiple of 8: both columns or neither
            *reinterpret_cast<float2*>(oa + col) = make_float2(acc_o[j][2 * k] * inv, acc_o[j][2 * k + 1] * inv);
          }
        }
        if ((lane & 3) == 0) p.lse_accum[r] = l > 0.f ? (row_max[k] + log2f(l)) * kLn2 : -INFINITY;
      }
    }
    return;
  }

  // epilogue: normalise, stage the warp's 16 rows through its slice of sQ, store 16-byte chunks
  T* sO = sQ + warp * 16 * LD;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    float l = row_sum[k];
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int r = (lane >> 2) + 8 * k;
#pragma unroll
    for (int j = 0; j < NT_O; ++j) {
      const uint32_t packed = MmaOp<T>::pack(acc_o[j][2 * k] * inv, acc_o[j][2 * k + 1] * inv);
      *reinterpret_cast<uint32_t*>(sO + r * LD + j * 8 + 2 * (lane & 3)) = packed;
    }
    const int row = m0 + warp * 16 + r;
    if ((lane & 3) == 0 && row < c.rows_q) {
      const float lse = l > 0.f ? (row_max[k] + log2f(l)) * kLn2 : -INFINITY;
      p.lse[c.b * p.lse_batch_stride + c.h * p.lse_head_stride + int64_t(c.seg) * p.seqlen_q + c.q_off + row] = lse;
    }
  }
  __syncwarp();
  T* ob = static_cast<T*>(p.o) + c.b * p.o_batch_stride + c.q_off * p.o_row_stride + c.h * p.o_head_stride;
  constexpr int kChunks = D / 8;
  for (int ch = lane; ch < 16 * kChunks; ch += 32) {
    const int r = ch / kChunks;
    const int col = (ch % kChunks) * 8;
    const int row = m0 + warp * 16 + r;
    if (row < c.rows_q && col < p.head_dim) {  // padded head-dim columns are not stored
      const int64_t orow = int64_t(c.seg) * p.seqlen_q + row;
      *reinterpret_cast<uint4*>(ob + orow * p.o_row_stride + col) = *reinterpret_cast<const uint4*>(sO + r * LD + col);
    }
  }
}

template <typename T, int D>
void launch_flash_fwd(const FlashParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<T, D>;
  const int splits = p.num_splits > 1 ? p.num_splits : 1;
  const dim3 grid(unsigned((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM * splits), p.h_out, p.batch * p.num_segments);
  if (grid.x == 0 || grid.z == 0 || p.h_out == 0) return;
  auto kernel = &flash_fwd_kernel<T, D>;
  if (Tr::kSmem > 48 * 1024) {
    ATTNKIT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Tr::kSmem)));
  }
  ATTNKIT_LAUNCH_KERNEL(kernel, grid, Tr::kThreads, Tr::kSmem, stream, p);
  ATTNKIT_LAUNCH_CHECK();
}

}  // namespace attnkit::flash
