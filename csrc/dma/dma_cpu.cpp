// Dynamic Mask Attention, CPU: mask selection (top-keep thresholds per row and tile lists) and the
// attention ops, which run on the flash core's CPU implementation (the core ignores tile lists on
// CPU; they are still built by dma_select so that users and tests can inspect them), and the KV
// cache forward (dma_kvcache_fwd).
//
// Selection per (b, KV head), O(Lk log Lk) time and O(Lk + Lq) memory:
//   1. order the keys by (bias desc, j asc) with NaN last (a stable sort); rank[j] = position;
//   2. non-causal: every row's threshold is the key of rank keep - 1;
//      causal: sweep j = 0..Lk-1 keeping the keep smallest ranks seen so far in a max-heap; after
//      key j the heap top is the threshold rank of the row whose visible prefix ends at j;
//   3. the rank threshold of a row decides the tile lists: key j is kept by row i (when visible)
//      iff rank[j] <= prank[i]; prank is non-increasing in i, so a key block that row i0 sees
//      entirely is active for the query block [i0, i1] iff its smallest rank <= prank[i0].
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <queue>
#include <vector>

#include "dma/dma_api.h"
#include "flash/flash_api.h"
#include "flash/flash_cpu.h"
#include "flash/flash_checks.h"

namespace attnkit::dma {
namespace {

// One (b, KV head): thresholds of the lq rows and both tile lists.
void select_segment(const float* x, int64_t lq, int64_t lk, int64_t keep, bool causal, float* thr, int* tie,
                    int* fwd_list, int* fwd_count, int64_t fwd_width, int* bwd_list, int* bwd_count) {
  const int64_t shift = lk - lq;
  const int64_t kAll = lk;  // rank threshold of a row that keeps all its visible keys
  const bool all_kept = lk <= keep;
  std::vector<int> order, rank;
  std::vector<int64_t> prank(lq, kAll);
  if (!all_kept) {
    order.resize(lk);
    rank.resize(lk);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [x](int a, int b) {
      const float xa = x[a], xb = x[b];
      if (std::isnan(xb)) return !std::isnan(xa);
      if (std::isnan(xa)) return false;
      return xa > xb;
    });
    for (int64_t p = 0; p < lk; ++p) rank[order[p]] = int(p);
    if (!causal) {
      std::fill(prank.begin(), prank.end(), keep - 1);
    } else {
      std::priority_queue<int> heap;  // the keep smallest ranks of the prefix; top = the largest
      for (int64_t j = 0; j < lk; ++j) {
        if (int64_t(heap.size()) < keep) {
          heap.push(rank[j]);
        } else if (rank[j] < heap.top()) {
          heap.pop();
          heap.push(rank[j]);
        }
        const int64_t n = j + 1, i = j - shift;  // row i sees exactly the keys [0, n)
        if (i >= 0 && i < lq) prank[i] = n > keep ? heap.top() : kAll;
      }
    }
  }
  for (int64_t i = 0; i < lq; ++i) {
    const int64_t p = prank[i];
    const float v = p == kAll ? 0.f : x[order[p]];
    if (p == kAll || std::isnan(v)) {
      thr[i] = -std::numeric_limits<float>::infinity();
      tie[i] = kTieAll;
    } else {
      thr[i] = v;
      tie[i] = order[p];
    }
  }

