// Consistency checks of a FlashParams, shared by the CPU core and the CUDA launcher, so both accept
// exactly the same parameter combinations. Only needs c10's exception macros (usable from .cu files).
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>

#include "flash/flash_params.h"
#include "flash/flash_splits.h"

namespace attnkit::flash {

// Deterministic dq (dq_splits > 0): the number of key blocks that can touch one query block. Slices
// are numbered relative to the query block's first visible key block (dq_slice_base in the backward
// kernel), so a causal window bounds them by the window, not by seqlen_k: the keys a 64-row query
// block sees span at most window_left + 64 columns, i.e. floor((window_left + 63) / 64) + 2 blocks.
// The same condition selects the relative numbering in the kernel; anything else numbers from 0.
inline bool dq_slices_windowed(const FlashParams& p) {
  return p.causal && p.window_left >= 0 && !p.q_index && !p.k_index && !p.active_list;
}

inline int dq_split_key_blocks(const FlashParams& p) {
  const int64_t all = (int64_t(p.seqlen_k) + 63) / 64;
  if (!dq_slices_windowed(p)) return static_cast<int>(all);
  return static_cast<int>(std::min<int64_t>(all, (int64_t(p.window_left) + 63) / 64 + 2));
}

inline void check_flash_params(const FlashParams& p) {
  TORCH_CHECK(p.h_q > 0 && p.h_kv > 0 && p.h_out == p.h_q * p.q_group && p.h_out == p.h_kv * p.kv_group,
              "flash core: inconsistent head counts");
  TORCH_CHECK(p.num_segments >= 1, "flash core: num_segments must be >= 1");
  TORCH_CHECK(!p.bias || p.bias_head_group >= 1, "flash core: bias_head_group must be >= 1");
  // Bias, thresholds and tile lists are indexed by row / column of one sequence, not per segment.
  TORCH_CHECK(p.num_segments == 1 || (!p.bias && !p.row_thr && !p.active_list),
              "flash core: bias, row thresholds and tile lists cannot be combined with segments");
  // K/V of a backward block are gathered once for all heads of its group; dq_accum rows are shared
  // by the heads of a query group: gathers need one output head per query head, and key gathers
  // also one per KV head (query-only gathers read each KV head whole, so GQA is fine there).
  TORCH_CHECK((!p.q_index && !p.k_index) || (p.q_group == 1 && (p.kv_group == 1 || !p.k_index)),
              "flash core: gathers need as many query heads as output heads, and key gathers as many "
              "key/value heads");
  TORCH_CHECK(!p.q_count || (p.q_index && !p.k_index && p.num_segments == 1),
              "flash core: q_count needs q_index, no k_index and one segment");
  // more slices than needed are allowed (they stay zero and add nothing)
  TORCH_CHECK(p.dq_splits == 0 || p.dq_splits >= std::max(1, dq_split_key_blocks(p) * p.q_group),
              "flash core: dq_splits must be 0 or at least max(1, dq_split_key_blocks * q_group) = ",
              std::max(1, dq_split_key_blocks(p) * p.q_group), " (got ", p.dq_splits, ")");
  TORCH_CHECK((!p.cu_seqlens_q && !p.cu_seqlens_k && !p.seqused_k) || (p.num_segments == 1 && !p.q_index && !p.k_index),
              "flash core: per-batch lengths cannot be combined with segments or gathers");
  // Bias, thresholds and tile lists are addressed by batch and local row / column: packed batches
  // (whose batch strides are 0) cannot index them; seqused_k (a KV cache, DMA decode) keeps the
  // batch layout, each batch reading its first seqused_k[b] columns.
  TORCH_CHECK((!p.cu_seqlens_q && !p.cu_seqlens_k) || (!p.bias && !p.row_thr && !p.active_list),
              "flash core: packed sequences (cu_seqlens) cannot be combined with bias, row thresholds or tile lists");
  TORCH_CHECK(p.num_splits <= 1 || (p.num_splits <= kFlashMaxSplits && p.o_accum && p.lse_accum),
              "flash core: num_splits > 1 needs num_splits <= ", kFlashMaxSplits,
              " and the o_accum / lse_accum workspaces (got num_splits = ", p.num_splits, ")");
  // every row of the workspaces must be written by each split: no rows left out per batch or head
  TORCH_CHECK(p.num_splits <= 1 || (!p.cu_seqlens_q && !p.q_count),
              "flash core: split-KV (num_splits > 1) cannot be combined with cu_seqlens_q or q_count");
  if (p.dbias) {
    TORCH_CHECK(p.bias, "flash core: dbias needs a bias");
    if (p.bias_row_stride != 0) {
      TORCH_CHECK(p.bias_head_group == 1, "flash core: a per-row bias gradient needs one bias head per output head");
    } else {
      // every bias head must lie inside one KV head's group (one backward block owns its sums)
      TORCH_CHECK(p.kv_group % p.bias_head_group == 0,
                  "flash core: bias heads must not span several key/value heads when dbias is requested");
    }
  }
}

}  // namespace attnkit::flash
