// Pieces shared by the forward and backward flash kernels: block coordinates, row gathers, tile
// loads into padded shared memory, per-tile score masking, and the tile-range / tile-list logic.
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/launch.cuh"
#include "common/mma.cuh"
#include "flash/flash_params.h"

namespace attnkit::flash {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ int floor_div(int a, int b) { return (a >= 0) ? a / b : -((-a + b - 1) / b); }
__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Where a block of the grid sits: batch b, segment s, output head h, the query / KV heads it reads.
struct BlockCoord {
  int b, seg, h, hq, hk;
  // this batch's query / key counts and the first row it owns in the packed tensors (per-batch
  // lengths, see FlashParams::cu_seqlens_q); seqlen_q, seqlen_k and 0 otherwise
  int lq, lk;
  int64_t q_off, k_off;
  int rows_q;  // valid query rows: the compact row count of (b, h) when q_count is set, else lq
  // gather index rows of this (b, h, seg); nullptr without gathers
  const int* q_rows;
  const int* k_rows;
};

__device__ __forceinline__ BlockCoord make_coord(const FlashParams& p, int bz, int h) {
  BlockCoord c;
  c.b = bz / p.num_segments;
  c.seg = bz % p.num_segments;
  c.h = h;
  c.hq = h / p.q_group;
  c.hk = h / p.kv_group;
  c.lq = p.seqlen_q;
  c.lk = p.seqlen_k;
  c.q_off = c.k_off = 0;
  if (p.cu_seqlens_q) {
    c.q_off = p.cu_seqlens_q[c.b];
    c.lq = p.cu_seqlens_q[c.b + 1] - p.cu_seqlens_q[c.b];
  }
  if (p.cu_seqlens_k) {
    c.k_off = p.cu_seqlens_k[c.b];
    c.lk = p.cu_seqlens_k[c.b + 1] - p.cu_seqlens_k[c.b];
  }
  if (p.seqused_k) c.lk = p.seqused_k[c.b];
  c.q_rows = p.q_index ? p.q_index + c.b * p.q_index_batch_stride + c.h * p.q_index_head_stride +
                             int64_t(c.seg) * p.seqlen_q
                       : nullptr;
  c.k_rows = p.k_index ? p.k_index + c.b * p.k_index_batch_stride + c.h * p.k_index_head_stride +
                             int64_t(c.seg) * p.seqlen_k
                       : nullptr;
  c.rows_q = p.q_count ? min(c.lq, p.q_count[int64_t(c.b) * p.h_out + c.h]) : c.lq;
  return c;
}

// Physical row read for local row i of the segment (gathered or contiguous).
__device__ __forceinline__ int64_t gather_row(const int* rows, int seg, int len, int i) {
  return rows ? int64_t(rows[i]) : int64_t(seg) * len + i;
}

// Copy rows [row0, row0 + ROWS) (local, < len valid) of a [.., D] 16-bit matrix into shared memory
// with row pitch LD. Rows past len are zero-filled. `base` already points at (batch, head).
// `dim` is the tensor's head dim (a multiple of 8, <= D): a kernel compiled for the next larger D
// zero-fills the columns [dim, D) here, so the products over the padded dims add exact zeros.
template <typename T, int ROWS, int D, int LD, int NTHREADS>
__device__ __forceinline__ void load_tile(T* smem, const T* base, int64_t row_stride, const int* rows, int seg,
                                          int len, int row0, int dim) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < ROWS * kChunks; c += NTHREADS) {
    const int r = c / kChunks;
    const int ch = c % kChunks;
    const int i = row0 + r;
    const bool valid = i < len && ch * 8 < dim;
    const T* src = valid ? base + gather_row(rows, seg, len, i) * row_stride + ch * 8 : base;
    cp_async_16(smem + r * LD + ch * 8, src, valid);
  }
}

