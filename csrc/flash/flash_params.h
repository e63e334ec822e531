// The flash-attention core's parameters: one torch-free POD struct shared by the forward and the
// backward kernels and by every op that runs on the core (SQA, DMA, routing).
//
// Conventions
// - Strides are in elements and 64-bit. Rows are sequence positions; the head dim is contiguous.
// - "Output heads": h_out = max(h_q, h_kv). Output head h reads query head h / q_group and
//   KV head h / kv_group (exactly one of the groups is > 1, or both are 1).
// - Segments (routing): grid.z runs over batch * num_segments. Inside a segment the kernel sees
//   seqlen_q query rows and seqlen_k key rows. Query row i of segment s reads q row
//   q_index[b, h, s, i] (or s * seqlen_q + i without an index); key column j reads k/v row
//   k_index[b, h, s, j]. Outputs (o, lse, dq_accum, dk, dv, delta) live in "segment space":
//   row s * seqlen_q + i (or s * seqlen_k + j for dk/dv), i.e. segments are stacked along the row axis.
// - Positions used by the causal / window / self masks are the gathered row numbers when an index
//   is given, else the row numbers themselves.
// - Visibility of key column j for query row i (positions pi, pj, shift = seqlen_k - seqlen_q when no
//   index is given, 0 otherwise):
//     causal:      pj <= pi + shift            (bottom-right aligned, as FlashAttention)
//     window_left: pj >= pi + shift - window_left   (when window_left >= 0)
//     window_right: pj <= pi + shift + window_right (when window_right >= 0; with causal both apply)
//     kept:        bias[j] > row_thr[i] || (bias[j] == row_thr[i] && j <= row_tie[i])   (when row_thr)
//   Score: s_ij = scale * q_i.k_j + bias[row i][j] (when bias), or self_score when self_mask && pi == pj.
//   A row with no visible key yields o = 0 and lse = -inf; its gradients are 0.
// - Combinations the kernels accept (checked by check_flash_params in flash_validate.h): bias, row
//   thresholds and tile lists only without segments; gathers only with one output head per query
//   head (q_group == 1), and key gathers only with h_q == h_kv; compact query gathers (q_count) only
//   with q_index, without k_index and with one segment; dbias of a
//   row-broadcast bias only when each bias head lies inside one KV head's group; dbias of a per-row
//   bias only with one bias head per output head, and the caller zero-fills it (skipped tiles are
//   not written).
// - CUDA shared memory: head dim 256 needs about 100 KB (forward) and 152 KB (backward) per block,
//   available on sm80 and sm90 (the targets), not on sm86/sm89.
#pragma once
#include <cstdint>

#include "common/elem_type.h"

namespace attnkit::flash {

using ::attnkit::ElemType;

struct FlashParams {
  // ---- shapes ----
  int batch;
  int num_segments;  // 1 unless the op gathers segments (routing)
  int seqlen_q;      // query rows per (batch, segment)
  int seqlen_k;      // key rows per (batch, segment)
  int h_q, h_kv, h_out;
  int head_dim;
  int q_group;   // h_out / h_q
  int kv_group;  // h_out / h_kv

  // ---- inputs ----
  const void* q;
  const void* k;
  const void* v;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;

  // ---- forward outputs ----
  void* o;  // [B, S*seqlen_q, h_out, D]
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  float* lse;  // [B, h_out, S*seqlen_q], the row stride is 1
  int64_t lse_batch_stride, lse_head_stride;

  // ---- scores and masks ----
  float scale;       // softmax scale applied to q.k
  float scale_log2;  // scale * log2(e)
  bool causal;
  int window_left;   // < 0: no window
  int window_right;  // < 0: unbounded on the right (make_params sets -1; 0 is a real window)

  // Additive fp32 bias, element [b][h_out / bias_head_group][row i][col j]; bias_row_stride == 0
  // broadcasts over query rows. The column stride is 1.
  const float* bias;
  int64_t bias_batch_stride, bias_head_stride, bias_row_stride;
  int bias_head_group;

  // Kept predicate (DMA), per query row and KV head: thresholds on the bias value of each column.
  const float* row_thr;  // [b][kv head][row], fp32
  const int* row_tie;    // [b][kv head][row], int32: largest column kept among bias == thr
  int64_t thr_batch_stride, thr_head_stride;

  // Tile skipping. For each (b, kv head, outer block) a count and an ascending list of inner blocks
  // to visit. Forward: outer = query block (kBlockM rows), inner = key block (kBlockN cols).
  // Backward: outer = key block, inner = query block. Block sizes are the kernel's (see
  // flash_block_sizes in flash.h); the op builds one list per direction.
  const int* active_list;   // [B][h_kv][num_outer][active_max]
  const int* active_count;  // [B][h_kv][num_outer]
  int active_max;
  int num_outer_blocks;

  // Gather indices (routing): [B][h_out][S][seqlen_q] and [B][h_out][S][seqlen_k], int32.
  const int* q_index;
  const int* k_index;
  int64_t q_index_batch_stride, q_index_head_stride;
  int64_t k_index_batch_stride, k_index_head_stride;

