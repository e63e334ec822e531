// Dynamic Mask Attention, CUDA mask selection: per-row top-keep thresholds and tile lists, without
// any Lq x Lk buffer. Per segment (b, KV head), with N = Lk:
//
//   1. keys: 64-bit (segment << 32 | order key of the bias, NaN last); one cub radix sort of all
//      segments (stable, so ties keep index order) gives sorted_idx and rank[j]  -- O(N) passes.
//   2. non-causal: every row's threshold is the key of rank keep - 1.
//      causal: row i needs the keep-th smallest rank among rank[0 .. n_i), n_i = i + Lk - Lq + 1:
//      a prefix order statistic. A wavelet matrix over the rank sequence (ceil(log2 N) levels of N
//      bits with per-word zero counts, built by one CTA per segment as stable bit partitions)
//      answers each row in O(log N) with two popcounts per level -- O(N log N) bits in total.
//   3. tile lists: flag each (query block, key block) pair (O(1) per pair from the smallest rank
//      of the key block and the first row's rank threshold, which is the block's loosest since
//      thresholds only tighten as rows see more keys; per element on the diagonal), then compact
//      the flags into ascending lists for both directions.
// Per-batch key counts (seqused_k): keys past a segment's count sort after all of its keys (they
// take the largest ranks), rows align to the segment's own count, and key blocks past it are never
// flagged; the ranks of the used keys, and so the thresholds, are those of a selection over the
// used keys alone.
// The compatibility path (masked_bias) flags tiles from its dense bias (any element > -inf) and
// reuses the compaction.
#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "common/launch.cuh"
#include "dma/dma_params.h"
#include "dma/dma_cuda.h"
#include "flash/flash.h"

#include <c10/cuda/CUDAException.h>

namespace attnkit::dma {

static_assert(kListBlock == flash::kFwdBlockM && kListBlock == flash::kFwdBlockN &&
                  kListBlock == flash::kBwdBlockM && kListBlock == flash::kBwdBlockN,
              "DMA tile lists are built at the flash core's tile granularity");

namespace {

constexpr int kThreads = 256;
constexpr int kBuildThreads = 1024;  // wavelet build: one CTA per segment
constexpr int kBuildWordsPerWarp = 4;

inline int grid_for(int64_t n, int threads = kThreads) {
  const int64_t g = (n + threads - 1) / threads;
  return int(g < 65535 * 16 ? (g < 1 ? 1 : g) : 65535 * 16);  // grid-stride loops cover the rest
}

// ---- workspace layout ----
struct Layout {
  size_t keys_in = 0, keys_out = 0, vals_in = 0, sorted = 0, rank = 0, seq_a = 0, seq_b = 0, bits = 0, zc = 0,
         prank = 0, minrank = 0, flags = 0, temp = 0, temp_bytes = 0, total = 0;
};

int sort_end_bit(int nseg) {
  int bits = 0;
  while (bits < 31 && (int64_t(1) << bits) < nseg) ++bits;
  return 32 + bits;
}

Layout make_layout(const SelectParams& p) {
  Layout L;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t o = off;
    off += (bytes + 255) & ~size_t(255);
    return o;
  };
  const size_t n = size_t(p.nseg) * p.lk;
  if (!p.all_kept) {
    L.keys_in = take(n * 8);
    L.keys_out = take(n * 8);
    L.vals_in = take(n * 4);
    L.sorted = take(n * 4);
    L.rank = take(n * 4);
    L.minrank = take(size_t(p.nseg) * p.nkb * 4);
    if (p.causal) {
      L.seq_a = take(n * 4);
      L.seq_b = take(n * 4);
      L.bits = take(size_t(p.nseg) * p.levels * p.nwords * 4);
      L.zc = take(size_t(p.nseg) * p.levels * (p.nwords + 1) * 4);
    }
    size_t tb = 0;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        nullptr, tb, static_cast<const uint64_t*>(nullptr), static_cast<uint64_t*>(nullptr),
        static_cast<const int*>(nullptr), static_cast<int*>(nullptr), int(n), 0, sort_end_bit(p.nseg)));
    L.temp_bytes = tb;
    L.temp = take(tb);
  }
  L.prank = take(size_t(p.nseg) * p.lq * 4);
  L.flags = take(size_t(p.nseg) * p.nqb * p.nkb);
  L.total = off;
  return L;
}