// Per-thread row data for the masks of the two rows a thread owns in a 16-row warp tile.
struct RowMask {
  int pos[2];    // positions (gathered or local + shift already added)
  float thr[2];  // kept predicate
  int tie[2];
  int row[2];    // local row index (for a per-row bias)
};

// Shared per-tile column data, filled by fill_cols(): positions, raw bias of row-broadcast bias.
template <int N>
struct ColTile {
  int pos[N];
  float bias[N];
};

struct MaskCtx {
  const FlashParams* p;
  const float* bias_base;  // bias at (b, bias head), nullptr without bias
  bool row_bias;           // bias has a row dimension
  bool index;              // gathers present: positions come from the indices
  int shift;               // lk - lq without gathers, else 0
  int lq, lk;              // the block's query / key counts (BlockCoord)
  const int* compact_rows;  // q_rows of compact gathers (ascending positions), else nullptr
  int rows_q;               // valid query rows (BlockCoord::rows_q)
};

__device__ __forceinline__ MaskCtx make_mask_ctx(const FlashParams& p, const BlockCoord& c) {
  MaskCtx m;
  m.p = &p;
  m.bias_base = p.bias ? p.bias + c.b * p.bias_batch_stride + int64_t(c.h / p.bias_head_group) * p.bias_head_stride
                       : nullptr;
  m.row_bias = p.bias && p.bias_row_stride != 0;
  m.index = p.q_index != nullptr || p.k_index != nullptr;
  m.lq = c.lq;
  m.lk = c.lk;
  m.shift = m.index ? 0 : c.lk - c.lq;
  m.compact_rows = p.q_count ? c.q_rows : nullptr;
  m.rows_q = c.rows_q;
  return m;
}

// Column data for key block n_block (N columns), computed by the first N threads.
template <int N>
__device__ __forceinline__ void fill_cols(ColTile<N>& t, const MaskCtx& m, const BlockCoord& c, int n_block) {
  for (int j = threadIdx.x; j < N; j += blockDim.x) {
    const int col = n_block * N + j;
    const bool valid = col < m.lk;
    t.pos[j] = valid ? (c.k_rows ? c.k_rows[col] : col) : 0;
    t.bias[j] = (valid && m.bias_base && !m.row_bias) ? m.bias_base[col] : 0.f;
  }
}

__device__ __forceinline__ void fill_rows(RowMask& r, const MaskCtx& m, const BlockCoord& c, int row0_local) {
  const FlashParams& p = *m.p;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int i = row0_local + (lane >> 2) + 8 * k;
    const bool valid = i < m.rows_q;
    // a row past the compact count reads as a row past the end: scores_log2 masks all its columns
    r.row[k] = valid ? i : m.lq;
    r.pos[k] = valid ? (c.q_rows ? c.q_rows[i] : i + m.shift) : 0;
    if (p.row_thr && valid) {
      const int64_t o = c.b * p.thr_batch_stride + c.hk * p.thr_head_stride + i;
      r.thr[k] = p.row_thr[o];
      r.tie[k] = p.row_tie[o];
    } else {
      r.thr[k] = -INFINITY;
      r.tie[k] = 0x7fffffff;
    }
  }
}

// Whether key block n_block can hold a masked score for query rows [m0, m0 + BM) (or needs the bias
// added). When false the tile is fully visible and the element loop is skipped.
template <int BM, int BN>
__device__ __forceinline__ bool tile_needs_mask(const MaskCtx& m, int m0, int n_block) {
  const FlashParams& p = *m.p;
  if (p.bias || p.row_thr || p.self_mask) return true;
  const int n0 = n_block * BN;
  if (n0 + BN > m.lk) return true;
  if (m.compact_rows) {
    // positions ascend: the block's first row sees the fewest keys, its last valid row the most.
    // Rows past the count see no mask here: their q (and dO) rows are zero-filled and nothing of
    // theirs is stored (forward), or their lse is +inf so P = dS = 0 (backward).
    if (m0 >= m.rows_q) return true;
    const int last = min(m0 + BM, m.rows_q) - 1;
    if (p.causal && n0 + BN - 1 > m.compact_rows[m0]) return true;
    if (p.window_left >= 0 && n0 < m.compact_rows[last] - p.window_left) return true;
    if (p.window_right >= 0) return true;
    return false;
  }
  if (m.index) return true;
  if (p.causal && n0 + BN - 1 > m0 + m.shift) return true;
  if (p.window_left >= 0 && n0 < m0 + BM - 1 + m.shift - p.window_left) return true;
  if (p.window_right >= 0 && n0 + BN - 1 > m0 + m.shift + p.window_right) return true;
  return false;
}

