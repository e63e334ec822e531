// Routing, CUDA: scores of every token against every centroid (a tiled fp32 product with the row
// norms folded in), the argmax cluster per token, and the balanced top-w selection per centroid
// (radix select over the L scores of a row, then an ordered compaction, so the list comes out sorted
// by position with ties going to the lower position).
#include <c10/cuda/CUDAException.h>

#include <cfloat>

#include "routing/routing_device.cuh"

namespace attnkit::routing {
namespace {

constexpr int kTileL = 64;  // tokens per block
constexpr int kTileC = 64;  // centroids per block
constexpr int kTileD = 32;  // head-dim chunk
constexpr int kScoreThreads = 256;

// Each thread owns a 4 x 4 micro-tile: tokens 4*tx .. 4*tx+3 and centroids 4*ty .. 4*ty+3, read from
// shared memory as float4 (pitch kPitch keeps them 16-byte aligned).
constexpr int kPitch = kTileL + 4;

template <typename T>
__global__ void __launch_bounds__(kScoreThreads) routing_scores_kernel(ScoreParams p) {
  static_assert(kTileL == kTileC && kTileL == 4 * 16, "tile shape");
  __shared__ __align__(16) float xs[kTileD][kPitch];
  __shared__ __align__(16) float cs[kTileD][kPitch];
  __shared__ float inv_norm[kTileL];
  __shared__ unsigned long long best_s[kTileL];

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int bh = blockIdx.z;
  const int b = bh / p.H, h = bh % p.H;
  const int l0 = blockIdx.x * kTileL, c0 = blockIdx.y * kTileC;
  const T* x = static_cast<const T*>(p.x) + static_cast<int64_t>(b) * p.x_batch_stride +
               static_cast<int64_t>(h) * p.x_head_stride;
  const float* mu = p.centroids + static_cast<int64_t>(h) * p.C * p.D;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  float ss = 0.f;  // sum of squares of row `tid` (tid < kTileL)
  if (tid < kTileL) best_s[tid] = 0ull;

  for (int d0 = 0; d0 < p.D; d0 += kTileD) {
    const int dd = tid % kTileD;
    const int d = d0 + dd;
#pragma unroll
    for (int k = 0; k < kTileL / (kScoreThreads / kTileD); ++k) {
      const int r = tid / kTileD + k * (kScoreThreads / kTileD);
      const int l = l0 + r;
      xs[dd][r] = (l < p.L && d < p.D) ? to_f32(x[static_cast<int64_t>(l) * p.x_row_stride + d]) : 0.f;
      const int c = c0 + r;
      cs[dd][r] = (c < p.C && d < p.D) ? mu[static_cast<int64_t>(c) * p.D + d] : 0.f;
    }
    __syncthreads();
    if (tid < kTileL) {
#pragma unroll 8
      for (int e = 0; e < kTileD; ++e) ss += xs[e][tid] * xs[e][tid];
    }
#pragma unroll 8
    for (int e = 0; e < kTileD; ++e) {
      const float4 xv = *reinterpret_cast<const float4*>(&xs[e][4 * tx]);
      const float4 cv = *reinterpret_cast<const float4*>(&cs[e][4 * ty]);
      const float xa[4] = {xv.x, xv.y, xv.z, xv.w};
      const float ca[4] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xa[i], ca[j], acc[i][j]);
    }
    __syncthreads();
  }
  if (tid < kTileL) inv_norm[tid] = 1.f / fmaxf(sqrtf(ss), 1e-12f);
  __syncthreads();

  float sc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) sc[i][j] = acc[i][j] * inv_norm[4 * tx + i];

  if (p.scores != nullptr) {
    bool padded[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int l = l0 + 4 * tx + i;
      padded[i] = p.pad != nullptr && l < p.L && p.pad[static_cast<int64_t>(b) * p.L + l];
    }
    const int lb = l0 + 4 * tx;
    const bool vec = (p.L % 4 == 0) && lb + 3 < p.L;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = c0 + 4 * ty + j;
      if (c >= p.C) continue;
      float* row = p.scores + (static_cast<int64_t>(bh) * p.C + c) * p.L;
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = padded[i] ? -INFINITY : sc[i][j];
      if (vec) {
        *reinterpret_cast<float4*>(row + lb) = make_float4(v[0], v[1], v[2], v[3]);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (lb + i < p.L) row[lb + i] = v[i];
      }
    }
  }
  if (p.best != nullptr) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = 4 * tx + i;
      if (l0 + r >= p.L) continue;
      unsigned long long mine = 0ull;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = c0 + 4 * ty + j;
        if (c >= p.C) continue;
        const unsigned long long key =
            (static_cast<unsigned long long>(score_key(sc[i][j])) << 32) | static_cast<unsigned>(0xFFFFFFFFu - c);
        mine = key > mine ? key : mine;
      }
      if (mine != 0ull) atomicMax(&best_s[r], mine);
    }
    __syncthreads();
    if (tid < kTileL && l0 + tid < p.L && best_s[tid] != 0ull)
      atomicMax(&p.best[static_cast<int64_t>(bh) * p.L + l0 + tid], best_s[tid]);
  }
}

