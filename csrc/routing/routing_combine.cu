// Routing, CUDA: between token space [B, L, H, D] and the flash core's segment space [B, S*w, H, D].
// The inverse of the index lists is a CSR per (batch, head): token -> ascending list of segment rows.
// Sums over it run in that fixed order, so the combine and the backward scatter are deterministic.
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>

#include "routing/routing_device.cuh"

namespace attnkit::routing {
namespace {

constexpr int kThreads = 256;

__global__ void inverse_count_kernel(const int* __restrict__ idx, int64_t n, int64_t SW, int L, int* offsets) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bh = i / SW;
    atomicAdd(&offsets[bh * (L + 1) + idx[i] + 1], 1);
  }
}

// One block per (b, h): inclusive scan of offsets[bh][0..L] in place (offsets[bh][0] == 0).
constexpr int kScanThreads = 1024;
__global__ void __launch_bounds__(kScanThreads) inverse_scan_kernel(int* offsets, int L) {
  constexpr int kWarps = kScanThreads / 32;
  __shared__ int warp_tot[kWarps];
  int* off = offsets + static_cast<int64_t>(blockIdx.x) * (L + 1);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int carry = 0;
  for (int base = 0; base <= L; base += kScanThreads) {
    const int i = base + tid;
    const int v = i <= L ? off[i] : 0;
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xFFFFFFFFu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int t = warp_tot[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xFFFFFFFFu, t, o);
        if (lane >= o) t += y;
      }
      warp_tot[lane] = t;
    }
    __syncthreads();
    if (i <= L) off[i] = carry + incl + (warp > 0 ? warp_tot[warp - 1] : 0);
    carry += warp_tot[kWarps - 1];
    __syncthreads();
  }
}

__global__ void inverse_fill_kernel(const int* __restrict__ idx, int64_t n, int64_t SW, int L,
                                    const int* __restrict__ offsets, int* cursor, int* entries) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bh = i / SW, r = i % SW;
    const int t = idx[i];
    const int slot = offsets[bh * (L + 1) + t] + atomicAdd(&cursor[bh * L + t], 1);
    entries[bh * SW + slot] = static_cast<int>(r);
  }
}

// The fill order within a token's list depends on atomics: sort each (short) list ascending.
__global__ void inverse_sort_kernel(const int* __restrict__ offsets, int64_t BH, int L, int64_t SW, int* entries) {
  const int64_t n = BH * L;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bh = i / L, t = i % L;
    const int o0 = offsets[bh * (L + 1) + t], o1 = offsets[bh * (L + 1) + t + 1];
    int* e = entries + bh * SW;
    for (int a = o0 + 1; a < o1; ++a) {
      const int v = e[a];
      int j = a - 1;
      while (j >= o0 && e[j] > v) {
        e[j + 1] = e[j];
        --j;
      }
      e[j + 1] = v;
    }
  }
}

template <typename T>
__global__ void combine_kernel(CombineParams p) {
  const T* seg = static_cast<const T*>(p.seg);
  T* out = static_cast<T*>(p.out);
  const int64_t n = static_cast<int64_t>(p.B) * p.L * p.H * p.D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % p.D);
    int64_t rest = i / p.D;
    const int h = static_cast<int>(rest % p.H);
    rest /= p.H;
    const int64_t l = rest % p.L;
    const int64_t b = rest / p.L;
    const int64_t bh = b * p.H + h;
    const int o0 = p.offsets[bh * (p.L + 1) + l], o1 = p.offsets[bh * (p.L + 1) + l + 1];
    const int* e = p.entries + bh * p.SW;
    const T* base = seg + b * p.seg_batch_stride + static_cast<int64_t>(h) * p.seg_head_stride + d;
    float acc = 0.f;
    for (int a = o0; a < o1; ++a) acc += to_f32(base[static_cast<int64_t>(e[a]) * p.seg_row_stride]);
    if (p.mean && o1 > o0) acc /= static_cast<float>(o1 - o0);
    out[i] = from_f32<T>(acc);
  }
}

template <typename T>
__global__ void gather_dout_kernel(GatherParams p) {
  const T* dout = static_cast<const T*>(p.dout);
  T* dseg = static_cast<T*>(p.dseg);
  const int64_t n = static_cast<int64_t>(p.B) * p.SW * p.H * p.D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % p.D);
    int64_t rest = i / p.D;
    const int h = static_cast<int>(rest % p.H);
    rest /= p.H;
    const int64_t r = rest % p.SW;
    const int64_t b = rest / p.SW;
    const int64_t bh = b * p.H + h;
    const int t = p.idx[bh * p.SW + r];
    const int* off = p.offsets + bh * (p.L + 1);
    const int cnt = p.scanned ? off[t + 1] - off[t] : off[t + 1];
    const float g = to_f32(dout[b * p.do_batch_stride + t * p.do_row_stride + h * p.do_head_stride + d]);
    dseg[i] = from_f32<T>(g / static_cast<float>(cnt));
  }
}

