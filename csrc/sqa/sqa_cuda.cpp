// Sparse Query Attention, CUDA: runs the flash core's kernels; TORCH_LIBRARY_IMPL(attnkit, CUDA).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>

#include <algorithm>
#include <limits>

#include "flash/flash.h"
#include "flash/flash_api.h"
#include "sqa/sqa_api.h"

namespace attnkit::sqa {
namespace {

std::tuple<at::Tensor, at::Tensor> sqa_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, bool causal, double scale,
                                                int64_t window_left, int64_t window_right) {
  check_fwd_inputs(q_in, k_in, v_in, /*for_cuda_kernel=*/true);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  auto [p, out, lse] = fwd_setup(q, k, v, causal, scale, window_left, window_right);
  flash::flash_fwd(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sqa_bwd_cuda(const at::Tensor& dout_in, const at::Tensor& q_in,
                                                            const at::Tensor& k_in, const at::Tensor& v_in,
                                                            const at::Tensor& out_in, const at::Tensor& lse,
                                                            bool causal, double scale, int64_t window_left,
                                                            int64_t window_right, bool deterministic) {
  check_bwd_inputs(dout_in, q_in, k_in, v_in, out_in, lse, /*for_cuda_kernel=*/true);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  const at::Tensor dout = flash::cuda_aligned(dout_in), out = flash::cuda_aligned(out_in);
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  set_window(p, window_left, window_right);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const at::Tensor lse_c = lse.contiguous();  // delta below shares its (contiguous) layout
  flash::set_output(p, out, lse_c);
  flash::set_backward(p, dout, dq, dk, dv);
  at::Tensor delta = at::empty(lse_c.sizes(), lse_c.options());
  at::Tensor dq_accum = flash::alloc_dq_accum(p, q.options(), deterministic);
  flash::set_workspaces(p, delta, dq_accum);
  flash::flash_bwd(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

// Varlen: one launch over all sequences; the kernels read each batch's offsets and lengths from
// cu_seqlens (grid over the largest length, blocks past a sequence's end exit at once).
std::tuple<at::Tensor, at::Tensor> sqa_varlen_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, const at::Tensor& cu_seqlens_q,
                                                       const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                       int64_t max_seqlen_k, bool causal, double scale,
                                                       int64_t window_left, int64_t window_right) {
  const Varlen vl = check_varlen_inputs(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, true);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  const int64_t H = flash::output_heads(q.size(1), k.size(1));
  at::Tensor out = at::empty({q.size(0), H, q.size(2)}, q.options());
  at::Tensor lse = at::empty({H, q.size(0)}, q.options().dtype(at::kFloat));
  if (vl.cu_q.front() != 0 || vl.cu_q.back() != q.size(0)) {  // rows outside every sequence: 0 and -inf
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
  }
  flash::FlashParams p = flash::make_params(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale, causal);
  set_window(p, window_left, window_right);
  flash::set_output(p, out.unsqueeze(0), lse.unsqueeze(0));
  flash::set_varlen(p, cq, ck, max_seqlen_q, max_seqlen_k);
  if (q.size(0) > 0) flash::flash_fwd(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sqa_varlen_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale, int64_t window_left, int64_t window_right,
    bool deterministic) {
  check_varlen_inputs(q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, true);
  const int64_t H = flash::output_heads(q_in.size(1), k_in.size(1));
  TORCH_CHECK(out_in.sizes() == at::IntArrayRef({q_in.size(0), H, q_in.size(2)}) && dout_in.sizes() == out_in.sizes(),
              "out and dout must be [total_q, max(Hq, Hkv), D]");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({H, q_in.size(0)}) && lse.scalar_type() == at::kFloat,
              "lse must be float32 [max(Hq, Hkv), total_q]");
  TORCH_CHECK(out_in.scalar_type() == q_in.scalar_type() && dout_in.scalar_type() == q_in.scalar_type(),
              "out and dout must have the dtype of q");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  const at::Tensor dout = flash::cuda_aligned(dout_in), out = flash::cuda_aligned(out_in);
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous();
  // key rows outside every sequence get no block: their gradients must start at zero
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  const at::Tensor lse_c = lse.contiguous().unsqueeze(0);
  flash::FlashParams p = flash::make_params(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale, causal);
  set_window(p, window_left, window_right);
  flash::set_output(p, out.unsqueeze(0), lse_c);
  flash::set_backward(p, dout.unsqueeze(0), dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0));
  at::Tensor delta = at::empty(lse_c.sizes(), lse_c.options());
  const int64_t splits = deterministic ? std::max<int64_t>(1, (max_seqlen_k + 63) / 64 * p.q_group) : 0;
  at::Tensor dq_accum = splits ? at::zeros({splits, 1, q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat))
                               : at::zeros({1, q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  flash::set_workspaces(p, delta, dq_accum);
  flash::set_varlen(p, cq, ck, max_seqlen_q, max_seqlen_k);
  if (q.size(0) > 0) flash::flash_bwd(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

// KV cache: the append, then the forward whose batch b sees its first cache_seqlens[b] + Lnew keys
// (seqused_k), split over the keys (split-KV + combine) when num_splits asks for it or, with 0, when
// the unsplit grid would leave most SMs idle (flash_fwd_num_splits).
std::tuple<at::Tensor, at::Tensor> sqa_kvcache_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_cache,
                                                        const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
                                                        const std::optional<at::Tensor>& v,
                                                        const at::Tensor& cache_seqlens, bool causal, double scale,
                                                        int64_t window_left, int64_t window_right, int64_t num_splits) {
  const std::vector<int> cs = check_kvcache_inputs(q_in, k_cache, v_cache, k, v, cache_seqlens, num_splits, true);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t lnew = k ? k->size(1) : 0;
  if (k) append_kv(k_cache, v_cache, *k, *v, cs);
  const at::Tensor q = flash::cuda_aligned(q_in), kc = flash::cuda_aligned(k_cache), vc = flash::cuda_aligned(v_cache);
  const at::Tensor used = (cache_seqlens + lnew).to(at::kInt).contiguous();
  auto [p, out, lse] = fwd_setup(q, kc, vc, causal, scale, window_left, window_right);
  flash::set_seqused_k(p, used);
  const int64_t max_keys = cs.empty() ? 0 : *std::max_element(cs.begin(), cs.end()) + lnew;
  const int splits = flash::flash_fwd_num_splits(p, max_keys, num_splits);
  const auto workspaces = flash::set_split_workspaces(p, splits, q.options());
  flash::flash_fwd(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace
}  // namespace attnkit::sqa

TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("sqa_fwd", &attnkit::sqa::sqa_fwd_cuda);
  m.impl("sqa_bwd", &attnkit::sqa::sqa_bwd_cuda);
  m.impl("sqa_varlen_fwd", &attnkit::sqa::sqa_varlen_fwd_cuda);
  m.impl("sqa_varlen_bwd", &attnkit::sqa::sqa_varlen_bwd_cuda);
  m.impl("sqa_kvcache_fwd", &attnkit::sqa::sqa_kvcache_fwd_cuda);
}
