// Torch-free parameters of the routing kernels (launchers in routing_cuda.h). The attention itself runs
// on the flash core (csrc/flash/); these kernels route tokens to clusters, move rows between token
// space [B, L, H, D] and segment space [B, S*w, H, D], and update the k-means centroids.
#pragma once
#include <cstdint>

#include "flash/flash_params.h"

namespace attnkit::routing {

using flash::ElemType;

// scores[(b*H + h)*C + c][l] = normalize(x[b, l, h]) . mu[h, c] (fp32), for one input x.
// best (optional, zeroed by the caller): best[(b*H + h)*L + l] = max over c of the packed key
// (order(score) << 32 | ~c), i.e. the argmax with ties to the lower cluster; decode with
// launch_extract_assign. scores may be null when only the argmax is wanted.
struct ScoreParams {
  const void* x;
  int64_t x_batch_stride, x_row_stride, x_head_stride;  // elements; the head dim is contiguous
  ElemType dtype;                                       // fp16 / bf16 / fp32
  const float* centroids;                               // [H, C, D] contiguous fp32
  int B, L, H, C, D;
  float* scores;                 // [B*H*C, L] or null
  unsigned long long* best;      // [B*H*L] or null
  const bool* pad;               // [B, L] contiguous or null: stored scores of padded tokens are -inf
};

// out[b, t, h, :] = sum (mean when `mean`) over the CSR entries r of (b*H + h, t) of seg[b, r, h, :],
// in ascending r, fp32 accumulation; 0 for tokens without entries. out is contiguous [B, L, H, D].
struct CombineParams {
  const void* seg;
  int64_t seg_batch_stride, seg_row_stride, seg_head_stride;
  const int* offsets;  // [B*H][L+1]
  const int* entries;  // [B*H][SW]
  int64_t SW;
  int B, L, H, D;
  bool mean;
  void* out;
  ElemType dtype;  // fp16 / bf16
};

// dseg[b, r, h, :] = dout[b, t, h, :] / count(t), t = idx[b, h, r]; dseg contiguous [B, SW, H, D].
// counts come from offsets (scanned CSR, count = off[t+1] - off[t]) or raw counts (off[t+1]).
struct GatherParams {
  const void* dout;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  const int* idx;  // [B*H][SW]
  const int* offsets;
  bool scanned;
  int64_t SW;
  int B, L, H, D;
  void* dseg;
  ElemType dtype;
};

// Non-deterministic scatter-add (fp32 atomics): acc[b, idx[b, h, r], h, :] += seg[b, r, h, :];
// acc contiguous fp32 [B, L, H, D], zeroed by the caller. Then cast acc into out (same layout).
struct ScatterParams {
  const void* seg;
  int64_t seg_batch_stride, seg_row_stride, seg_head_stride;
  const int* idx;  // [B*H][SW]
  int64_t SW;
  int B, L, H, D;
  float* acc;
  ElemType dtype;
};

// ---- online k-means ----
// Per-cluster sums of the normalised vectors: sums[(h*C + c)*D + d] += round(x_n[d] * 2^32) as int64
// (fixed point, so the atomics are order independent: deterministic), counts[h*C + c] += 1, for every
// n with assign[n*H + h] == c. sums and counts zeroed by the caller. assign values must lie in [0, C)
// (checked by the op before the launch; the kernel skips any other value). |sum| <= N * 2^32 must fit int64: N <= 2^30 (checked by the launcher).
struct KmeansSumParams {
  const void* x;  // [N, H, D], strides in elements, head dim contiguous
  int64_t x_row_stride, x_head_stride;
  ElemType dtype;     // fp16 / bf16 / fp32
  const int* assign;  // [N, H] contiguous
  int64_t N;
  int H, C, D;
  unsigned long long* sums;
  int* counts;
};

}  // namespace attnkit::routing