template <typename T>
T* at_off(void* base, size_t off) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + off);
}

// ---- keys and ranks ----
__device__ __forceinline__ bool is_nan_bits(float x) {
  return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u;  // bit test: immune to fast-math folding
}

__device__ __forceinline__ uint32_t desc_key(float x) {
  if (is_nan_bits(x)) return 0xFFFFFFFFu;  // after every number
  uint32_t u = __float_as_uint(x);
  if (x == 0.f) u = 0u;  // -0 == +0 (and, with flush-to-zero, denormals == 0) as the core compares
  const uint32_t asc = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~asc;  // larger bias -> smaller key
}

// Keys a segment uses: its batch's seqused_k entry, else all lk.
__host__ __device__ __forceinline__ int seg_keys(const int* seqused_k, int h_kv, int64_t seg, int lk) {
  return seqused_k ? seqused_k[seg / h_kv] : lk;
}

__global__ void k_make_keys(const float* __restrict__ bias, int64_t n, int lk, const int* __restrict__ seqused_k,
                            int h_kv, uint64_t* __restrict__ keys, int* __restrict__ vals) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t seg = idx / lk;
    const int j = int(idx - seg * lk);
    // unused keys: the largest key of the segment, after its NaNs (the stable sort keeps index order)
    const uint32_t key = j < seg_keys(seqused_k, h_kv, seg, lk) ? desc_key(bias[idx]) : 0xFFFFFFFFu;
    keys[idx] = (uint64_t(seg) << 32) | key;
    vals[idx] = j;
  }
}

__global__ void k_ranks(const int* __restrict__ sorted, int64_t n, int lk, int* __restrict__ rank) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t seg = idx / lk;
    rank[seg * lk + sorted[idx]] = int(idx - seg * lk);
  }
}

__global__ void k_minrank(const int* __restrict__ rank, int nseg, int lk, int nkb, int* __restrict__ minrank) {
  const int64_t total = int64_t(nseg) * nkb;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t seg = idx / nkb;
    const int kb = int(idx - seg * nkb);
    const int j0 = kb * kListBlock, j1 = min(j0 + kListBlock, lk);
    const int* r = rank + seg * lk;
    int m = INT_MAX;
    for (int j = j0; j < j1; ++j) m = min(m, r[j]);
    minrank[idx] = m;
  }
}

// ---- wavelet matrix over the rank sequence ----
// Values at every level are a permutation of [0, n): the number of zeros of bit b is closed-form.
__host__ __device__ __forceinline__ int zeros_of_bit(int n, int b) {
  const int64_t period = int64_t(1) << (b + 1), half = int64_t(1) << b;
  const int64_t full = (int64_t(n) / period) * half;
  const int64_t rem = int64_t(n) % period;
  return int(full + (rem < half ? rem : half));
}