__global__ void extract_assign_kernel(const unsigned long long* best, int64_t B, int H, int L, int* assign) {
  const int64_t n = B * H * static_cast<int64_t>(L);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t l = i % L;
    const int64_t bh = i / L;
    const int64_t b = bh / H, h = bh % H;
    const unsigned c = 0xFFFFFFFFu - static_cast<unsigned>(best[i] & 0xFFFFFFFFull);
    assign[(b * L + l) * H + h] = static_cast<int>(c);
  }
}

constexpr int kSelectThreads = 512;

// One block per row. Radix select of the w-th largest key (8 bits per pass, MSB first), then an
// ordered compaction: an element is taken when key > T, or key == T among the first `need` such
// elements in position order; its slot is (#greater before it) + min(#equal before it, need).
__global__ void __launch_bounds__(kSelectThreads)
    topw_select_kernel(const float* __restrict__ scores, int64_t rows0, int L, int w, int* out0, int* out1) {
  constexpr int kWarps = kSelectThreads / 32;
  __shared__ int hist[256];
  __shared__ unsigned s_digit;
  __shared__ int s_need;
  __shared__ int warp_tot[kWarps];

  const int64_t row = blockIdx.x;
  const float* s = scores + row * static_cast<int64_t>(L);
  int* out = row < rows0 ? out0 + row * w : out1 + (row - rows0) * w;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  unsigned prefix = 0u, mask = 0u;
  int need = w;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kSelectThreads) hist[i] = 0;
    __syncthreads();
    for (int base = 0; base < L; base += kSelectThreads) {
      const int l = base + tid;
      const unsigned u = l < L ? score_key(s[l]) : 0u;
      const bool match = l < L && (u & mask) == prefix;
      const unsigned bin = (u >> shift) & 255u;
      const unsigned voters = __ballot_sync(0xFFFFFFFFu, match);
      if (match) {
        const unsigned peers = __match_any_sync(voters, bin);
        if (lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
      }
    }
    __syncthreads();
    if (tid == 0) {
      int cum = 0, bin = 255;
      for (; bin > 0; --bin) {
        if (cum + hist[bin] >= need) break;
        cum += hist[bin];
      }
      s_digit = static_cast<unsigned>(bin);
      s_need = need - cum;
    }
    __syncthreads();
    prefix |= s_digit << shift;
    mask |= 255u << shift;
    need = s_need;
    __syncthreads();
  }

  const unsigned thr = prefix;
  int base_gt = 0, base_eq = 0;
  for (int base = 0; base < L; base += kSelectThreads) {
    const int l = base + tid;
    const unsigned u = l < L ? score_key(s[l]) : 0u;
    const int gt = (l < L && u > thr) ? 1 : 0;
    const int eq = (l < L && u == thr) ? 1 : 0;
    const int v = (gt << 16) | eq;  // both counts stay below 2^16 within a chunk
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xFFFFFFFFu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int t = lane < kWarps ? warp_tot[lane] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xFFFFFFFFu, t, o);
        if (lane >= o) t += y;
      }
      if (lane < kWarps) warp_tot[lane] = t;
    }
    __syncthreads();
    const int excl = incl - v + (warp > 0 ? warp_tot[warp - 1] : 0);
    const int total = warp_tot[kWarps - 1];
    const int gt_before = base_gt + (excl >> 16);
    const int eq_before = base_eq + (excl & 0xFFFF);
    if (gt || (eq && eq_before < need)) out[gt_before + min(eq_before, need)] = l;
    base_gt += total >> 16;
    base_eq += total & 0xFFFF;
    __syncthreads();
  }
}

}  // namespace

void launch_routing_scores(const ScoreParams& p, cudaStream_t stream) {
  if (static_cast<int64_t>(p.B) * p.H * p.L * p.C == 0) return;
  TORCH_CHECK(static_cast<int64_t>(p.B) * p.H <= 65535, "q: batch * heads must be at most 65535 on CUDA (got ",
              static_cast<int64_t>(p.B) * p.H, ")");
  dim3 grid(ceil_div_i(p.L, kTileL), ceil_div_i(p.C, kTileC), p.B * p.H);
  ATTNKIT_ROUTING_TYPE_SWITCH(p.dtype, T, [&] {
    ATTNKIT_LAUNCH_KERNEL(routing_scores_kernel<T>, grid, kScoreThreads, 0, stream, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_extract_assign(const unsigned long long* best, int64_t B, int H, int L, int* assign, cudaStream_t stream) {
  const int64_t n = B * H * static_cast<int64_t>(L);
  if (n == 0) return;
  ATTNKIT_LAUNCH_KERNEL(extract_assign_kernel, grid_1d(n, 256), 256, 0, stream, best, B, H, L, assign);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_topw_select(const float* scores, int64_t rows, int64_t rows0, int L, int w, int* out0, int* out1,
                        cudaStream_t stream) {
  if (rows == 0 || w == 0) return;
  TORCH_CHECK(rows <= 0x7FFFFFFF, "routing_assign: batch * heads * clusters must be < 2^31 on CUDA (got ", rows, ")");
  ATTNKIT_LAUNCH_KERNEL(topw_select_kernel, static_cast<unsigned>(rows), kSelectThreads, 0, stream,
      scores, rows0, L, w, out0, out1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attnkit::routing
