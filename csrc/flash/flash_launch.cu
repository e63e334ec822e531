// Dispatch of the flash core over dtype and head dim, plus the two small kernels around the backward
// (delta = rowsum(dO * O) before it, dq_accum -> dq after it) and the split-KV forward's combine.
#include <c10/util/Exception.h>

#include "common/cuda_check.h"
#include "common/launch.cuh"
#include "common/mma.cuh"
#include "common/static_switch.h"
#include "flash/flash.h"
#include "flash/flash_splits.h"
#include "flash/flash_validate.h"

namespace attnkit::flash {

// The instantiations live in inst/*.cu; declare the specializations before their use.
#define ATTNKIT_DECLARE_FLASH(T, D)                                          \
  template <>                                                                \
  void run_flash_fwd<T, D>(const FlashParams& params, cudaStream_t stream); \
  template <>                                                                \
  void run_flash_bwd<T, D>(const FlashParams& params, cudaStream_t stream);
#define ATTNKIT_DECLARE_FLASH_D(D) ATTNKIT_DECLARE_FLASH(__half, D) ATTNKIT_DECLARE_FLASH(__nv_bfloat16, D)
ATTNKIT_DECLARE_FLASH_D(32)
ATTNKIT_DECLARE_FLASH_D(64)
ATTNKIT_DECLARE_FLASH_D(96)
ATTNKIT_DECLARE_FLASH_D(128)
ATTNKIT_DECLARE_FLASH_D(256)
#undef ATTNKIT_DECLARE_FLASH_D
#undef ATTNKIT_DECLARE_FLASH

namespace {

// The row of a one-warp-per-row kernel over [batch][h_out][rows_per_head], in that order:
// wid = (b * h_out + h) * rows_per_head + row. valid is false for the warps past the last row.
struct WarpRow {
  int64_t wid, total, row;
  int b, h, lane;
  bool valid;
};
__device__ __forceinline__ WarpRow warp_row(const FlashParams& p, int64_t rows_per_head) {
  WarpRow w;
  w.wid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  w.lane = threadIdx.x & 31;
  w.total = int64_t(p.batch) * p.h_out * rows_per_head;
  w.valid = w.wid < w.total;
  w.row = w.wid % rows_per_head;
  w.h = int((w.wid / rows_per_head) % p.h_out);
  w.b = int(w.wid / (rows_per_head * p.h_out));
  return w;
}

// One warp per (batch, output head, row): delta = sum_d dO * O in fp32.
template <typename T>
__global__ void flash_bwd_delta_kernel(const FlashParams p, int64_t rows_per_head) {
  const WarpRow wr = warp_row(p, rows_per_head);
  if (!wr.valid) return;
  const int64_t row = wr.row;
  const int h = wr.h, b = wr.b, lane = wr.lane;
  if (p.q_count && row >= p.q_count[int64_t(b) * p.h_out + h]) return;  // not computed by the forward
  const T* o = static_cast<const T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride + row * p.o_row_stride;
  const T* d = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride + row * p.do_row_stride;
  float acc = 0.f;
  for (int i = lane; i < p.head_dim; i += 32) acc += to_float(o[i]) * to_float(d[i]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
  if (lane == 0) p.delta[b * p.lse_batch_stride + h * p.lse_head_stride + row] = acc;
}

// dq = dq_accum (the sum of its slices in order when split), converted to T (scale already applied).
template <typename T>
__global__ void flash_bwd_dq_kernel(const FlashParams p, int64_t rows_per_head) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = int64_t(p.batch) * rows_per_head * p.h_q * p.head_dim;
  if (idx >= total) return;
  const int d = int(idx % p.head_dim);
  const int h = int((idx / p.head_dim) % p.h_q);
  const int64_t row = (idx / (int64_t(p.head_dim) * p.h_q)) % rows_per_head;
  const int b = int(idx / (int64_t(p.head_dim) * p.h_q * rows_per_head));
  const float* src = p.dq_accum + b * p.dqa_batch_stride + row * p.dqa_row_stride + h * p.dqa_head_stride + d;
  float v = src[0];
  for (int s = 1; s < p.dq_splits; ++s) v += src[s * p.dqa_split_stride];  // fixed order
  static_cast<T*>(p.dq)[b * p.dq_batch_stride + row * p.dq_row_stride + h * p.dq_head_stride + d] = T(v);
}

// Split-KV combine: one warp per (batch, output head, row) of segment space. Over the splits s:
// lse = log sum_s exp(lse_s) (max-shifted) and o = sum_s exp(lse_s - lse) o_s, written in T; a row
// that no split saw a key of (every lse_s = -inf) gets o = 0 and lse = -inf.
template <typename T>
__global__ void flash_fwd_combine_kernel(const FlashParams p, int64_t rows_per_head) {
  constexpr int kPerLane = kFlashMaxSplits / 32;  // lse_s values each lane reduces
  constexpr int kCols = 256 / 32;                 // head-dim columns each lane owns (head_dim <= 256)
  const WarpRow wr = warp_row(p, rows_per_head);
  if (!wr.valid) return;
  const int64_t wid = wr.wid, total = wr.total, row = wr.row;
  const int h = wr.h, b = wr.b, lane = wr.lane;
  const int n = p.num_splits;
  const int64_t split_stride = total;  // lse_accum elements per split; o_accum has head_dim times more
  const float* ls = p.lse_accum + wid;  // wid is (b * h_out + h) * rows + row: the workspace order

  float l[kPerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int s = lane + 32 * i;
    l[i] = s < n ? ls[s * split_stride] : -INFINITY;
    mx = fmaxf(mx, l[i]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, off));
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) sum += l[i] == -INFINITY ? 0.f : expf(l[i] - mx);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, off);
  const float lse = mx == -INFINITY ? -INFINITY : mx + logf(sum);
  if (lane == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row] = lse;

