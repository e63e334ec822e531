// Sparse Query Attention, shared by the CPU and CUDA registrations: input checks and the forward's
// FlashParams with its outputs. SQA has no kernels of its own: it runs the flash core.
#pragma once
#include <torch/all.h>

#include <tuple>

#include "flash/flash_params.h"

namespace attnkit::sqa {

// q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; with for_cuda_kernel also the CUDA kernel's dtype and head dims.
void check_fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool for_cuda_kernel);
// The forward's checks plus dout / out [B, Lq, max(Hq, Hkv), D] and lse [B, max(Hq, Hkv), Lq] fp32.
void check_bwd_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, bool for_cuda_kernel);

// FlashParams of the forward, with out [B, Lq, max(Hq, Hkv), D] and lse [B, max(Hq, Hkv), Lq] fp32
// allocated and set in it.
std::tuple<flash::FlashParams, at::Tensor, at::Tensor> fwd_setup(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, bool causal, double scale);

}  // namespace attnkit::sqa
