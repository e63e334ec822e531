// Host-side helpers of the DMA ops shared by the CPU and CUDA registrations: argument checks, output
// allocation of the mask selection, FlashParams filling, and the compatibility path's bias handling.
#pragma once
#include <torch/all.h>

#include <optional>
#include <tuple>
#include <vector>

#include "dma/dma_params.h"
#include "flash/flash_params.h"

namespace attnkit::dma {

using SelectOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// bias [B, Hkv, Lk], floating; keep >= 1; lq >= 0.
void check_select_args(const at::Tensor& bias, int64_t keep, int64_t lq);
// Per-batch key counts of the selection: seqused_k int32 [B] on bias's device, each in [0, Lk].
// Returns the values on the host (one small device-to-host copy on CUDA).
std::vector<int> check_seqused_k(const at::Tensor& seqused_k, const at::Tensor& bias);

// thr, tie, fwd_list, fwd_count, bwd_list, bwd_count (shapes in dma_params.h); with fill, the lists
// are -1 and the counts 0 (the CUDA kernels write every entry themselves).
SelectOutputs alloc_select_outputs(const at::Tensor& bias, int64_t keep, int64_t lq, bool fill = true);

// q/k/v as for SQA; bias [B, Hkv, Lk] in fp32 or the dtype of q, on q's device.
void check_dma_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                      bool for_cuda_kernel);
// thr, tie [B, Hkv, Lq]; lists (when given) with the shapes dma_select produces.
void check_mask_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& thr, const at::Tensor& tie,
                       const std::optional<at::Tensor>& list, const std::optional<at::Tensor>& count, bool forward);

// Fills p (already made by flash::make_params) with the row-broadcast fp32 bias [B, Hkv, 1, Lk]
// (bias32 must stay alive), its gradient (optional) and the thresholds.
void set_dma_mask(flash::FlashParams& p, const at::Tensor& bias32, const at::Tensor* dbias32, const at::Tensor& thr,
                  const at::Tensor& tie);
// Tile lists (CUDA): list [B, Hkv, outer, width], count [B, Hkv, outer], contiguous int32.
void set_tile_lists(flash::FlashParams& p, const at::Tensor& list, const at::Tensor& count);

// ---- KV cache (dma_kvcache_fwd) ----
// q [B, Lq, H, D], k_cache / v_cache [B, Lmax, Hkv, D] (flash::check_qkv_inputs), bias_cache
// [B, Hkv, Lmax] in fp32 or q's dtype; k, v, bias all or none: k / v [B, Lnew, Hkv, D] in q's dtype,
// bias [B, Hkv, Lnew] floating; cache_seqlens int32 [B] on q's device with cache_seqlens[b] >= 0 and
// cache_seqlens[b] + Lnew <= Lmax; keep >= 1. Returns cache_seqlens on the host (one small
// device-to-host copy on CUDA), read before anything is written.
std::vector<int> check_kvcache_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& bias_cache, const std::optional<at::Tensor>& k,
                                      const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& cache_seqlens, int64_t keep, bool for_cuda_kernel);
// Writes k / v / bias of batch row b into the caches at rows cache_seqlens[b] .. + Lnew, in place:
// one indexed copy per cache whose row indices are computed on the device from cache_seqlens.
void append_kvcache(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& bias_cache,
                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, const at::Tensor& cache_seqlens);

// ---- compatibility path (masked_bias_attention) ----
// The bias the core sees: fp32 [B, Hd, R, Lk] (possibly with stride-0 batch / head / row dims), the
// mask folded in as -inf. R = Lq when the mask or the bias varies over query rows, else 1. Hd = h_kv
// for a row-broadcast bias whose heads are 1 or h_kv, else h_out (so that the core's dbias rules
// hold). has_bias is false when neither a mask nor a bias is given.
struct CoreBias {
  bool has_bias = false;
  at::Tensor bias;  // [B, Hd, R, Lk] fp32
};
void check_masked_bias_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias,
                              bool for_cuda_kernel);
CoreBias make_core_bias(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& attn_mask,
                        const std::optional<at::Tensor>& attn_bias);
// Sums the core's dbias [B, Hd, R, Lk] fp32 down to attn_bias's own shape and dtype.
at::Tensor reduce_dbias(const at::Tensor& dbias_core, const at::Tensor& attn_bias, int64_t hq, int64_t hkv);

}  // namespace attnkit::dma
