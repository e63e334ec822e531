// Torch-free parameters and launchers of the routing kernels (CUDA). The attention itself runs on
// the flash core (csrc/flash/); these kernels route tokens to clusters, move rows between token
// space [B, L, H, D] and segment space [B, S*w, H, D], and update the k-means centroids.
#pragma once
#include <cuda_runtime.h>

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
void launch_routing_scores(const ScoreParams& p, cudaStream_t stream);
// assign[(b*L + l)*H + h] = the cluster packed in best[(b*H + h)*L + l] (int32).
void launch_extract_assign(const unsigned long long* best, int64_t B, int H, int L, int* assign, cudaStream_t stream);

// For every row r of scores [rows, L]: the w largest (ties to the lower position) in position order,
// into out0[r] for r < rows0 and out1[r - rows0] otherwise (each [*, w] int32).
void launch_topw_select(const float* scores, int64_t rows, int64_t rows0, int L, int w, int* out0, int* out1,
                        cudaStream_t stream);

// Inverse of index lists idx [BH][SW] (values in [0, L)): per (bh, token) the ascending list of entries
// r with idx == token, as CSR: offsets [BH][L+1], entries [BH][SW]. Deterministic.
// offsets and cursor ([BH][L]) must be zeroed by the caller. counts_only: stop after the counts
// (offsets[bh][t + 1] = count of t, not scanned; entries and cursor unused).
void launch_build_inverse(const int* idx, int64_t BH, int64_t SW, int L, int* offsets, int* cursor, int* entries,
                          bool counts_only, cudaStream_t stream);

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
void launch_combine(const CombineParams& p, cudaStream_t stream);

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
void launch_gather_dout(const GatherParams& p, cudaStream_t stream);

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
void launch_scatter_add_atomic(const ScatterParams& p, cudaStream_t stream);
void launch_cast_from_f32(const float* acc, void* out, int64_t n, ElemType dtype, cudaStream_t stream);

// Key-padding bias in segment space: bias[(b*Hb + h)*SW + r] = -inf when mask[b, t] else 0, with
// t = idx[(b*Hb + h)*SW + r] (or t = r when idx is null). mask is contiguous bool [B, L].
void launch_key_bias(const bool* mask, const int* idx, int64_t B, int64_t Hb, int64_t SW, int L, float* bias,
                     cudaStream_t stream);

// Device-side check that every idx[i] (i < n) lies in [0, L): a failing value raises a CUDA device
// assert (the op cannot read the values back without synchronising). Run before any kernel indexes
// memory with them (the flash core's gathers, the inverse build, the scatter).
void launch_check_index(const int* idx, int64_t n, int L, cudaStream_t stream);

// ---- online k-means ----
// Per-cluster sums of the normalised vectors: sums[(h*C + c)*D + d] += round(x_n[d] * 2^32) as int64
// (fixed point, so the atomics are order independent: deterministic), counts[h*C + c] += 1, for every
// n with assign[n*H + h] == c. sums and counts zeroed by the caller. assign values outside [0, C) raise a
// device assert. |sum| <= N * 2^32 must fit int64: N <= 2^30 (checked by the launcher).
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
void launch_kmeans_sums(const KmeansSumParams& p, cudaStream_t stream);
// mu[h, c] <- normalize(decay mu + (1 - decay) normalize(sums / count)) where count > 0; mu fp32 [H, C, D].
void launch_kmeans_finalize(const unsigned long long* sums, const int* counts, float* mu, int H, int C, int D,
                            float decay, cudaStream_t stream);

}  // namespace attnkit::routing