// Level l partitions the sequence by bit (levels - 1 - l), zeros first, stably. bits[l][w] holds the
// bits of positions 32w..32w+31 of level l; zc[l][w] the zeros of level l before position 32w
// (zc[l][nwords] = all of them).
__global__ void __launch_bounds__(kBuildThreads) k_wavelet_build(const int* rank, int* seq_a, int* seq_b,
                                                                 uint32_t* __restrict__ wm_bits,
                                                                 uint32_t* __restrict__ wm_zc, int lk, int levels,
                                                                 int nwords) {
  constexpr int kWarps = kBuildThreads / 32;
  constexpr int E = kBuildWordsPerWarp;
  constexpr int kWords = kWarps * E;  // words per chunk
  constexpr int kChunk = kWords * 32;
  static_assert(kWarps == 32, "the chunk scan gives warp 0's 32 lanes E words each");
  __shared__ int s_cnt[kWords];
  __shared__ int s_total;
  const int64_t seg = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const uint32_t lt_mask = (1u << lane) - 1u;
  const int* src = rank + seg * lk;
  int* const buf_a = seq_a + seg * lk;
  int* const buf_b = seq_b + seg * lk;
  for (int l = 0; l < levels; ++l) {
    const int b = levels - 1 - l;
    const int Z = zeros_of_bit(lk, b);
    int* dst = (l & 1) ? buf_b : buf_a;
    uint32_t* bits = wm_bits + (seg * levels + l) * nwords;
    uint32_t* zc = wm_zc + (seg * levels + l) * (nwords + 1);
    int running = 0;  // zeros before the current chunk (uniform over the block)
    for (int c0 = 0; c0 < lk; c0 += kChunk) {
      int v[E];
      bool one[E];
      uint32_t zmask[E];
#pragma unroll
      for (int e = 0; e < E; ++e) {  // issue the loads first
        const int x = c0 + (e * kWarps + warp) * 32 + lane;
        v[e] = x < lk ? src[x] : 0;
      }
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int wi = e * kWarps + warp;  // word index inside the chunk (ascending with positions)
        const int x = c0 + wi * 32 + lane;
        const bool valid = x < lk;
        one[e] = valid && ((v[e] >> b) & 1);
        const uint32_t ones = __ballot_sync(0xffffffffu, one[e]);
        zmask[e] = __ballot_sync(0xffffffffu, valid) & ~ones;
        if (lane == 0) {
          s_cnt[wi] = __popc(zmask[e]);
          const int w = (c0 >> 5) + wi;
          if (w < nwords) bits[w] = ones;
        }
      }
      __syncthreads();
      if (warp == 0) {  // exclusive scan of the chunk's word zero counts, in word order
        int local[E];
        int sum = 0;
#pragma unroll
        for (int e = 0; e < E; ++e) {
          local[e] = s_cnt[lane * E + e];
          sum += local[e];
        }
        int incl = sum;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const int t = __shfl_up_sync(0xffffffffu, incl, off);
          if (lane >= off) incl += t;
        }
        int excl = running + incl - sum;
#pragma unroll
        for (int e = 0; e < E; ++e) {
          s_cnt[lane * E + e] = excl;
          excl += local[e];
        }
        if (lane == 31) s_total = incl;
      }
      __syncthreads();
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int wi = e * kWarps + warp;
        const int x = c0 + wi * 32 + lane;
        const int zb = s_cnt[wi];  // zeros before this word
        if (lane == 0 && (c0 >> 5) + wi < nwords) zc[(c0 >> 5) + wi] = uint32_t(zb);
        if (x < lk) {
          const int zeros_before = zb + __popc(zmask[e] & lt_mask);
          dst[one[e] ? Z + (x - zeros_before) : zeros_before] = v[e];
        }
      }
      running += s_total;
      __syncthreads();  // s_cnt / s_total reuse; dst complete before the next level reads it
    }
    if (threadIdx.x == 0) zc[nwords] = uint32_t(running);
    src = dst;
  }
}

__device__ __forceinline__ int wm_rank0(const uint32_t* bits, const uint32_t* zc, int x) {
  const int w = x >> 5, r = x & 31;
  int c = int(zc[w]);
  if (r) c += __popc(~bits[w] & ((1u << r) - 1u));
  return c;
}

// k-th smallest (1-based) value among positions [0, n) of the level-0 sequence.
__device__ int wm_quantile(const uint32_t* bits_seg, const uint32_t* zc_seg, int levels, int nwords, int lk, int n,
                           int k) {
  int lo = 0, hi = n, val = 0;
  for (int l = 0; l < levels; ++l) {
    const int b = levels - 1 - l;
    const uint32_t* bits = bits_seg + int64_t(l) * nwords;
    const uint32_t* zc = zc_seg + int64_t(l) * (nwords + 1);
    const int zlo = wm_rank0(bits, zc, lo), zhi = wm_rank0(bits, zc, hi);
    const int zeros = zhi - zlo;
    if (k <= zeros) {
      lo = zlo;
      hi = zhi;
    } else {
      k -= zeros;
      const int Z = zeros_of_bit(lk, b);
      lo = Z + (lo - zlo);
      hi = Z + (hi - zhi);
      val |= 1 << b;
    }
  }
  return val;
}