  // Compact query gathers (q_index without k_index, num_segments == 1): head h of batch b uses only
  // the first q_count[b * h_out + h] (<= seqlen_q) rows of its q_index list, which must ascend
  // there (rows sorted by position). Rows past the count are not computed: their o, lse, delta and
  // dq rows are not written (on CUDA dq rows come from the zeroed dq_accum, so they read 0). With
  // causal, a query block visits only the keys up to its last valid row's position, and a key
  // block only the query rows from the first one whose position reaches its first key.
  // K/V are not gathered, so any kv_group works (GQA: the KV head of output head h is h / kv_group).
  const int* q_count;  // [B][h_out] int32, contiguous; nullptr: every list has seqlen_q rows

  bool self_mask;    // replace the score of pi == pj by self_score (shared-QK routing)
  float self_score;  // e.g. -5e4

  // ---- backward ----
  const void* dout;  // same layout as o
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  float* delta;  // rowsum(dout * o), same layout and strides as lse (CUDA workspace)
  float* dq_accum;  // fp32 [B, S*seqlen_q, h_q, D] contiguous, zeroed by the caller
  int64_t dqa_batch_stride, dqa_row_stride, dqa_head_stride;
  // Deterministic dq: with dq_splits > 0, dq_accum holds dq_splits >= dq_split_key_blocks * q_group
  // slices (dqa_split_stride apart, see flash_validate.h); key block n of output head h stores the rows
  // of query block m into slice (n - base(m)) * q_group + h % q_group without atomics, and the epilogue
  // sums the slices in order. base(m) = 0, except for a causal window without gathers or tile lists
  // (dq_slices_windowed), where it is the first key block query block m sees: the slice count is then
  // bounded by the window instead of by seqlen_k.
  // With dq_splits == 0, all blocks add into one slice with fp32 atomics (faster, run-to-run jitter).
  int dq_splits;
  int64_t dqa_split_stride;
  void* dq;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  void* dk;  // [B, S*seqlen_k, h_kv, D]
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  void* dv;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
  // d bias, fp32. Row-broadcast bias: dbias[b][head][col] = sum over rows and over the output heads
  // of that bias head, which must lie in one KV head's group (bias_head_group divides kv_group or
  // equals 1). Per-row bias: dbias[b][h_out][row][col] = dS, requires bias_head_group == 1.
  float* dbias;
  int64_t dbias_batch_stride, dbias_head_stride, dbias_row_stride;

  // Element type of q, k, v, o, dout, dq, dk, dv. CUDA: kFloat16 / kBFloat16. CPU: all four.
  ElemType dtype;

  // ---- per-batch lengths (varlen packing, KV cache); CUDA kernels only, the CPU ops run one
  // sequence at a time. Null pointers: every batch has seqlen_q / seqlen_k rows. ----
  // cu_seqlens_q [batch + 1], int32 on the kernels' device: batch b owns rows cu_seqlens_q[b] ..
  // cu_seqlens_q[b + 1] of q, o, lse, dout, delta, dq_accum and dq (their batch strides must be 0);
  // seqlen_q is then the largest length (it sizes the grid) and total_q the number of rows.
  // cu_seqlens_k likewise for k, v, dk, dv. seqused_k [batch]: batch b uses only its first
  // seqused_k[b] keys (a KV cache). The causal / window masks align each batch's own lengths.
  // Not combinable with segments or gathers; cu_seqlens also not with bias, row thresholds or tile
  // lists, which seqused_k allows (they keep their batch layout: DMA decode; check_flash_params).
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  const int* seqused_k;
  int total_q;

  // ---- split-KV forward (flash-decoding), CUDA only; the CPU core ignores it ----
  // num_splits <= 1 (0 after make_params): one pass over the key blocks, writing o and lse.
  // num_splits > 1 (at most kFlashMaxSplits, flash_splits.h): the grid's x dimension runs over
  // num_splits * ceil(seqlen_q / kFwdBlockM) blocks; split s of a query block visits only the
  // contiguous share [n * s / num_splits, n * (s + 1) / num_splits) of the n key blocks the unsplit
  // block would visit (after the causal / window bounds, seqused_k and tile lists; a share can be
  // empty). It writes its partial O, normalised by its own row sums, and its lse (-inf without keys),
  // both fp32, into the workspaces below; a combine kernel then writes o (dtype of q) and lse:
  // lse = log sum_s exp(lse_s), o = sum_s exp(lse_s - lse) o_s (o = 0, lse = -inf for a row no split
  // saw a key of). Rows are segment-space rows r (as lse). Not combinable with cu_seqlens_q or
  // q_count (check_flash_params). Layouts, contiguous, R = num_segments * seqlen_q:
  //   o_accum   [num_splits][batch][h_out][R][head_dim]: element (s, b, h, r, d) at
  //             (((s * batch + b) * h_out + h) * R + r) * head_dim + d
  //   lse_accum [num_splits][batch][h_out][R]: element (s, b, h, r) at ((s * batch + b) * h_out + h) * R + r
  int num_splits;
  float* o_accum;
  float* lse_accum;
};

}  // namespace attnkit::flash
