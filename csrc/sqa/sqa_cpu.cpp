// Sparse Query Attention, CPU: runs the flash core's CPU implementation; TORCH_LIBRARY_IMPL(attnkit, CPU).
// q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; out [B, Lq, max(Hq, Hkv), D]; lse [B, max(Hq, Hkv), Lq] fp32.
#include <torch/all.h>

#include <limits>

#include "flash/flash_api.h"
#include "flash/flash_cpu.h"
#include "sqa/sqa_api.h"

namespace attnkit::sqa {
namespace {

std::tuple<at::Tensor, at::Tensor> sqa_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               bool causal, double scale, int64_t window_left,
                                               int64_t window_right) {
  check_fwd_inputs(q, k, v, /*for_cuda_kernel=*/false);
  auto [p, out, lse] = fwd_setup(q, k, v, causal, scale, window_left, window_right);
  flash::flash_fwd_cpu(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sqa_bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                           const at::Tensor& k, const at::Tensor& v,
                                                           const at::Tensor& out, const at::Tensor& lse, bool causal,
                                                           double scale, int64_t window_left, int64_t window_right,
                                                           bool /*deterministic: the CPU core always is*/) {
  check_bwd_inputs(dout, q, k, v, out, lse, /*for_cuda_kernel=*/false);
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  set_window(p, window_left, window_right);
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  flash::set_output(p, out, lse);
  flash::set_backward(p, dout, dq, dk, dv);
  flash::flash_bwd_cpu(p);
  return {dq, dk, dv};
}

// Varlen and KV cache on the CPU: the core runs one sequence at a time on views of the packed
// tensors (batch 1), so it needs no per-batch lengths of its own.

// Forward of one sequence: q [1, lq, Hq, D], k/v [1, lk, Hkv, D], o [1, lq, H, D], lse [1, H, lq].
void fwd_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse,
             bool causal, double scale, int64_t wl, int64_t wr) {
  if (q.size(1) == 0) return;
  if (k.size(1) == 0) {  // no key at all: o = 0, lse = -inf (as for a fully masked row)
    o.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return;
  }
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  set_window(p, wl, wr);
  flash::set_output(p, o, lse);
  flash::flash_fwd_cpu(p);
}

std::tuple<at::Tensor, at::Tensor> sqa_varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                      int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                                      double scale, int64_t window_left, int64_t window_right) {
  const Varlen vl = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, false);
  const int64_t H = flash::output_heads(q.size(1), k.size(1));
  at::Tensor out = at::zeros({q.size(0), H, q.size(2)}, q.options());
  at::Tensor lse = at::full({H, q.size(0)}, -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat));
  for (int64_t b = 0; b < vl.batch; ++b) {
    const int64_t oq = vl.cu_q[b], lq = vl.cu_q[b + 1] - oq, ok = vl.cu_k[b], lk = vl.cu_k[b + 1] - ok;
    fwd_one(q.narrow(0, oq, lq).unsqueeze(0), k.narrow(0, ok, lk).unsqueeze(0), v.narrow(0, ok, lk).unsqueeze(0),
            out.narrow(0, oq, lq).unsqueeze(0), lse.narrow(1, oq, lq).unsqueeze(0), causal, scale, window_left,
            window_right);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sqa_varlen_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale, int64_t window_left, int64_t window_right,
    bool /*deterministic: the CPU core always is*/) {
  const Varlen vl = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, false);
  const int64_t H = flash::output_heads(q.size(1), k.size(1));
  TORCH_CHECK(out.sizes() == at::IntArrayRef({q.size(0), H, q.size(2)}) && dout.sizes() == out.sizes(),
              "out and dout must be [total_q, max(Hq, Hkv), D]");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({H, q.size(0)}) && lse.scalar_type() == at::kFloat,
              "lse must be float32 [max(Hq, Hkv), total_q]");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type(),
              "out and dout must have the dtype of q");
  // rows outside every sequence (and sequences without keys or queries) get zero gradients
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const at::Tensor dout_c = dout.contiguous(), out_c = out.contiguous(), lse_c = lse.contiguous();
  for (int64_t b = 0; b < vl.batch; ++b) {
    const int64_t oq = vl.cu_q[b], lq = vl.cu_q[b + 1] - oq, ok = vl.cu_k[b], lk = vl.cu_k[b + 1] - ok;
    if (lq == 0 || lk == 0) continue;
    auto rows_q = [&](const at::Tensor& t) { return t.narrow(0, oq, lq).unsqueeze(0); };
    auto rows_k = [&](const at::Tensor& t) { return t.narrow(0, ok, lk).unsqueeze(0); };
    flash::FlashParams p = flash::make_params(rows_q(q), rows_k(k), rows_k(v), scale, causal);
    set_window(p, window_left, window_right);
    flash::set_output(p, rows_q(out_c), lse_c.narrow(1, oq, lq).unsqueeze(0));
    flash::set_backward(p, rows_q(dout_c), rows_q(dq), rows_k(dk), rows_k(dv));
    flash::flash_bwd_cpu(p);
  }
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> sqa_kvcache_fwd_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                       const at::Tensor& v_cache, const std::optional<at::Tensor>& k,
                                                       const std::optional<at::Tensor>& v,
                                                       const at::Tensor& cache_seqlens, bool causal, double scale,
                                                       int64_t window_left, int64_t window_right, int64_t num_splits) {
  const std::vector<int> cs = check_kvcache_inputs(q, k_cache, v_cache, k, v, cache_seqlens, num_splits, false);
  const int64_t lnew = k ? k->size(1) : 0;
  if (k) append_kv(k_cache, v_cache, *k, *v, cs);
  const int64_t B = q.size(0), H = flash::output_heads(q.size(2), k_cache.size(2));
  at::Tensor out = at::empty({B, q.size(1), H, q.size(3)}, q.options());
  at::Tensor lse = at::empty({B, H, q.size(1)}, q.options().dtype(at::kFloat));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lk = cs[b] + lnew;
    fwd_one(q.narrow(0, b, 1), k_cache.narrow(0, b, 1).narrow(1, 0, lk), v_cache.narrow(0, b, 1).narrow(1, 0, lk),
            out.narrow(0, b, 1), lse.narrow(0, b, 1), causal, scale, window_left, window_right);
  }
  return {out, lse};
}

}  // namespace
}  // namespace attnkit::sqa

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("sqa_fwd", &attnkit::sqa::sqa_fwd_cpu);
  m.impl("sqa_bwd", &attnkit::sqa::sqa_bwd_cpu);
  m.impl("sqa_varlen_fwd", &attnkit::sqa::sqa_varlen_fwd_cpu);
  m.impl("sqa_varlen_bwd", &attnkit::sqa::sqa_varlen_bwd_cpu);
  m.impl("sqa_kvcache_fwd", &attnkit::sqa::sqa_kvcache_fwd_cpu);
}
