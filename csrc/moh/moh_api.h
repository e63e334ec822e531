// Mixture-of-Head attention, shared by the CPU and CUDA registrations: input checks, the flash core's
// params (compact query gathers, FlashParams::q_count) and output allocation. The attention runs on
// the flash core; the op's own kernels sort the selections and move rows (moh_params.h).
//
// Layout: token space [B, L, Hq, D] (the user's tensors); slot space [B, L, Hq, D], where row i of
// head h holds the i-th token (by position) that selected h, and only the first q_count[b, h] rows are
// defined. q_index [B, Hq, L] int32 maps slot rows to tokens; slot [B, L, K] int32 maps each selection
// to its slot row (-1 for an empty slot).
#pragma once
#include <torch/all.h>

#include <tuple>

#include "flash/flash_params.h"

namespace attnkit::moh {

// q [B, L, Hq, D], k/v [B, L, Hkv, D] with Hkv dividing Hq; head_idx [B, L, K] int32/int64;
// head_weight [B, L, K] fp32 or q's dtype. With for_cuda_kernel also the CUDA dtypes / head dims.
// With check_values also the values of head_idx: in [-1, Hq) and distinct per token (ATen ops; a
// device sync on CUDA), so that bad input fails before any kernel runs.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& head_idx,
                  const at::Tensor& head_weight, bool for_cuda_kernel, bool check_values);

// The backward's extra inputs: dout like the output, the forward's slot-space residuals.
void check_bwd_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out_slot,
                      const at::Tensor& lse_slot, const at::Tensor& q_index, const at::Tensor& q_count,
                      const at::Tensor& slot, const at::Tensor& head_idx);

// head_idx as contiguous int32, head_weight as contiguous fp32 (what the kernels read).
at::Tensor index_i32(const at::Tensor& head_idx);
at::Tensor weight_f32(const at::Tensor& head_weight);

// Slot-space outputs of the core: out_slot [B, L, Hq, D] zeros (q's dtype) and lse_slot [B, Hq, L]
// fp32 -inf, so that the rows past each head's count (not written by the core) are defined.
std::tuple<at::Tensor, at::Tensor> alloc_slot_outputs(const at::Tensor& q);

// The flash core's params for the heads' lists: q_index [B, Hq, L], q_count [B, Hq].
flash::FlashParams core_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_index,
                               const at::Tensor& q_count, bool causal, double scale);

}  // namespace attnkit::moh
