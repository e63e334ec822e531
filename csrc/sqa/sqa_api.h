// Sparse Query Attention, shared by the CPU and CUDA registrations: input checks and the forward's
// FlashParams with its outputs. SQA has no kernels of its own: it runs the flash core.
#pragma once
#include <torch/all.h>

#include <tuple>
#include <vector>

#include "flash/flash_params.h"

namespace attnkit::sqa {

// q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; with for_cuda_kernel also the CUDA kernel's dtype and head dims.
void check_fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool for_cuda_kernel);
// The forward's checks plus dout / out [B, Lq, max(Hq, Hkv), D] and lse [B, max(Hq, Hkv), Lq] fp32.
void check_bwd_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, bool for_cuda_kernel);

// Window bounds as the core takes them: < 0 unbounded, else clamped to what int holds. Errors
// (naming window_size) on values below -1.
void set_window(flash::FlashParams& p, int64_t window_left, int64_t window_right);

// FlashParams of the forward, with out [B, Lq, max(Hq, Hkv), D] and lse [B, max(Hq, Hkv), Lq] fp32
// allocated and set in it.
std::tuple<flash::FlashParams, at::Tensor, at::Tensor> fwd_setup(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, bool causal, double scale,
                                                                 int64_t window_left, int64_t window_right);

// ---- varlen (packed sequences) ----
// q [total_q, Hq, D], k/v [total_k, Hkv, D], cu_seqlens_q / cu_seqlens_k int32 [B + 1] on q's device,
// non-decreasing, starting at >= 0 and ending inside their tensors; max_seqlen_* at least every
// length. Returns the offsets on the host (one small device-to-host copy on CUDA).
struct Varlen {
  std::vector<int> cu_q, cu_k;
  int64_t batch;
};
Varlen check_varlen_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                           const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                           bool for_cuda_kernel);

// ---- KV cache ----
// q [B, Lq, Hq, D], caches [B, Lmax, Hkv, D], k/v (both or neither) [B, Lnew, Hkv, D], cache_seqlens
// int32 [B] on q's device with 0 <= cache_seqlens[b] and cache_seqlens[b] + Lnew <= Lmax. Returns the
// cache lengths on the host.
std::vector<int> check_kvcache_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
                                      const at::Tensor& cache_seqlens, int64_t num_splits, bool for_cuda_kernel);
// Writes k[b] / v[b] into the caches at rows cache_seqlens[b] .. + Lnew (in place).
void append_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
               const std::vector<int>& cache_seqlens);

}  // namespace attnkit::sqa