  float acc[kCols];
#pragma unroll
  for (int i = 0; i < kCols; ++i) acc[i] = 0.f;
  const float* oa = p.o_accum + wid * p.head_dim;
  for (int s = 0; s < n; ++s) {
    const float lse_s = ls[s * split_stride];
    if (lse_s == -INFINITY) continue;  // no key in this split (also every split when lse = -inf)
    const float w = expf(lse_s - lse);
    const float* src = oa + s * split_stride * p.head_dim;
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int d = lane + 32 * i;
      if (d < p.head_dim) acc[i] += w * src[d];
    }
  }
  T* o = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride + row * p.o_row_stride;
#pragma unroll
  for (int i = 0; i < kCols; ++i) {
    const int d = lane + 32 * i;
    if (d < p.head_dim) o[d] = T(acc[i]);
  }
}

template <typename T>
void run_fwd(const FlashParams& p, cudaStream_t stream) {
  ATTNKIT_HEADDIM_SWITCH(p.head_dim, kD, [&] { run_flash_fwd<T, kD>(p, stream); });
  if (p.num_splits <= 1) return;
  const int64_t rows = int64_t(p.num_segments) * p.seqlen_q;
  const int64_t warps = int64_t(p.batch) * p.h_out * rows;
  if (warps > 0) {
    const int64_t blocks = (warps * 32 + 127) / 128;
    ATTNKIT_LAUNCH_KERNEL(flash_fwd_combine_kernel<T>, dim3(unsigned(blocks)), 128, 0, stream, p, rows);
    ATTNKIT_LAUNCH_CHECK();
  }
}

template <typename T>
void run_bwd(const FlashParams& p, cudaStream_t stream) {
  // Packed queries (cu_seqlens_q): the row-wise epilogues see one batch of total_q rows (the batch
  // strides are 0 and every packed row is a real row).
  FlashParams pe = p;
  if (p.cu_seqlens_q) pe.batch = 1;
  const int64_t rows = p.cu_seqlens_q ? int64_t(p.total_q) : int64_t(p.num_segments) * p.seqlen_q;
  const int64_t warps = int64_t(pe.batch) * p.h_out * rows;
  if (warps > 0) {
    const int64_t blocks = (warps * 32 + 255) / 256;
    ATTNKIT_LAUNCH_KERNEL(flash_bwd_delta_kernel<T>, dim3(unsigned(blocks)), 256, 0, stream, pe, rows);
    ATTNKIT_LAUNCH_CHECK();
  }
  ATTNKIT_HEADDIM_SWITCH(p.head_dim, kD, [&] { run_flash_bwd<T, kD>(p, stream); });
  const int64_t n = int64_t(pe.batch) * rows * p.h_q * p.head_dim;
  if (n > 0) {
    ATTNKIT_LAUNCH_KERNEL(flash_bwd_dq_kernel<T>, dim3(unsigned((n + 255) / 256)), 256, 0, stream, pe, rows);
    ATTNKIT_LAUNCH_CHECK();
  }
}

