// Host helpers shared by the op code (CPU and CUDA registrations): build a FlashParams from tensors
// so that every op fills shapes, strides, head groups and dtype the same way. Torch-aware; the
// kernels themselves only see the POD struct.
//
// Typical forward:
//   FlashParams p = make_params(q, k, v, scale, causal);
//   auto [o, lse] = alloc_output(p, q);
//   set_output(p, o, lse);
//   (optional) set_bias(p, bias, nullptr); set_row_threshold(p, thr, tie); set_segments(p, qi, ki);
//   flash_fwd_cpu(p)  or  flash_fwd(p, stream)
// Typical backward: the same, then set_output(p, o, lse); set_backward(p, dout, dq, dk, dv);
//   on CUDA also set_workspaces(p, delta, dq_accum).
#pragma once
#include <torch/all.h>

#include <tuple>

#include "flash/flash_params.h"

namespace attnkit::flash {

// The core's element type for a tensor dtype (fp16, bf16, fp32, fp64); errors on anything else.
ElemType elem_type_of(at::ScalarType t);

// Number of output heads for the given query / KV head counts: max(hq, hkv). Checks that one
// divides the other.
int64_t output_heads(int64_t hq, int64_t hkv);

// q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D] (last dim contiguous). Fills shapes, strides, head
// groups, dtype, scale (and scale_log2), causal; window_left = window_right = -1; every optional input is off.
FlashParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal);

// Allocates o [B, S*seqlen_q, h_out, D] (dtype and device of q) and lse [B, h_out, S*seqlen_q] fp32.
std::tuple<at::Tensor, at::Tensor> alloc_output(const FlashParams& p, const at::Tensor& q);

// o [B, rows, h_out, D], lse [B, h_out, rows] (fp32, row stride 1).
void set_output(FlashParams& p, const at::Tensor& o, const at::Tensor& lse);

// dout like o; dq like q ([B, rows, h_q, D]); dk, dv like k and v.
void set_backward(FlashParams& p, const at::Tensor& dout, const at::Tensor& dq, const at::Tensor& dk,
                  const at::Tensor& dv);

// CUDA workspaces: delta [B, h_out, rows] fp32 with lse's layout; dq_accum fp32 zeros from
// alloc_dq_accum: [B, rows, h_q, D] (atomics), or [splits, B, rows, h_q, D] for a deterministic dq.
void set_workspaces(FlashParams& p, const at::Tensor& delta, const at::Tensor& dq_accum);
at::Tensor alloc_dq_accum(const FlashParams& p, const at::TensorOptions& options, bool deterministic);

// Additive fp32 bias [B, Hb, R, Lk] with R == 1 (broadcast over query rows, row stride 0) or R == rows.
// Hb must divide h_out; bias_head_group = h_out / Hb. dbias (optional) has the shape of bias.
void set_bias(FlashParams& p, const at::Tensor& bias, const at::Tensor* dbias);

// Kept predicate: thr fp32 and tie int32, both [B, h_kv, rows] with unit row stride.
void set_row_threshold(FlashParams& p, const at::Tensor& thr, const at::Tensor& tie);

// Gathers: q_index [B, h_out, S, wq] and k_index [B, h_out, S, wk], int32, the last two dims
// contiguous. Sets num_segments = S, seqlen_q = wq, seqlen_k = wk.
void set_segments(FlashParams& p, const at::Tensor& q_index, const at::Tensor& k_index);

// Per-batch lengths (CUDA kernels; see FlashParams::cu_seqlens_q). Call last, after the outputs,
// backward tensors and workspaces are set from [1, total, H, D] views of the packed tensors: sets
// batch, seqlen_q / seqlen_k (the largest lengths), total_q and the offsets, and zeroes every batch
// stride. cu_seqlens_q / cu_seqlens_k int32 [batch + 1] on the kernels' device.
void set_varlen(FlashParams& p, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                int64_t max_seqlen_k);
// KV cache: batch b uses its first seqused_k[b] keys (int32 [batch] on the kernels' device).
void set_seqused_k(FlashParams& p, const at::Tensor& seqused_k);
// Split-KV forward (CUDA; see FlashParams::num_splits). num_splits > 1: allocates the fp32 workspaces
// o_accum [num_splits, B, h_out, rows, head_dim] and lse_accum [num_splits, B, h_out, rows] with
// `options`' device and sets them and num_splits in p; they must live until the forward has run.
// num_splits <= 1: sets num_splits = 1 (no split) and returns undefined tensors.
std::tuple<at::Tensor, at::Tensor> set_split_workspaces(FlashParams& p, int64_t num_splits,
                                                        const at::TensorOptions& options);
// Compact query gathers (see FlashParams::q_count): q_index [B, h_out, 1, w] int32 (each list
// ascending in its valid part), q_count [B, h_out] int32 contiguous, no key gather. Sets
// seqlen_q = w; keys stay [B, Lk, h_kv, D].
void set_compact_rows(FlashParams& p, const at::Tensor& q_index, const at::Tensor& q_count);

// The CUDA kernels copy 16-byte chunks: the data pointer must be 16-byte aligned and every stride but
// the last a multiple of 8 elements. Returns t itself when it is, else a contiguous aligned copy.
at::Tensor cuda_aligned(const at::Tensor& t);

}  // namespace attnkit::flash