  const int64_t nqb = num_list_blocks(lq), nkb = num_list_blocks(lk);
  std::vector<int> minrank(all_kept ? 0 : nkb, std::numeric_limits<int>::max());
  if (!all_kept)
    for (int64_t j = 0; j < lk; ++j) minrank[j / kListBlock] = std::min(minrank[j / kListBlock], rank[j]);
  auto active = [&](int64_t qb, int64_t kb) {
    const int64_t i0 = qb * kListBlock, i1 = std::min(i0 + kListBlock, lq) - 1;
    const int64_t j0 = kb * kListBlock, j1 = std::min(j0 + kListBlock, lk) - 1;
    if (!causal) return all_kept || minrank[kb] <= prank[0];
    if (j0 > i1 + shift) return false;                                      // no row sees the block
    if (j1 <= i0 + shift) return all_kept || minrank[kb] <= prank[i0];  // every row sees it all
    if (all_kept) return true;
    for (int64_t j = j0; j <= std::min(j1, i1 + shift); ++j)
      if (rank[j] <= prank[std::max(i0, j - shift)]) return true;  // the first row that sees j
    return false;
  };
  for (int64_t qb = 0; qb < nqb; ++qb) {
    int c = 0;
    for (int64_t kb = 0; kb < nkb; ++kb) {
      if (!active(qb, kb)) continue;
      TORCH_CHECK(c < fwd_width, "dma_select: internal error, forward tile list overflow");
      fwd_list[qb * fwd_width + c++] = int(kb);
    }
    fwd_count[qb] = c;
  }
  for (int64_t kb = 0; kb < nkb; ++kb) {
    int c = 0;
    for (int64_t qb = 0; qb < nqb; ++qb)
      if (active(qb, kb)) bwd_list[kb * nqb + c++] = int(qb);
    bwd_count[kb] = c;
  }
}

// Selection of every segment of x (fp32 [B, Hkv, Lk], contiguous); with used, segment (b, g) runs
// over its first used[b] keys only (the remaining list entries keep their -1 / 0 fill).
SelectOutputs select_all(const at::Tensor& x, int64_t keep, int64_t lq, bool causal, const std::vector<int>* used) {
  auto outs = alloc_select_outputs(x, keep, lq);
  auto& [thr, tie, fwd_list, fwd_count, bwd_list, bwd_count] = outs;
  const int64_t H = x.size(1), nseg = x.size(0) * H, lk = x.size(2);
  const int64_t nqb = num_list_blocks(lq), nkb = num_list_blocks(lk), fw = fwd_list.size(3);
  const float* xp = x.data_ptr<float>();
  float* tp = thr.data_ptr<float>();
  int* tiep = tie.data_ptr<int>();
  int *fl = fwd_list.data_ptr<int>(), *fc = fwd_count.data_ptr<int>();
  int *bl = bwd_list.data_ptr<int>(), *bc = bwd_count.data_ptr<int>();
  at::parallel_for(0, nseg, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t lk_s = used ? (*used)[s / H] : lk;
      select_segment(xp + s * lk, lq, lk_s, keep, causal, tp + s * lq, tiep + s * lq, fl + s * nqb * fw, fc + s * nqb,
                     fw, bl + s * nkb * nqb, bc + s * nkb);
    }
  });
  return outs;
}

SelectOutputs dma_select_cpu(const at::Tensor& bias, int64_t keep, int64_t lq, bool causal,
                             const std::optional<at::Tensor>& seqused_k) {
  check_select_args(bias, keep, lq);
  std::vector<int> used;
  if (seqused_k) used = check_seqused_k(*seqused_k, bias);
  return select_all(bias.to(at::kFloat).contiguous(), keep, lq, causal, seqused_k ? &used : nullptr);
}

