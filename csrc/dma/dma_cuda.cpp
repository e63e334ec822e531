// Dynamic Mask Attention, CUDA registrations: mask selection (dma_select.cu) and the attention ops
// (training and KV cache), which fill a FlashParams (fp32 bias, row thresholds, tile lists, per-batch
// key counts for the cache) and run the flash core's kernels.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "dma/dma_api.h"
#include "dma/dma_cuda.h"
#include "flash/flash.h"
#include "flash/flash_api.h"
#include "flash/flash_checks.h"

namespace attnkit::dma {
namespace {

int levels_for(int64_t lk) {
  int l = 1;
  while ((int64_t(1) << l) < lk) ++l;
  return l;
}

// Selection over x (fp32 [B, Hkv, Lk], contiguous, on the current device); with used (int32 [B],
// contiguous, values in [0, Lk]), segment (b, g) runs over its first used[b] keys.
SelectOutputs select_all(const at::Tensor& x, int64_t keep, int64_t lq, bool causal, const at::Tensor* used) {
  auto outs = alloc_select_outputs(x, keep, lq, /*fill=*/false);
  auto& [thr, tie, fwd_list, fwd_count, bwd_list, bwd_count] = outs;
  const int64_t nseg = x.size(0) * x.size(1), lk = x.size(2);
  TORCH_CHECK(nseg * lk < std::numeric_limits<int>::max(), "bias: B * Hkv * Lk must be < 2^31 (got ", nseg * lk, ")");
  SelectParams p{};
  p.nseg = int(nseg);
  p.lq = int(lq);
  p.lk = int(lk);
  p.keep = int(std::min<int64_t>(keep, std::numeric_limits<int>::max()));
  p.causal = causal;
  p.shift = int(lk - lq);
  p.all_kept = lk <= keep;
  p.levels = levels_for(lk);
  p.nwords = int((lk + 31) / 32);
  p.nqb = int(num_list_blocks(lq));
  p.nkb = int(num_list_blocks(lk));
  p.fwd_width = int(fwd_list.size(3));
  p.h_kv = int(x.size(1));
  p.bias = x.data_ptr<float>();
  p.seqused_k = used ? used->data_ptr<int>() : nullptr;
  p.thr = thr.data_ptr<float>();
  p.tie = tie.data_ptr<int>();
  p.fwd_list = fwd_list.data_ptr<int>();
  p.fwd_count = fwd_count.data_ptr<int>();
  p.bwd_list = bwd_list.data_ptr<int>();
  p.bwd_count = bwd_count.data_ptr<int>();
  const at::Tensor ws = at::empty({int64_t(select_workspace_bytes(p))}, x.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  select_cuda(p, c10::cuda::getCurrentCUDAStream());
  return outs;
}

SelectOutputs dma_select_cuda(const at::Tensor& bias, int64_t keep, int64_t lq, bool causal,
                              const std::optional<at::Tensor>& seqused_k) {
  check_select_args(bias, keep, lq);
  TORCH_CHECK(bias.is_cuda(), "bias must be a CUDA tensor");
  if (seqused_k) check_seqused_k(*seqused_k, bias);  // the range check reads the counts on the host
  const c10::cuda::CUDAGuard guard(bias.device());
  const at::Tensor used = seqused_k ? seqused_k->contiguous() : at::Tensor();
  return select_all(bias.to(at::kFloat).contiguous(), keep, lq, causal, seqused_k ? &used : nullptr);
}

// Runs the core's forward; without keys every row is empty (o = 0, lse = -inf).
void run_fwd_or_empty(const flash::FlashParams& p, const at::Tensor& k, at::Tensor& out, at::Tensor& lse) {
  if (out.numel() == 0) return;
  if (k.numel() == 0) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return;
  }
  flash::flash_fwd(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();  // the core's launchers do not check
}

void check_lists_contiguous(const std::optional<at::Tensor>& list, const std::optional<at::Tensor>& count,
                            const char* name) {
  if (list) TORCH_CHECK(list->is_contiguous() && count->is_contiguous(), name, " and its count must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> dma_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, const at::Tensor& bias, const at::Tensor& thr,
                                                const at::Tensor& tie, const std::optional<at::Tensor>& fwd_list,
                                                const std::optional<at::Tensor>& fwd_count,
                                                const std::optional<at::Tensor>& bwd_list,
                                                const std::optional<at::Tensor>& bwd_count, bool causal, double scale,
                                                bool /*deterministic: backward only*/) {
  check_dma_inputs(q_in, k_in, v_in, bias, /*for_cuda_kernel=*/true);
  check_mask_inputs(q_in, k_in, thr, tie, fwd_list, fwd_count, true);
  check_mask_inputs(q_in, k_in, thr, tie, bwd_list, bwd_count, false);
  check_lists_contiguous(fwd_list, fwd_count, "fwd_list");
  const c10::cuda::CUDAGuard guard(q_in.device());
  // the core copies 16-byte chunks: aligned pointers and strides (a copy only when needed)
  const at::Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  const at::Tensor bias32 = bias.to(at::kFloat).contiguous();
  const at::Tensor thr_c = thr.contiguous(), tie_c = tie.contiguous();
  set_dma_mask(p, bias32, nullptr, thr_c, tie_c);
  if (fwd_list) set_tile_lists(p, *fwd_list, *fwd_count);
  auto [out, lse] = flash::alloc_output(p, q);
  flash::set_output(p, out, lse);
  run_fwd_or_empty(p, k, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dma_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& bias, const at::Tensor& out_in, const at::Tensor& lse, const at::Tensor& thr,
    const at::Tensor& tie, const std::optional<at::Tensor>& bwd_list, const std::optional<at::Tensor>& bwd_count,
    bool causal, double scale, bool deterministic) {
  check_dma_inputs(q_in, k_in, v_in, bias, /*for_cuda_kernel=*/true);
  flash::check_backward_inputs(dout_in, q_in, k_in, out_in, lse);
  check_mask_inputs(q_in, k_in, thr, tie, bwd_list, bwd_count, false);
  check_lists_contiguous(bwd_list, bwd_count, "bwd_list");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  const at::Tensor dout = flash::cuda_aligned(dout_in), out = flash::cuda_aligned(out_in);
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  const at::Tensor bias32 = bias.to(at::kFloat).contiguous();
  at::Tensor dbias32 = at::zeros_like(bias32);
  const at::Tensor thr_c = thr.contiguous(), tie_c = tie.contiguous();
  set_dma_mask(p, bias32, &dbias32, thr_c, tie_c);
  if (bwd_list) set_tile_lists(p, *bwd_list, *bwd_count);
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  const at::Tensor lse_c = lse.contiguous();  // delta below shares its (contiguous) layout
  const at::Tensor delta = at::empty(lse_c.sizes(), lse_c.options());
  // deterministic: one fp32 dq slice per key block (per query head of a group), summed in a fixed
  // order by the epilogue; else one buffer with fp32 atomics
  const at::Tensor dq_accum = flash::alloc_dq_accum(p, q.options(), deterministic);
  flash::set_output(p, out, lse_c);
  flash::set_backward(p, dout, dq, dk, dv);
  flash::set_workspaces(p, delta, dq_accum);
  if (q.numel() == 0 || k.numel() == 0) {  // nothing attends: all gradients are zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
  } else {
    flash::flash_bwd(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {dq, dk, dv, dbias32.to(bias.scalar_type())};
}

// Tile lists of the compatibility path from the core's bias (mask folded in as -inf).
std::tuple<at::Tensor, at::Tensor> masked_bias_lists(const flash::FlashParams& p, const at::Tensor& bias, bool forward) {
  const int64_t nqb = num_list_blocks(p.seqlen_q), nkb = num_list_blocks(p.seqlen_k);
  const auto iopt = bias.options().dtype(at::kInt);
  at::Tensor list = forward ? at::empty({p.batch, p.h_kv, nqb, nkb}, iopt) : at::empty({p.batch, p.h_kv, nkb, nqb}, iopt);
  at::Tensor count = at::empty({p.batch, p.h_kv, forward ? nqb : nkb}, iopt);
  BiasListParams lp{};
  lp.batch = p.batch;
  lp.h_kv = p.h_kv;
  lp.kv_group = p.kv_group;
  lp.bias_head_group = p.bias_head_group;
  lp.lq = p.seqlen_q;
  lp.lk = p.seqlen_k;
  lp.shift = p.seqlen_k - p.seqlen_q;
  lp.causal = p.causal;
  lp.nqb = int(nqb);
  lp.nkb = int(nkb);
  lp.bias = p.bias;
  lp.bias_batch_stride = p.bias_batch_stride;
  lp.bias_head_stride = p.bias_head_stride;
  lp.bias_row_stride = p.bias_row_stride;
  const at::Tensor ws = at::empty({int64_t(bias_lists_workspace_bytes(lp))}, bias.options().dtype(at::kByte));
  lp.workspace = ws.data_ptr();
  lp.fwd_list = forward ? list.data_ptr<int>() : nullptr;
  lp.fwd_count = forward ? count.data_ptr<int>() : nullptr;
  lp.bwd_list = forward ? nullptr : list.data_ptr<int>();
  lp.bwd_count = forward ? nullptr : count.data_ptr<int>();
  bias_lists_cuda(lp, c10::cuda::getCurrentCUDAStream());
  return {list, count};
}

std::tuple<at::Tensor, at::Tensor> masked_bias_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in,
                                                        const std::optional<at::Tensor>& attn_mask,
                                                        const std::optional<at::Tensor>& attn_bias, bool causal,
                                                        double scale) {
  check_masked_bias_inputs(q_in, k_in, v_in, attn_mask, attn_bias, /*for_cuda_kernel=*/true);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  const CoreBias cb = make_core_bias(q, k, attn_mask, attn_bias);
  if (cb.has_bias) flash::set_bias(p, cb.bias, nullptr);
  at::Tensor list, count;
  if (attn_mask && cb.has_bias) {  // skip the tiles the mask switches off
    std::tie(list, count) = masked_bias_lists(p, cb.bias, /*forward=*/true);
    set_tile_lists(p, list, count);
  }
  auto [out, lse] = flash::alloc_output(p, q);
  flash::set_output(p, out, lse);
  run_fwd_or_empty(p, k, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_bias_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias, const at::Tensor& out_in,
    const at::Tensor& lse, bool causal, double scale, bool need_dbias) {
  check_masked_bias_inputs(q_in, k_in, v_in, attn_mask, attn_bias, /*for_cuda_kernel=*/true);
  flash::check_backward_inputs(dout_in, q_in, k_in, out_in, lse);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  const at::Tensor dout = flash::cuda_aligned(dout_in), out = flash::cuda_aligned(out_in);
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  const CoreBias cb = make_core_bias(q, k, attn_mask, attn_bias);
  const bool want_dbias = need_dbias && attn_bias.has_value();
  at::Tensor dbias_core;
  if (cb.has_bias) {
    if (want_dbias) dbias_core = at::zeros(cb.bias.sizes(), cb.bias.options());
    flash::set_bias(p, cb.bias, want_dbias ? &dbias_core : nullptr);
  }
  at::Tensor list, count;
  if (attn_mask && cb.has_bias) {
    std::tie(list, count) = masked_bias_lists(p, cb.bias, /*forward=*/false);
    set_tile_lists(p, list, count);
  }
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  const at::Tensor lse_c = lse.contiguous();  // delta below shares its (contiguous) layout
  const at::Tensor delta = at::empty(lse_c.sizes(), lse_c.options());
  const at::Tensor dq_accum = at::zeros({p.batch, p.seqlen_q, p.h_q, p.head_dim}, q.options().dtype(at::kFloat));
  flash::set_output(p, out, lse_c);
  flash::set_backward(p, dout, dq, dk, dv);
  flash::set_workspaces(p, delta, dq_accum);
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  } else {
    flash::flash_bwd(p, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor dbias = want_dbias ? reduce_dbias(dbias_core, *attn_bias, q.size(2), k.size(2))
                                : at::empty({0}, q.options().dtype(at::kFloat));
  return {dq, dk, dv, dbias};
}

// KV cache: the append (indexed copies), the selection over each batch row's first
// cache_seqlens[b] + Lnew keys, then the core's forward with those counts (seqused_k), the kept
// predicate and the forward tile lists, split over the listed key blocks (split-KV + combine) when
// the unsplit grid would leave most SMs idle (flash_fwd_num_splits). Only the first max_b(cache_seqlens[b] + Lnew)
// cache rows are handed to the selection and the core.
std::tuple<at::Tensor, at::Tensor> dma_kvcache_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_cache,
                                                        const at::Tensor& v_cache, const at::Tensor& bias_cache,
                                                        const std::optional<at::Tensor>& k,
                                                        const std::optional<at::Tensor>& v,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& cache_seqlens, int64_t keep, bool causal,
                                                        double scale) {
  const std::vector<int> cs = check_kvcache_inputs(q_in, k_cache, v_cache, bias_cache, k, v, bias, cache_seqlens,
                                                   keep, /*for_cuda_kernel=*/true);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t lnew = k ? k->size(1) : 0;
  if (k) append_kvcache(k_cache, v_cache, bias_cache, *k, *v, *bias, cache_seqlens);
  int64_t lk = 0;  // keys any batch row uses
  for (int c : cs) lk = std::max<int64_t>(lk, c + lnew);
  const at::Tensor used = (cache_seqlens + lnew).to(at::kInt).contiguous();
  const at::Tensor q = flash::cuda_aligned(q_in);
  const at::Tensor kc = flash::cuda_aligned(k_cache.narrow(1, 0, lk));
  const at::Tensor vc = flash::cuda_aligned(v_cache.narrow(1, 0, lk));
  const at::Tensor bias32 = bias_cache.narrow(2, 0, lk).to(at::kFloat).contiguous();
  const auto sel = select_all(bias32, keep, q.size(1), causal, &used);
  flash::FlashParams p = flash::make_params(q, kc, vc, scale, causal);
  set_dma_mask(p, bias32, nullptr, std::get<0>(sel), std::get<1>(sel));
  set_tile_lists(p, std::get<2>(sel), std::get<3>(sel));
  flash::set_seqused_k(p, used);
  auto [out, lse] = flash::alloc_output(p, q);
  flash::set_output(p, out, lse);
  // split-KV (automatic) when batch, heads and query rows alone leave most SMs idle
  const auto workspaces = flash::set_split_workspaces(p, flash::flash_fwd_num_splits(p, lk, 0), q.options());
  run_fwd_or_empty(p, kc, out, lse);
  return {out, lse};
}

}  // namespace
}  // namespace attnkit::dma

TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("dma_select", &attnkit::dma::dma_select_cuda);
  m.impl("dma_fwd", &attnkit::dma::dma_fwd_cuda);
  m.impl("dma_bwd", &attnkit::dma::dma_bwd_cuda);
  m.impl("masked_bias_fwd", &attnkit::dma::masked_bias_fwd_cuda);
  m.impl("masked_bias_bwd", &attnkit::dma::masked_bias_bwd_cuda);
  m.impl("dma_kvcache_fwd", &attnkit::dma::dma_kvcache_fwd_cuda);
}
