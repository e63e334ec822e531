// Mixture-of-Head, CUDA: the counting sort that turns the per-token head selections into one compact,
// position-sorted token list per (batch, head), the flash core's compact query gathers.
//
// Three launches, O(B * L * K) work plus O(B * h_q * L / 32) bit counts:
//   1. per (chunk of kRouteChunk tokens, batch): a bitmap bit[h][t] of the chunk in shared memory
//      (atomicOr per selection), stored, and the chunk's count per head (popcounts);
//   2. per (batch, head): exclusive scan of the chunk counts -> chunk offsets, total -> q_count;
//   3. per (chunk, batch), one thread per token: the list row of selection (t, h) is the chunk offset
//      plus the number of chunk tokens before t that selected h (popcounts of the bitmap prefix).
// Rows therefore follow positions, and the result does not depend on the order of the atomics.
#include "common/launch.cuh"
#include "moh/moh_cuda.h"

namespace attnkit::moh {
namespace {

constexpr int kWords = kRouteChunk / 32;  // bitmap words per head and chunk

__global__ void __launch_bounds__(kRouteChunk) route_bits_kernel(const RouteParams p) {
  ATTNKIT_DYNAMIC_SMEM(smem_raw);
  uint32_t* sbits = reinterpret_cast<uint32_t*>(smem_raw);  // [h_q][kWords]
  const int chunk = blockIdx.x, b = blockIdx.y;
  for (int i = threadIdx.x; i < p.h_q * kWords; i += blockDim.x) sbits[i] = 0u;
  __syncthreads();
  const int t = chunk * kRouteChunk + threadIdx.x;
  if (t < p.seqlen) {
    const int* idx = p.head_idx + (int64_t(b) * p.seqlen + t) * p.top_k;
    for (int k = 0; k < p.top_k; ++k) {
      const int h = idx[k];
      if (h >= 0) atomicOr(&sbits[h * kWords + threadIdx.x / 32], 1u << (threadIdx.x & 31));
    }
  }
  __syncthreads();
  uint32_t* gbits = p.bits + (int64_t(b) * p.num_chunks + chunk) * p.h_q * kWords;
  for (int i = threadIdx.x; i < p.h_q * kWords; i += blockDim.x) gbits[i] = sbits[i];
  for (int h = threadIdx.x; h < p.h_q; h += blockDim.x) {
    int c = 0;
#pragma unroll
    for (int w = 0; w < kWords; ++w) c += __popc(sbits[h * kWords + w]);
    p.chunk_off[(int64_t(b) * p.h_q + h) * p.num_chunks + chunk] = c;
  }
}

// One thread per (batch, head): chunk counts -> exclusive offsets, in place; the total is q_count.
__global__ void route_scan_kernel(const RouteParams p) {
  const int64_t bh = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bh >= int64_t(p.batch) * p.h_q) return;
  int* off = p.chunk_off + bh * p.num_chunks;
  int run = 0;
  for (int c = 0; c < p.num_chunks; ++c) {
    const int n = off[c];
    off[c] = run;
    run += n;
  }
  p.q_count[bh] = run;
}

__global__ void __launch_bounds__(kRouteChunk) route_place_kernel(const RouteParams p) {
  const int chunk = blockIdx.x, b = blockIdx.y;
  const int t = chunk * kRouteChunk + threadIdx.x;
  if (t >= p.seqlen) return;
  const uint32_t* gbits = p.bits + (int64_t(b) * p.num_chunks + chunk) * p.h_q * kWords;
  const int word = threadIdx.x / 32;
  const uint32_t below = (1u << (threadIdx.x & 31)) - 1u;  // bits of the earlier tokens of the word
  const int64_t sel = (int64_t(b) * p.seqlen + t) * p.top_k;
  for (int k = 0; k < p.top_k; ++k) {
    const int h = p.head_idx[sel + k];
    if (h < 0) {
      p.slot[sel + k] = -1;
      continue;
    }
    const uint32_t* hb = gbits + h * kWords;
    int r = p.chunk_off[(int64_t(b) * p.h_q + h) * p.num_chunks + chunk];
    for (int w = 0; w < word; ++w) r += __popc(hb[w]);
    r += __popc(hb[word] & below);
    p.q_index[(int64_t(b) * p.h_q + h) * p.seqlen + r] = t;
    p.slot[sel + k] = r;
  }
}

}  // namespace

void launch_route(const RouteParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.seqlen == 0 || p.h_q == 0) return;
  const dim3 grid(p.num_chunks, p.batch);
  const size_t smem = sizeof(uint32_t) * size_t(p.h_q) * kWords;
  if (smem > 48 * 1024) cudaFuncSetAttribute(&route_bits_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  ATTNKIT_LAUNCH_KERNEL(route_bits_kernel, grid, kRouteChunk, smem, stream, p);
  const int64_t bh = int64_t(p.batch) * p.h_q;
  ATTNKIT_LAUNCH_KERNEL(route_scan_kernel, dim3(unsigned((bh + 127) / 128)), 128, 0, stream, p);
  if (p.top_k > 0) ATTNKIT_LAUNCH_KERNEL(route_place_kernel, grid, kRouteChunk, 0, stream, p);
}

}  // namespace attnkit::moh