std::tuple<at::Tensor, at::Tensor> dma_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& bias, const at::Tensor& thr, const at::Tensor& tie,
                                               const std::optional<at::Tensor>& fwd_list,
                                               const std::optional<at::Tensor>& fwd_count,
                                               const std::optional<at::Tensor>& bwd_list,
                                               const std::optional<at::Tensor>& bwd_count, bool causal, double scale,
                                               bool /*deterministic: backward only*/) {
  check_dma_inputs(q, k, v, bias, false);
  check_mask_inputs(q, k, thr, tie, fwd_list, fwd_count, true);
  check_mask_inputs(q, k, thr, tie, bwd_list, bwd_count, false);
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  const at::Tensor bias32 = bias.to(at::kFloat).contiguous();
  const at::Tensor thr_c = thr.contiguous(), tie_c = tie.contiguous();
  set_dma_mask(p, bias32, nullptr, thr_c, tie_c);
  auto [out, lse] = flash::alloc_output(p, q);
  flash::set_output(p, out, lse);
  flash::flash_fwd_cpu(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dma_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& thr, const at::Tensor& tie,
    const std::optional<at::Tensor>& bwd_list, const std::optional<at::Tensor>& bwd_count, bool causal, double scale,
    bool /*deterministic: the CPU core always is*/) {
  check_dma_inputs(q, k, v, bias, false);
  flash::check_backward_inputs(dout, q, k, out, lse);
  check_mask_inputs(q, k, thr, tie, bwd_list, bwd_count, false);
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  const at::Tensor bias32 = bias.to(at::kFloat).contiguous();
  at::Tensor dbias32 = at::zeros_like(bias32);
  const at::Tensor thr_c = thr.contiguous(), tie_c = tie.contiguous();
  set_dma_mask(p, bias32, &dbias32, thr_c, tie_c);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  flash::set_output(p, out, lse);
  flash::set_backward(p, dout, dq, dk, dv);
  flash::flash_bwd_cpu(p);
  return {dq, dk, dv, dbias32.to(bias.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> masked_bias_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const std::optional<at::Tensor>& attn_mask,
                                                       const std::optional<at::Tensor>& attn_bias, bool causal,
                                                       double scale) {
  check_masked_bias_inputs(q, k, v, attn_mask, attn_bias, false);
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  const CoreBias cb = make_core_bias(q, k, attn_mask, attn_bias);
  if (cb.has_bias) flash::set_bias(p, cb.bias, nullptr);
  auto [out, lse] = flash::alloc_output(p, q);
  flash::set_output(p, out, lse);
  flash::flash_fwd_cpu(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_bias_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias, const at::Tensor& out,
    const at::Tensor& lse, bool causal, double scale, bool need_dbias) {
  check_masked_bias_inputs(q, k, v, attn_mask, attn_bias, false);
  flash::check_backward_inputs(dout, q, k, out, lse);
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  const CoreBias cb = make_core_bias(q, k, attn_mask, attn_bias);
  const bool want_dbias = need_dbias && attn_bias.has_value();
  at::Tensor dbias_core;
  if (cb.has_bias) {
    if (want_dbias) dbias_core = at::zeros(cb.bias.sizes(), cb.bias.options());
    flash::set_bias(p, cb.bias, want_dbias ? &dbias_core : nullptr);
  }
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  flash::set_output(p, out, lse);
  flash::set_backward(p, dout, dq, dk, dv);
  flash::flash_bwd_cpu(p);
  at::Tensor dbias = want_dbias ? reduce_dbias(dbias_core, *attn_bias, q.size(2), k.size(2))
                                : at::empty({0}, q.options().dtype(at::kFloat));
  return {dq, dk, dv, dbias};
}

// KV cache: the append, the selection over each batch row's first cache_seqlens[b] + Lnew keys, then
// the core on views of those rows, one batch row at a time (the CPU core has no per-batch lengths).
std::tuple<at::Tensor, at::Tensor> dma_kvcache_fwd_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                                       const at::Tensor& v_cache, const at::Tensor& bias_cache,
                                                       const std::optional<at::Tensor>& k,
                                                       const std::optional<at::Tensor>& v,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& cache_seqlens, int64_t keep, bool causal,
                                                       double scale) {
  const std::vector<int> cs = check_kvcache_inputs(q, k_cache, v_cache, bias_cache, k, v, bias, cache_seqlens, keep,
                                                   /*for_cuda_kernel=*/false);
  const int64_t lnew = k ? k->size(1) : 0;
  if (k) append_kvcache(k_cache, v_cache, bias_cache, *k, *v, *bias, cache_seqlens);
  const int64_t B = q.size(0), lq = q.size(1);
  std::vector<int> used(cs.size());
  int64_t lk = 0;  // keys any batch row uses
  for (size_t b = 0; b < cs.size(); ++b) {
    used[b] = int(cs[b] + lnew);
    lk = std::max<int64_t>(lk, used[b]);
  }
  const at::Tensor bias32 = bias_cache.narrow(2, 0, lk).to(at::kFloat).contiguous();
  const auto sel = select_all(bias32, keep, lq, causal, &used);
  const at::Tensor& thr = std::get<0>(sel);
  const at::Tensor& tie = std::get<1>(sel);
  const int64_t H = flash::output_heads(q.size(2), k_cache.size(2));
  at::Tensor out = at::empty({B, lq, H, q.size(3)}, q.options());
  at::Tensor lse = at::empty({B, H, lq}, q.options().dtype(at::kFloat));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = used[b];
    at::Tensor ob = out.narrow(0, b, 1), lb = lse.narrow(0, b, 1);
    if (n == 0) {  // no key: every row is empty
      ob.zero_();
      lb.fill_(-std::numeric_limits<float>::infinity());
      continue;
    }
    const at::Tensor kb = k_cache.narrow(0, b, 1).narrow(1, 0, n), vb = v_cache.narrow(0, b, 1).narrow(1, 0, n);
    flash::FlashParams p = flash::make_params(q.narrow(0, b, 1), kb, vb, scale, causal);
    set_dma_mask(p, bias32.narrow(0, b, 1).narrow(2, 0, n), nullptr, thr.narrow(0, b, 1), tie.narrow(0, b, 1));
    flash::set_output(p, ob, lb);
    flash::flash_fwd_cpu(p);
  }
  return {out, lse};
}

}  // namespace
}  // namespace attnkit::dma

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("dma_select", &attnkit::dma::dma_select_cpu);
  m.impl("dma_fwd", &attnkit::dma::dma_fwd_cpu);
  m.impl("dma_bwd", &attnkit::dma::dma_bwd_cpu);
  m.impl("masked_bias_fwd", &attnkit::dma::masked_bias_fwd_cpu);
  m.impl("masked_bias_bwd", &attnkit::dma::masked_bias_bwd_cpu);
  m.impl("dma_kvcache_fwd", &attnkit::dma::dma_kvcache_fwd_cpu);
}

// dma_kvcache_fwd has no derivative: a backward through its outputs raises "the derivative for
// attnkit::dma_kvcache_fwd is not implemented" instead of silently treating it as a constant.
TORCH_LIBRARY_IMPL(attnkit, Autograd, m) {
  m.impl("dma_kvcache_fwd", torch::autograd::autogradNotImplementedFallback());
}
