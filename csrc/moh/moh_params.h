// Torch-free parameters of the Mixture-of-Head kernels (launchers in moh_cuda.h). The attention itself
// runs on the flash core (csrc/flash/) with compact query gathers (FlashParams::q_count); these kernels
// build the per-(batch, head) token lists and move rows between token space [B, L, Hq, D] and slot
// space [B, L, Hq, D] (row i of head h = the i-th token, by position, that selected h).
#pragma once
#include <cstdint>

#include "common/elem_type.h"

namespace attnkit::moh {

// Tokens per block of the counting sort: one bit per (head, token) of the chunk in shared memory.
constexpr int kRouteChunk = 256;

// Counting sort of the selections. head_idx [B, L, K] int32 contiguous (-1: empty slot; checked
// in range and distinct per token before the launch). Workspaces: bits [B, C, h_q, kRouteChunk/32]
// (C = num_chunks), chunk_off [B, h_q, C]. Outputs: q_index [B, h_q, L] (the first q_count entries
// of each list, ascending; the rest not written), q_count [B, h_q], slot [B, L, K] (the list row of
// each selection, -1 for empty slots).
struct RouteParams {
  int batch, seqlen, h_q, top_k, num_chunks;
  const int* head_idx;
  uint32_t* bits;
  int* chunk_off;
  int* q_index;
  int* q_count;
  int* slot;
};

// Row moves, one warp per selection (b, t, k) with slot s = slot[b, t, k] >= 0 and head h:
// - scatter: dst[b, t, h, :] = w * src[b, s, h, :] (w = weight[b, t, k], or 1 without weight), and
//   lse_dst[b, h, t] = lse_src[b, h, s] when lse_src is set. Rows of unselected (t, h) are untouched.
// - gather_grad: dst[b, s, h, :] = w * src[b, t, h, :] (the unweighted head's output gradient), and
//   dweight[b, t, k] = <src[b, t, h, :], aux[b, s, h, :]> (aux: the unweighted head output), fp32.
// src, dst, aux: [B, L, h_q, D] with the strides below (head dim contiguous); lse_* [B, h_q, L]
// contiguous fp32; head_idx, slot, weight, dweight: [B, L, K] contiguous.
struct MoveParams {
  int batch, seqlen, h_q, top_k, head_dim;
  const int* head_idx;
  const int* slot;
  const float* weight;  // nullptr: 1
  const void* src;
  int64_t src_batch_stride, src_row_stride, src_head_stride;
  void* dst;
  int64_t dst_batch_stride, dst_row_stride, dst_head_stride;
  const void* aux;
  int64_t aux_batch_stride, aux_row_stride, aux_head_stride;
  const float* lse_src;
  float* lse_dst;
  float* dweight;
  ElemType dtype;  // of src, dst, aux: fp16 / bf16 (CUDA)
};

}  // namespace attnkit::moh
