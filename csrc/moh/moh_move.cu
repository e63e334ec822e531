// Mixture-of-Head, CUDA: row moves between token space [B, L, Hq, D] and the flash core's slot space
// (row i of head h = the i-th token of h's list), one warp per selection (b, t, k). The forward's
// scatter applies the router weight; the backward's gather builds the unweighted heads' output
// gradient w * dY and, in the same pass, the weight gradient <dY, O> (O: the unweighted head output).
#include "common/launch.cuh"
#include "common/mma.cuh"
#include "common/static_switch.h"
#include "moh/moh_cuda.h"

namespace attnkit::moh {
namespace {

constexpr int kThreads = 256;

struct Sel {
  int b, t, h, s;
  float w;
};

__device__ __forceinline__ Sel selection(const MoveParams& p, int64_t wid) {
  Sel x;
  x.s = p.slot[wid];
  x.h = p.head_idx[wid];
  const int64_t bt = wid / p.top_k;
  x.t = int(bt % p.seqlen);
  x.b = int(bt / p.seqlen);
  x.w = p.weight ? p.weight[wid] : 1.f;
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) scatter_kernel(const MoveParams p) {
  const int64_t wid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (wid >= int64_t(p.batch) * p.seqlen * p.top_k) return;
  const Sel x = selection(p, wid);
  if (x.s < 0) return;
  const T* src = static_cast<const T*>(p.src) + x.b * p.src_batch_stride + int64_t(x.s) * p.src_row_stride +
                 x.h * p.src_head_stride;
  T* dst = static_cast<T*>(p.dst) + x.b * p.dst_batch_stride + int64_t(x.t) * p.dst_row_stride +
           x.h * p.dst_head_stride;
  for (int d = lane; d < p.head_dim; d += 32) dst[d] = T(to_float(src[d]) * x.w);
  if (p.lse_src && lane == 0) {
    const int64_t bh = int64_t(x.b) * p.h_q + x.h;
    p.lse_dst[bh * p.seqlen + x.t] = p.lse_src[bh * p.seqlen + x.s];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gather_grad_kernel(const MoveParams p) {
  const int64_t wid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (wid >= int64_t(p.batch) * p.seqlen * p.top_k) return;
  const Sel x = selection(p, wid);
  if (x.s < 0) {
    if (lane == 0) p.dweight[wid] = 0.f;
    return;
  }
  const T* dy = static_cast<const T*>(p.src) + x.b * p.src_batch_stride + int64_t(x.t) * p.src_row_stride +
                x.h * p.src_head_stride;
  const T* o = static_cast<const T*>(p.aux) + x.b * p.aux_batch_stride + int64_t(x.s) * p.aux_row_stride +
               x.h * p.aux_head_stride;
  T* dst = static_cast<T*>(p.dst) + x.b * p.dst_batch_stride + int64_t(x.s) * p.dst_row_stride +
           x.h * p.dst_head_stride;
  float acc = 0.f;
  for (int d = lane; d < p.head_dim; d += 32) {
    const float g = to_float(dy[d]);
    dst[d] = T(g * x.w);
    acc += g * to_float(o[d]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
  if (lane == 0) p.dweight[wid] = acc;
}

template <template <typename> class K>
void launch_moves(const MoveParams& p, cudaStream_t stream) {
  const int64_t warps = int64_t(p.batch) * p.seqlen * p.top_k;
  if (warps == 0) return;
  const dim3 grid(unsigned((warps * 32 + kThreads - 1) / kThreads));
  ATTNKIT_FP16_SWITCH(p.dtype == ElemType::kBFloat16, T, [&] {
    ATTNKIT_LAUNCH_KERNEL(K<T>::kernel(), grid, kThreads, 0, stream, p);
  });
}

template <typename T>
struct ScatterK {
  static auto kernel() { return &scatter_kernel<T>; }
};
template <typename T>
struct GatherK {
  static auto kernel() { return &gather_grad_kernel<T>; }
};

}  // namespace

void launch_scatter(const MoveParams& p, cudaStream_t stream) { launch_moves<ScatterK>(p, stream); }
void launch_gather_grad(const MoveParams& p, cudaStream_t stream) { launch_moves<GatherK>(p, stream); }

}  // namespace attnkit::moh