template <typename T>
__global__ void scatter_add_kernel(ScatterParams p) {
  const T* seg = static_cast<const T*>(p.seg);
  const int64_t n = static_cast<int64_t>(p.B) * p.SW * p.H * p.D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(i % p.D);
    int64_t rest = i / p.D;
    const int h = static_cast<int>(rest % p.H);
    rest /= p.H;
    const int64_t r = rest % p.SW;
    const int64_t b = rest / p.SW;
    const int t = p.idx[(b * p.H + h) * p.SW + r];
    const float v = to_f32(seg[b * p.seg_batch_stride + r * p.seg_row_stride + h * p.seg_head_stride + d]);
    atomicAdd(&p.acc[((b * p.L + t) * p.H + h) * p.D + d], v);
  }
}

template <typename T>
__global__ void cast_kernel(const float* acc, T* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(acc[i]);
}

__global__ void key_bias_kernel(const bool* __restrict__ mask, const int* __restrict__ idx, int64_t n, int64_t Hb,
                                int64_t SW, int L, float* bias) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / (Hb * SW);
    const int64_t t = idx != nullptr ? idx[i] : i % SW;
    bias[i] = mask[b * L + t] ? -INFINITY : 0.f;
  }
}

}  // namespace

void launch_key_bias(const bool* mask, const int* idx, int64_t B, int64_t Hb, int64_t SW, int L, float* bias,
                     cudaStream_t stream) {
  const int64_t n = B * Hb * SW;
  if (n == 0) return;
  ATTNKIT_LAUNCH_KERNEL(key_bias_kernel, grid_1d(n, kThreads), kThreads, 0, stream, mask, idx, n, Hb, SW, L, bias);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_build_inverse(const int* idx, int64_t BH, int64_t SW, int L, int* offsets, int* cursor, int* entries,
                          bool counts_only, cudaStream_t stream) {
  const int64_t n = BH * SW;
  if (n == 0) return;
  ATTNKIT_LAUNCH_KERNEL(inverse_count_kernel, grid_1d(n, kThreads), kThreads, 0, stream, idx, n, SW, L, offsets);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (counts_only) return;
  ATTNKIT_LAUNCH_KERNEL(inverse_scan_kernel, static_cast<unsigned>(BH), kScanThreads, 0, stream, offsets, L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ATTNKIT_LAUNCH_KERNEL(inverse_fill_kernel, grid_1d(n, kThreads), kThreads, 0, stream,
      idx, n, SW, L, offsets, cursor, entries);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ATTNKIT_LAUNCH_KERNEL(inverse_sort_kernel, grid_1d(BH * L, kThreads), kThreads, 0, stream,
      offsets, BH, L, SW, entries);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_combine(const CombineParams& p, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(p.B) * p.L * p.H * p.D;
  if (n == 0) return;
  ATTNKIT_ROUTING_TYPE_SWITCH(p.dtype, T, [&] {
    ATTNKIT_LAUNCH_KERNEL(combine_kernel<T>, grid_1d(n, kThreads), kThreads, 0, stream, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_gather_dout(const GatherParams& p, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(p.B) * p.SW * p.H * p.D;
  if (n == 0) return;
  ATTNKIT_ROUTING_TYPE_SWITCH(p.dtype, T, [&] {
    ATTNKIT_LAUNCH_KERNEL(gather_dout_kernel<T>, grid_1d(n, kThreads), kThreads, 0, stream, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_scatter_add_atomic(const ScatterParams& p, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(p.B) * p.SW * p.H * p.D;
  if (n == 0) return;
  ATTNKIT_ROUTING_TYPE_SWITCH(p.dtype, T, [&] {
    ATTNKIT_LAUNCH_KERNEL(scatter_add_kernel<T>, grid_1d(n, kThreads), kThreads, 0, stream, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_cast_from_f32(const float* acc, void* out, int64_t n, ElemType dtype, cudaStream_t stream) {
  if (n == 0) return;
  ATTNKIT_ROUTING_TYPE_SWITCH(dtype, T, [&] {
    ATTNKIT_LAUNCH_KERNEL(cast_kernel<T>, grid_1d(n, kThreads), kThreads, 0, stream, acc, static_cast<T*>(out), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace attnkit::routing