// Turn raw dot products of a 16 x 8*NT warp tile into log2-domain scores:
// x = (scale * q.k + bias) * log2(e), -inf where masked, self_score where self-masked.
// `col0` is the warp tile's first column inside the key block, `n_block` the key block.
// When `self_flags` is given it receives a bit per element set where the self mask applied
// (the backward zeroes dS there, as the score is then a constant).
template <int NT, int BN>
__device__ __forceinline__ void scores_log2(float (&s)[NT][4], const MaskCtx& m, const RowMask& r,
                                            const ColTile<BN>& ct, int n_block, int col0, bool needs_mask,
                                            uint32_t* self_flags = nullptr) {
  const FlashParams& p = *m.p;
  const float sl2 = p.scale_log2;
  if (!needs_mask) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= sl2;
    }
    return;
  }
  const int lane = threadIdx.x & 31;
  uint32_t flags = 0;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int rk = e >> 1;
      const int cj = col0 + j * 8 + 2 * (lane & 3) + (e & 1);  // column inside the key block
      const int col = n_block * BN + cj;
      const int pj = ct.pos[cj];
      const int pi = r.pos[rk];
      bool vis = col < m.lk && r.row[rk] < m.lq;
      if (p.causal) vis = vis && pj <= pi;
      if (p.window_left >= 0) vis = vis && pj >= pi - p.window_left;
      if (p.window_right >= 0) vis = vis && pj <= pi + p.window_right;
      float b = 0.f;
      if (m.bias_base) {
        b = m.row_bias ? (vis ? m.bias_base[int64_t(r.row[rk]) * p.bias_row_stride + col] : 0.f) : ct.bias[cj];
      }
      if (p.row_thr) vis = vis && (b > r.thr[rk] || (b == r.thr[rk] && col <= r.tie[rk]));
      float x = -INFINITY;
      if (vis) {
        if (p.self_mask && pi == pj) {
          x = p.self_score * kLog2e;
          flags |= 1u << (j * 4 + e);
        } else {
          x = s[j][e] * sl2 + b * kLog2e;
        }
      }
      s[j][e] = x;
    }
  }
  if (self_flags) *self_flags = flags;
}

// The key blocks a query block visits (forward) or the query blocks a key block visits (backward):
// either a contiguous range or an entry of the tile-skipping list.
struct BlockIter {
  const int* list;  // nullptr: range [begin, end)
  int begin, end;   // range, or [0, count) into list
  __device__ __forceinline__ int count() const { return end - begin; }
  __device__ __forceinline__ int at(int t) const { return list ? list[t] : begin + t; }
};

// The tile-skipping list entry of outer block `outer` for (b, kv head).
__device__ __forceinline__ BlockIter listed_blocks(const FlashParams& p, const BlockCoord& c, int outer) {
  const int64_t o = (int64_t(c.b) * p.h_kv + c.hk) * p.num_outer_blocks + outer;
  BlockIter it;
  it.list = p.active_list + o * p.active_max;
  it.begin = 0;
  it.end = p.active_count[o];
  return it;
}