// Checks shared with the CPU core, plus the CUDA launch limits; returns the params to launch with.
FlashParams prepare(const FlashParams& params) {
  check_flash_params(params);
  TORCH_CHECK(int64_t(params.batch) * params.num_segments <= 65535,
              "flash core (CUDA): batch * segments must be at most 65535, got ", int64_t(params.batch) * params.num_segments);
  TORCH_CHECK((int64_t(params.seqlen_q) + kFwdBlockM - 1) / kFwdBlockM * std::max(1, params.num_splits) <= 0x7fffffff,
              "flash core (CUDA): query blocks * num_splits must fit the grid's x dimension");
  FlashParams p = params;
  // keep the block-range arithmetic of an effectively unlimited window inside int
  if (!p.q_index && !p.k_index && p.window_left > p.seqlen_q + p.seqlen_k) p.window_left = p.seqlen_q + p.seqlen_k;
  if (!p.q_index && !p.k_index && p.window_right > p.seqlen_q + p.seqlen_k) p.window_right = p.seqlen_q + p.seqlen_k;
  return p;
}

}  // namespace

void flash_fwd(const FlashParams& params_in, cudaStream_t stream) {
  const FlashParams params = prepare(params_in);
  TORCH_CHECK(attnkit_flash_headdim_supported(params.head_dim), "flash core: head dim must be a multiple of 8 up to 256, got ",
              params.head_dim);
  TORCH_CHECK(params.dtype == ElemType::kFloat16 || params.dtype == ElemType::kBFloat16,
              "flash core (CUDA): q, k, v must be float16 or bfloat16");
  ATTNKIT_FP16_SWITCH(params.dtype == ElemType::kBFloat16, T, [&] { run_fwd<T>(params, stream); });
}

int flash_fwd_num_splits(const FlashParams& p, int64_t max_keys, int64_t requested) {
  TORCH_CHECK(requested >= 0, "num_splits must be >= 0 (0: automatic), got ", requested);
  int64_t tiles = (std::max<int64_t>(max_keys, 0) + kFwdBlockN - 1) / kFwdBlockN;
  const bool gathers = p.q_index || p.k_index;
  const int64_t wr = p.causal ? 0 : p.window_right;  // causal: nothing right of the diagonal
  if (!gathers && p.window_left >= 0 && wr >= 0) {
    // a query block's keys span at most window_left + kFwdBlockM + wr columns, over one more block
    // than they fill when unaligned
    tiles = std::min(tiles, (int64_t(p.window_left) + kFwdBlockM + wr + kFwdBlockN - 1) / kFwdBlockN + 1);
  }
  const int64_t cap = std::min<int64_t>(tiles, kFlashMaxSplits);
  if (cap <= 1) return 1;
  if (requested > 0) return int(std::min(requested, cap));
  int dev = 0, sms = 0;
  ATTNKIT_CUDA_CHECK(cudaGetDevice(&dev));
  ATTNKIT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t blocks =
      int64_t(p.batch) * p.num_segments * p.h_out * ((int64_t(p.seqlen_q) + kFwdBlockM - 1) / kFwdBlockM);
  return std::max(1, std::min(int(cap), flash_num_splits_heuristic(blocks, tiles, sms)));
}

void flash_bwd(const FlashParams& params_in, cudaStream_t stream) {
  const FlashParams params = prepare(params_in);
  TORCH_CHECK(attnkit_flash_headdim_supported(params.head_dim), "flash core: head dim must be a multiple of 8 up to 256, got ",
              params.head_dim);
  TORCH_CHECK(params.dtype == ElemType::kFloat16 || params.dtype == ElemType::kBFloat16,
              "flash core (CUDA): q, k, v must be float16 or bfloat16");
  ATTNKIT_FP16_SWITCH(params.dtype == ElemType::kBFloat16, T, [&] { run_bwd<T>(params, stream); });
}

}  // namespace attnkit::flash