// ---- per-row thresholds ----
__global__ void k_query(SelectParams p, const int* __restrict__ sorted, const uint32_t* __restrict__ wm_bits,
                        const uint32_t* __restrict__ wm_zc, int* __restrict__ prank) {
  const int64_t total = int64_t(p.nseg) * p.lq;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t seg = idx / p.lq;
    const int i = int(idx - seg * p.lq);
    const int lk_s = seg_keys(p.seqused_k, p.h_kv, seg, p.lk);
    int64_t n = p.causal ? int64_t(i) + (lk_s - p.lq) + 1 : int64_t(lk_s);  // visible keys of row i
    if (n > lk_s) n = lk_s;
    int rank_thr = p.lk;  // keep all visible keys
    if (!p.all_kept && n > p.keep) {
      rank_thr = p.causal ? wm_quantile(wm_bits + seg * p.levels * p.nwords, wm_zc + seg * p.levels * (p.nwords + 1),
                                        p.levels, p.nwords, p.lk, int(n), p.keep)
                          : p.keep - 1;
    }
    float thr = -INFINITY;
    int tie = kTieAll;
    if (rank_thr < p.lk) {
      const int j = sorted[seg * p.lk + rank_thr];
      const float x = p.bias[seg * p.lk + j];
      if (!is_nan_bits(x)) {
        thr = x;
        tie = j;
      }
    }
    p.thr[idx] = thr;
    p.tie[idx] = tie;
    prank[idx] = rank_thr;
  }
}

// ---- tile flags ----
__global__ void k_dma_flags(SelectParams p, const int* __restrict__ rank, const int* __restrict__ minrank,
                            const int* __restrict__ prank, uint8_t* __restrict__ flags) {
  const int64_t total = int64_t(p.nseg) * p.nqb * p.nkb;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int kb = int(idx % p.nkb);
    const int64_t t = idx / p.nkb;
    const int qb = int(t % p.nqb);
    const int64_t seg = t / p.nqb;
    // the segment's own key count and alignment; minrank may cover unused keys, whose ranks exceed
    // every rank threshold of a used key (and a keep-all row's threshold only matters when the block
    // holds a used key it sees)
    const int lk_s = seg_keys(p.seqused_k, p.h_kv, seg, p.lk);
    const int64_t shift = int64_t(lk_s) - p.lq;
    const bool all_kept = p.all_kept || lk_s <= p.keep;
    const int64_t i0 = int64_t(qb) * kListBlock, i1 = min(i0 + kListBlock, int64_t(p.lq)) - 1;
    const int64_t j0 = int64_t(kb) * kListBlock, j1 = min(j0 + kListBlock, int64_t(lk_s)) - 1;
    const int* pr = prank + seg * p.lq;
    bool act;
    if (j0 >= lk_s) {
      act = false;  // unused keys only
    } else if (!p.causal) {
      act = all_kept || minrank[seg * p.nkb + kb] <= pr[0];
    } else if (j0 > i1 + shift) {
      act = false;  // no row of the block sees the key block
    } else if (j1 <= i0 + shift) {
      act = all_kept || minrank[seg * p.nkb + kb] <= pr[i0];  // every row sees all of it
    } else if (all_kept) {
      act = true;
    } else {
      act = false;
      const int* r = rank + seg * p.lk;
      const int64_t jend = min(j1, i1 + shift);
      for (int64_t j = j0; j <= jend && !act; ++j) {
        const int64_t i = max(i0, j - shift);  // the first row of the block that sees key j
        act = r[j] <= pr[i];
      }
    }
    flags[idx] = act ? 1 : 0;
  }
}