// Split-KV: split s of n takes the contiguous share [total * s / n, total * (s + 1) / n) of the
// blocks `it` visits (shares differ by at most one block; empty when total < n for some s).
__device__ __forceinline__ BlockIter split_share(BlockIter it, int s, int n) {
  const int total = it.count();
  const int lo = int(int64_t(total) * s / n);
  const int hi = int(int64_t(total) * (s + 1) / n);
  if (it.list) {
    it.list += lo;  // at(t) reads list[t]
    it.begin = 0;
  } else {
    it.begin += lo;
  }
  it.end = it.begin + (hi - lo);
  return it;
}

// Forward: key blocks for query block m_block.
template <int BM, int BN>
__device__ __forceinline__ BlockIter fwd_blocks(const FlashParams& p, const MaskCtx& m, const BlockCoord& c,
                                               int m_block) {
  if (p.active_list) return listed_blocks(p, c, m_block);
  BlockIter it;
  it.list = nullptr;
  it.begin = 0;
  it.end = ceil_div(m.lk, BN);
  if (m.compact_rows) {
    if (m_block * BM >= m.rows_q) {
      it.end = 0;
    } else {
      const int last = min(m_block * BM + BM, m.rows_q) - 1;
      if (p.causal) it.end = min(it.end, m.compact_rows[last] / BN + 1);
      if (p.window_left >= 0) it.begin = max(0, floor_div(m.compact_rows[m_block * BM] - p.window_left, BN));
    }
  } else if (!m.index) {
    if (p.causal) {
      const int last_col = m_block * BM + BM - 1 + m.shift;  // last column any row of the block sees
      it.end = last_col < 0 ? 0 : min(it.end, last_col / BN + 1);
    }
    if (p.window_left >= 0) {
      const int first_col = m_block * BM + m.shift - p.window_left;
      it.begin = max(0, floor_div(first_col, BN));
    }
    if (p.window_right >= 0) {  // last column any row of the block sees through the right window
      const int last_col = m_block * BM + BM - 1 + m.shift + p.window_right;
      it.end = last_col < 0 ? 0 : min(it.end, last_col / BN + 1);
    }
  }
  if (it.end < it.begin) it.end = it.begin;
  return it;
}

// Backward: query blocks for key block n_block.
template <int BM, int BN>
__device__ __forceinline__ BlockIter bwd_blocks(const FlashParams& p, const MaskCtx& m, const BlockCoord& c,
                                               int n_block) {
  if (p.active_list) return listed_blocks(p, c, n_block);
  BlockIter it;
  it.list = nullptr;
  it.begin = 0;
  it.end = ceil_div(m.lq, BM);
  if (m.compact_rows) {
    it.end = ceil_div(m.rows_q, BM);
    if (p.causal) {
      // first valid row whose position reaches the block's first key (binary search, positions ascend)
      int lo = 0, hi = m.rows_q;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (m.compact_rows[mid] < n_block * BN) lo = mid + 1; else hi = mid;
      }
      it.begin = lo / BM;
    }
    if (p.window_left >= 0) {
      // last valid row whose position is at most the block's last key + window
      const int lim = n_block * BN + BN - 1 + p.window_left;
      int lo = 0, hi = m.rows_q;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (m.compact_rows[mid] <= lim) lo = mid + 1; else hi = mid;
      }
      it.end = min(it.end, ceil_div(lo, BM));
    }
  } else if (!m.index) {
    if (p.causal) {
      const int first_row = n_block * BN - m.shift;  // first row that sees the block's first column
      it.begin = max(0, floor_div(first_row, BM));
    }
    if (p.window_left >= 0) {
      const int last_row = n_block * BN + BN - 1 - m.shift + p.window_left;
      it.end = last_row < 0 ? 0 : min(it.end, last_row / BM + 1);
    }
    if (p.window_right >= 0) {  // first row whose right window reaches the block's first column
      const int first_row = n_block * BN - m.shift - p.window_right;
      it.begin = max(it.begin, floor_div(first_row, BM));
    }
  }
  if (it.end < it.begin) it.end = it.begin;
  return it;
}

}  // namespace attnkit::flash
