// Online k-means, CUDA: per-cluster sums of the normalised vectors and the EMA step of the centroids.
// The sums are accumulated as 2^-32 fixed point in int64 atomics: integer addition is associative, so
// the result does not depend on the order of the atomics (deterministic), and it is finer than fp32.
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

#include "routing/routing_device.cuh"

namespace attnkit::routing {
namespace {

constexpr double kFixedScale = 4294967296.0;  // 2^32
constexpr int kMaxD = 256;

// One warp per (n, h): the row's norm by a warp reduction, then one atomic per element.
template <typename T>
__global__ void kmeans_sums_kernel(KmeansSumParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t n_rows = p.N * p.H;
  const T* x = static_cast<const T*>(p.x);
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32; row < n_rows;
       row += warps_total) {
    const int64_t n = row / p.H;
    const int h = static_cast<int>(row % p.H);
    const T* xr = x + n * p.x_row_stride + static_cast<int64_t>(h) * p.x_head_stride;
    float v[kMaxD / 32];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < kMaxD / 32; ++k) {
      const int d = lane + 32 * k;
      v[k] = d < p.D ? to_f32(xr[d]) : 0.f;
      ss += v[k] * v[k];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
    const float inv = 1.f / fmaxf(sqrtf(ss), 1e-12f);
    const int c = p.assign[n * p.H + h];
    if (c < 0 || c >= p.C) continue;  // the launcher checks the values first; never index outside
    unsigned long long* dst = p.sums + (static_cast<int64_t>(h) * p.C + c) * p.D;
#pragma unroll
    for (int k = 0; k < kMaxD / 32; ++k) {
      const int d = lane + 32 * k;
      if (d < p.D) {
        const long long q = __double2ll_rn(static_cast<double>(v[k] * inv) * kFixedScale);
        atomicAdd(dst + d, static_cast<unsigned long long>(q));
      }
    }
    if (lane == 0) atomicAdd(&p.counts[h * p.C + c], 1);
  }
}

// One block per (h, c), one thread per element of the head dim (blockDim.x >= D, a multiple of 32).
__global__ void kmeans_finalize_kernel(const unsigned long long* sums, const int* counts, float* mu, int C, int D,
                                       float decay) {
  __shared__ float red[kMaxD / 32];
  const int hc = blockIdx.x;
  const int cnt = counts[hc];
  if (cnt == 0) return;  // a cluster that got nothing keeps its centroid
  const int d = threadIdx.x, lane = d & 31, warp = d >> 5, nwarps = blockDim.x / 32;
  auto block_sum = [&](float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xFFFFFFFFu, x, o);
    if (lane == 0) red[warp] = x;
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < nwarps; ++i) t += red[i];
    __syncthreads();
    return t;
  };
  float mean = 0.f, m = 0.f;
  if (d < D) {
    mean = static_cast<float>(static_cast<double>(static_cast<long long>(sums[static_cast<int64_t>(hc) * D + d])) /
                              kFixedScale / cnt);
    m = mu[static_cast<int64_t>(hc) * D + d];
  }
  const float inv_mean = 1.f / fmaxf(sqrtf(block_sum(mean * mean)), 1e-12f);
  const float nv = decay * m + (1.f - decay) * mean * inv_mean;
  const float inv = 1.f / fmaxf(sqrtf(block_sum(d < D ? nv * nv : 0.f)), 1e-12f);
  if (d < D) mu[static_cast<int64_t>(hc) * D + d] = nv * inv;
}

}  // namespace

void launch_kmeans_sums(const KmeansSumParams& p, cudaStream_t stream) {
  TORCH_CHECK(p.D <= kMaxD, "x: head dim must be <= ", kMaxD, " on CUDA (got ", p.D, ")");
  // every term is |round(x_n[d] * 2^32)| <= 2^32 (1 + 2^-22): N of them must stay inside int64
  TORCH_CHECK(p.N <= (int64_t{1} << 30), "x: at most 2^30 vectors per k-means update on CUDA (got ", p.N, ")");
  const int64_t rows = p.N * p.H;
  if (rows == 0) return;
  constexpr int kWarpsPerBlock = 8;
  int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > (int64_t{1} << 20)) blocks = int64_t{1} << 20;
  ATTNKIT_ROUTING_TYPE_SWITCH(p.dtype, T, [&] {
    ATTNKIT_LAUNCH_KERNEL(kmeans_sums_kernel<T>, static_cast<unsigned>(blocks), 32 * kWarpsPerBlock, 0, stream, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_kmeans_finalize(const unsigned long long* sums, const int* counts, float* mu, int H, int C, int D,
                            float decay, cudaStream_t stream) {
  TORCH_CHECK(D <= kMaxD, "centroids: head dim must be <= ", kMaxD, " on CUDA (got ", D, ")");
  if (static_cast<int64_t>(H) * C == 0 || D == 0) return;
  const int threads = ((D + 31) / 32) * 32;
  ATTNKIT_LAUNCH_KERNEL(kmeans_finalize_kernel, static_cast<unsigned>(H * C), threads, 0, stream,
      sums, counts, mu, C, D, decay);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attnkit::routing