// Compatibility path: a tile is active when a visible element of it has a bias > -inf in some
// output head of the KV head. One CTA per tile; grid-stride over (seg, qb, kb).
__global__ void k_bias_flags(BiasListParams p, uint8_t* __restrict__ flags) {
  const int64_t total = int64_t(p.batch) * p.h_kv * p.nqb * p.nkb;
  const int c = threadIdx.x % kListBlock, r0 = threadIdx.x / kListBlock;
  constexpr int kRowStep = kThreads / kListBlock;
  for (int64_t idx = blockIdx.x; idx < total; idx += gridDim.x) {
    const int kb = int(idx % p.nkb);
    const int64_t t = idx / p.nkb;
    const int qb = int(t % p.nqb);
    const int64_t seg = t / p.nqb;
    const int g = int(seg % p.h_kv);
    const int64_t b = seg / p.h_kv;
    const int64_t i0 = int64_t(qb) * kListBlock, i1 = min(i0 + kListBlock, int64_t(p.lq)) - 1;
    const int64_t j = int64_t(kb) * kListBlock + c;
    bool act = false;
    if (!(p.causal && int64_t(kb) * kListBlock > i1 + p.shift) && j < p.lk) {
      const int hb_lo = (g * p.kv_group) / p.bias_head_group;
      const int hb_hi = ((g + 1) * p.kv_group - 1) / p.bias_head_group;
      for (int hb = hb_lo; hb <= hb_hi && !act; ++hb) {
        const float* base = p.bias + b * p.bias_batch_stride + int64_t(hb) * p.bias_head_stride + j;
        for (int64_t i = i0 + r0; i <= i1; i += kRowStep) {
          if (p.causal && j > i + p.shift) continue;
          if (base[i * p.bias_row_stride] != -INFINITY) {
            act = true;
            break;
          }
        }
      }
    }
    const int any = __syncthreads_or(act);
    if (threadIdx.x == 0) flags[idx] = any ? 1 : 0;
  }
}

// ---- compaction ----
// flags [rows][ncols] -> list [rows][width] (ascending columns, -1 padded), count [rows]; one warp per row.
__global__ void k_compact_rows(const uint8_t* __restrict__ flags, int64_t rows, int ncols, int* __restrict__ list,
                               int width, int* __restrict__ count) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32; row < rows; row += warps) {
    const uint8_t* f = flags + row * ncols;
    int* out = list + row * width;
    int c = 0;
    for (int base = 0; base < ncols; base += 32) {
      const int col = base + lane;
      const bool on = col < ncols && f[col];
      const uint32_t m = __ballot_sync(0xffffffffu, on);
      const int pos = c + __popc(m & ((1u << lane) - 1u));
      if (on && pos < width) out[pos] = col;
      c += __popc(m);
    }
    c = min(c, width);  // cannot trigger: width bounds the count (dma_params.h)
    for (int t = c + lane; t < width; t += 32) out[t] = -1;
    if (lane == 0) count[row] = c;
  }
}

// flags [seg][nrows][ncols] -> per column: list [seg][ncols][nrows] of rows, count [seg][ncols].
__global__ void k_compact_cols(const uint8_t* __restrict__ flags, int nseg, int nrows, int ncols, int* __restrict__ list,
                               int* __restrict__ count) {
  const int64_t total = int64_t(nseg) * ncols;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t seg = idx / ncols;
    const int col = int(idx - seg * ncols);
    const uint8_t* f = flags + seg * nrows * ncols + col;
    int* out = list + idx * nrows;
    int c = 0;
    for (int r = 0; r < nrows; ++r)
      if (f[int64_t(r) * ncols]) out[c++] = r;
    const int n = c;
    for (; c < nrows; ++c) out[c] = -1;
    count[idx] = n;
  }
}

void compact(const uint8_t* flags, int nseg, int nqb, int nkb, int* fwd_list, int fwd_width, int* fwd_count,
             int* bwd_list, int* bwd_count, cudaStream_t stream) {
  const int64_t rows = int64_t(nseg) * nqb;
  if (fwd_list && rows > 0) {
    const int64_t threads = rows * 32;
    ATTNKIT_LAUNCH_KERNEL(k_compact_rows, grid_for(threads), kThreads, 0, stream,
        flags, rows, nkb, fwd_list, fwd_width, fwd_count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (bwd_list && int64_t(nseg) * nkb > 0) {
    ATTNKIT_LAUNCH_KERNEL(k_compact_cols, grid_for(int64_t(nseg) * nkb), kThreads, 0, stream,
        flags, nseg, nqb, nkb, bwd_list, bwd_count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

size_t select_workspace_bytes(const SelectParams& p) {
  return make_layout(p).total;
}

void select_cuda(const SelectParams& p, cudaStream_t stream) {
  const Layout L = make_layout(p);
  void* ws = p.workspace;
  const int64_t n = int64_t(p.nseg) * p.lk;
  int* prank = at_off<int>(ws, L.prank);
  uint8_t* flags = at_off<uint8_t>(ws, L.flags);
  const int* sorted = nullptr;
  const int* rank = nullptr;
  const int* minrank = nullptr;
  const uint32_t* wm_bits = nullptr;
  const uint32_t* wm_zc = nullptr;
  if (!p.all_kept && n > 0) {
    uint64_t* keys_in = at_off<uint64_t>(ws, L.keys_in);
    uint64_t* keys_out = at_off<uint64_t>(ws, L.keys_out);
    int* vals_in = at_off<int>(ws, L.vals_in);
    int* srt = at_off<int>(ws, L.sorted);
    int* rk = at_off<int>(ws, L.rank);
    int* mr = at_off<int>(ws, L.minrank);
    ATTNKIT_LAUNCH_KERNEL(k_make_keys, grid_for(n), kThreads, 0, stream, p.bias, n, p.lk, p.seqused_k, p.h_kv,
        keys_in, vals_in);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    size_t tb = L.temp_bytes;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(at_off<void>(ws, L.temp), tb, keys_in, keys_out, vals_in, srt,
                                                   int(n), 0, sort_end_bit(p.nseg), stream));
    ATTNKIT_LAUNCH_KERNEL(k_ranks, grid_for(n), kThreads, 0, stream, srt, n, p.lk, rk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ATTNKIT_LAUNCH_KERNEL(k_minrank, grid_for(int64_t(p.nseg) * p.nkb), kThreads, 0, stream,
        rk, p.nseg, p.lk, p.nkb, mr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.causal) {
      uint32_t* bits = at_off<uint32_t>(ws, L.bits);
      uint32_t* zc = at_off<uint32_t>(ws, L.zc);
      ATTNKIT_LAUNCH_KERNEL(k_wavelet_build, p.nseg, kBuildThreads, 0, stream,
          rk, at_off<int>(ws, L.seq_a), at_off<int>(ws, L.seq_b), bits, zc, p.lk, p.levels, p.nwords);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      wm_bits = bits;
      wm_zc = zc;
    }
    sorted = srt;
    rank = rk;
    minrank = mr;
  }
  const int64_t rows = int64_t(p.nseg) * p.lq;
  if (rows > 0) {
    ATTNKIT_LAUNCH_KERNEL(k_query, grid_for(rows), kThreads, 0, stream, p, sorted, wm_bits, wm_zc, prank);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t pairs = int64_t(p.nseg) * p.nqb * p.nkb;
  if (pairs > 0) {
    ATTNKIT_LAUNCH_KERNEL(k_dma_flags, grid_for(pairs), kThreads, 0, stream, p, rank, minrank, prank, flags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  compact(flags, p.nseg, p.nqb, p.nkb, p.fwd_list, p.fwd_width, p.fwd_count, p.bwd_list, p.bwd_count, stream);
}

size_t bias_lists_workspace_bytes(const BiasListParams& p) {
  return size_t(p.batch) * p.h_kv * p.nqb * p.nkb;
}

void bias_lists_cuda(const BiasListParams& p, cudaStream_t stream) {
  const int64_t pairs = int64_t(p.batch) * p.h_kv * p.nqb * p.nkb;
  uint8_t* flags = static_cast<uint8_t*>(p.workspace);
  if (pairs > 0) {
    const int64_t grid = pairs < (int64_t(1) << 30) ? pairs : (int64_t(1) << 30);
    ATTNKIT_LAUNCH_KERNEL(k_bias_flags, int(grid), kThreads, 0, stream, p, flags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  compact(flags, p.batch * p.h_kv, p.nqb, p.nkb, p.fwd_list, p.nkb, p.fwd_count, p.bwd_list, p.bwd_count, stream);
}

}  // namespace attnkit::dma
