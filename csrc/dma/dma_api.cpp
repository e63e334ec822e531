#include "dma/dma_api.h"

#include <limits>
#include <string>
#include <vector>

#include "common/checks.h"
#include "flash/flash_api.h"
#include "flash/flash_checks.h"

namespace attnkit::dma {

namespace {

bool is_floating(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

}  // namespace

void check_select_args(const at::Tensor& bias, int64_t keep, int64_t lq) {
  ATTNKIT_CHECK_DIM(bias, 3);
  TORCH_CHECK(is_floating(bias.scalar_type()), "bias must be float16, bfloat16, float32 or float64 (got ",
              bias.scalar_type(), ")");
  TORCH_CHECK(keep >= 1, "keep must be >= 1 (got ", keep, ")");
  TORCH_CHECK(lq >= 0, "lq must be >= 0 (got ", lq, ")");
  TORCH_CHECK(lq < std::numeric_limits<int>::max() && bias.size(2) < std::numeric_limits<int>::max() &&
                  bias.size(0) * bias.size(1) < std::numeric_limits<int>::max(),
              "bias / lq: sizes must fit in int32");
}

std::vector<int> check_seqused_k(const at::Tensor& seqused_k, const at::Tensor& bias) {
  const int64_t B = bias.size(0), lk = bias.size(2);
  TORCH_CHECK(seqused_k.dim() == 1 && seqused_k.size(0) == B, "seqused_k must have shape [B] = [", B, "], got ",
              seqused_k.sizes());
  TORCH_CHECK(seqused_k.scalar_type() == at::kInt, "seqused_k must be int32 (got ", seqused_k.scalar_type(), ")");
  ATTNKIT_CHECK_DEVICE(seqused_k, bias.device());
  const at::Tensor h = seqused_k.to(at::kCPU).contiguous();
  std::vector<int> used(h.data_ptr<int>(), h.data_ptr<int>() + B);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(used[b] >= 0 && used[b] <= lk, "seqused_k[", b, "] must be in [0, Lk = ", lk, "], got ", used[b]);
  return used;
}

SelectOutputs alloc_select_outputs(const at::Tensor& bias, int64_t keep, int64_t lq, bool fill) {
  const int64_t B = bias.size(0), H = bias.size(1), lk = bias.size(2);
  const int64_t nqb = num_list_blocks(lq), nkb = num_list_blocks(lk);
  const auto fopt = bias.options().dtype(at::kFloat);
  const auto iopt = bias.options().dtype(at::kInt);
  auto list = [&](std::initializer_list<int64_t> shape) {
    return fill ? at::full(shape, -1, iopt) : at::empty(shape, iopt);
  };
  auto count = [&](std::initializer_list<int64_t> shape) { return fill ? at::zeros(shape, iopt) : at::empty(shape, iopt); };
  return {at::empty({B, H, lq}, fopt),
          at::empty({B, H, lq}, iopt),
          list({B, H, nqb, fwd_list_width(lk, keep)}),
          count({B, H, nqb}),
          list({B, H, nkb, nqb}),
          count({B, H, nkb})};
}

void check_dma_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                      bool for_cuda_kernel) {
  flash::check_qkv_inputs(q, k, v, for_cuda_kernel);
  ATTNKIT_CHECK_DIM(bias, 3);
  ATTNKIT_CHECK_DEVICE(bias, q.device());
  TORCH_CHECK(bias.scalar_type() == at::kFloat || bias.scalar_type() == q.scalar_type(),
              "bias must be float32 or the dtype of q (", q.scalar_type(), "), got ", bias.scalar_type());
  TORCH_CHECK(bias.size(0) == q.size(0) && bias.size(1) == k.size(2) && bias.size(2) == k.size(1),
              "bias must have shape [B, Hkv, Lk] = [", q.size(0), ", ", k.size(2), ", ", k.size(1), "], got ",
              bias.sizes());
}

void check_mask_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& thr, const at::Tensor& tie,
                       const std::optional<at::Tensor>& list, const std::optional<at::Tensor>& count, bool forward) {
  const int64_t B = q.size(0), H = k.size(2), lq = q.size(1), lk = k.size(1);
  const std::vector<int64_t> tshape{B, H, lq};
  TORCH_CHECK(thr.sizes() == at::IntArrayRef(tshape), "thr must have shape ", at::IntArrayRef(tshape), ", got ",
              thr.sizes());
  TORCH_CHECK(tie.sizes() == at::IntArrayRef(tshape), "tie must have shape ", at::IntArrayRef(tshape), ", got ",
              tie.sizes());
  TORCH_CHECK(thr.scalar_type() == at::kFloat, "thr must be float32 (got ", thr.scalar_type(), ")");
  TORCH_CHECK(tie.scalar_type() == at::kInt, "tie must be int32 (got ", tie.scalar_type(), ")");
  ATTNKIT_CHECK_DEVICE(thr, q.device());
  ATTNKIT_CHECK_DEVICE(tie, q.device());
  const char* lname = forward ? "fwd_list" : "bwd_list";
  const char* cname = forward ? "fwd_count" : "bwd_count";
  TORCH_CHECK(list.has_value() == count.has_value(), lname, " and ", cname, " must be given together");
  if (!list) return;
  const int64_t outer = forward ? num_list_blocks(lq) : num_list_blocks(lk);
  const int64_t inner = forward ? num_list_blocks(lk) : num_list_blocks(lq);
  TORCH_CHECK(list->dim() == 4 && list->size(0) == B && list->size(1) == H && list->size(2) == outer &&
                  list->size(3) <= std::max<int64_t>(inner, 0),
              lname, " must have shape [", B, ", ", H, ", ", outer, ", <= ", inner, "], got ", list->sizes());
  TORCH_CHECK(count->dim() == 3 && count->size(0) == B && count->size(1) == H && count->size(2) == outer, cname,
              " must have shape [", B, ", ", H, ", ", outer, "], got ", count->sizes());
  TORCH_CHECK(list->scalar_type() == at::kInt, lname, " must be int32");
  TORCH_CHECK(count->scalar_type() == at::kInt, cname, " must be int32");
  TORCH_CHECK(list->device() == q.device(), lname, " must be on ", q.device());
  TORCH_CHECK(count->device() == q.device(), cname, " must be on ", q.device());
}

std::vector<int> check_kvcache_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& bias_cache, const std::optional<at::Tensor>& k,
                                      const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& cache_seqlens, int64_t keep, bool for_cuda_kernel) {
  flash::check_qkv_inputs(q, k_cache, v_cache, for_cuda_kernel);
  const int64_t B = q.size(0), lmax = k_cache.size(1), hkv = k_cache.size(2), D = k_cache.size(3);
  ATTNKIT_CHECK_DIM(bias_cache, 3);
  ATTNKIT_CHECK_DEVICE(bias_cache, q.device());
  TORCH_CHECK(bias_cache.scalar_type() == at::kFloat || bias_cache.scalar_type() == q.scalar_type(),
              "bias_cache must be float32 or the dtype of q (", q.scalar_type(), "), got ", bias_cache.scalar_type());
  TORCH_CHECK(bias_cache.size(0) == B && bias_cache.size(1) == hkv && bias_cache.size(2) == lmax,
              "bias_cache must have shape [B, Hkv, Lmax] = [", B, ", ", hkv, ", ", lmax, "], got ", bias_cache.sizes());
  TORCH_CHECK(k.has_value() == v.has_value() && k.has_value() == bias.has_value(),
              "k, v and bias must be given together (or none of them)");
  int64_t lnew = 0;
  if (k) {
    ATTNKIT_CHECK_DIM((*k), 4);
    TORCH_CHECK(k->scalar_type() == q.scalar_type() && v->scalar_type() == q.scalar_type(),
                "k and v must have the dtype of q (", q.scalar_type(), ")");
    TORCH_CHECK(k->device() == q.device() && v->device() == q.device(), "k and v must be on the device of q (",
                q.device(), ")");
    TORCH_CHECK(k->size(0) == B && k->size(2) == hkv && k->size(3) == D, "k must be [B, Lnew, Hkv, D] = [", B,
                ", Lnew, ", hkv, ", ", D, "], got ", k->sizes());
    TORCH_CHECK(v->sizes() == k->sizes(), "v must have the shape of k ", k->sizes(), ", got ", v->sizes());
    lnew = k->size(1);
    ATTNKIT_CHECK_DIM((*bias), 3);
    TORCH_CHECK(is_floating(bias->scalar_type()), "bias must be float16, bfloat16, float32 or float64 (got ",
                bias->scalar_type(), ")");
    TORCH_CHECK(bias->device() == q.device(), "bias must be on the device of q (", q.device(), ")");
    TORCH_CHECK(bias->size(0) == B && bias->size(1) == hkv && bias->size(2) == lnew,
                "bias must have shape [B, Hkv, Lnew] = [", B, ", ", hkv, ", ", lnew, "], got ", bias->sizes());
  }
  TORCH_CHECK_VALUE(keep >= 1, "keep must be >= 1 (got ", keep, ")");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, "cache_seqlens must have shape [B] = [", B,
              "], got ", cache_seqlens.sizes());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32, got ",
              cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.device() == q.device(), "cache_seqlens must be on the device of q (", q.device(),
              "), got ", cache_seqlens.device());
  TORCH_CHECK(B * hkv * lmax < std::numeric_limits<int>::max() && q.size(1) < std::numeric_limits<int>::max(),
              "bias_cache: B * Hkv * Lmax must be < 2^31 (got ", B * hkv * lmax, ")");
  const at::Tensor h = cache_seqlens.to(at::kCPU).contiguous();
  std::vector<int> cs(h.data_ptr<int>(), h.data_ptr<int>() + B);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(cs[b] >= 0, "cache_seqlens[", b, "] must be >= 0, got ", cs[b]);
    TORCH_CHECK_VALUE(cs[b] + lnew <= lmax, "the cache is too short: cache_seqlens[", b, "] (", cs[b], ") + ", lnew,
                " new keys > its ", lmax, " rows");
  }
  return cs;
}

void append_kvcache(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& bias_cache,
                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, const at::Tensor& cache_seqlens) {
  const int64_t B = k.size(0), lnew = k.size(1), hkv = k.size(2);
  if (lnew == 0 || B == 0) return;
  const auto lopt = cache_seqlens.options().dtype(at::kLong);
  // rows[b, t] = cache_seqlens[b] + t, computed where the caches live (no host loop over B)
  const at::Tensor rows = cache_seqlens.to(at::kLong).unsqueeze(1) + at::arange(lnew, lopt).unsqueeze(0);
  const at::Tensor bidx = at::arange(B, lopt);
  k_cache.index_put_({bidx.unsqueeze(1), rows}, k);
  v_cache.index_put_({bidx.unsqueeze(1), rows}, v);
  bias_cache.index_put_({bidx.view({B, 1, 1}), at::arange(hkv, lopt).view({1, hkv, 1}), rows.unsqueeze(1)},
                        bias.to(bias_cache.scalar_type()));
}

void set_dma_mask(flash::FlashParams& p, const at::Tensor& bias32, const at::Tensor* dbias32, const at::Tensor& thr,
                  const at::Tensor& tie) {
  const at::Tensor b4 = bias32.unsqueeze(2);  // [B, Hkv, 1, Lk]
  if (dbias32) {
    const at::Tensor d4 = dbias32->unsqueeze(2);
    flash::set_bias(p, b4, &d4);
  } else {
    flash::set_bias(p, b4, nullptr);
  }
  flash::set_row_threshold(p, thr, tie);
}

void set_tile_lists(flash::FlashParams& p, const at::Tensor& list, const at::Tensor& count) {
  TORCH_CHECK(list.is_contiguous() && count.is_contiguous(), "tile lists must be contiguous");
  p.active_list = list.data_ptr<int>();
  p.active_count = count.data_ptr<int>();
  p.active_max = static_cast<int>(list.size(3));
  p.num_outer_blocks = static_cast<int>(list.size(2));
}

// ------------------------------------------------------------------------------------------------
// Compatibility path
// ------------------------------------------------------------------------------------------------
namespace {

// Left-pads t with size-1 dims to 4-D and checks that each dim broadcasts to
// [B, Hq|Hkv|1, Lq|1, Lk|1].
at::Tensor to4d(const at::Tensor& t, const char* name, int64_t B, int64_t hq, int64_t hkv, int64_t lq, int64_t lk) {
  TORCH_CHECK(t.dim() <= 4, name, " must have at most 4 dimensions (got ", t.dim(), ")");
  at::Tensor r = t;
  while (r.dim() < 4) r = r.unsqueeze(0);
  auto ok = [](int64_t s, std::initializer_list<int64_t> allowed) {
    for (int64_t a : allowed)
      if (s == a) return true;
    return false;
  };
  TORCH_CHECK(ok(r.size(0), {1, B}) && ok(r.size(1), {1, hq, hkv}) && ok(r.size(2), {1, lq}) && ok(r.size(3), {1, lk}),
              name, " of shape ", t.sizes(), " does not broadcast to [B, H|Hkv|1, Lq|1, Lk] = [", B, ", ", hq, "|",
              hkv, "|1, ", lq, "|1, ", lk, "]");
  return r;
}

}  // namespace

void check_masked_bias_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& attn_bias,
                              bool for_cuda_kernel) {
  flash::check_qkv_inputs(q, k, v, for_cuda_kernel);
  const int64_t B = q.size(0), hq = q.size(2), hkv = k.size(2), lq = q.size(1), lk = k.size(1);
  if (attn_mask) {
    TORCH_CHECK(attn_mask->scalar_type() == at::kBool, "attn_mask must be bool (got ", attn_mask->scalar_type(), ")");
    TORCH_CHECK(attn_mask->device() == q.device(), "attn_mask must be on ", q.device());
    to4d(*attn_mask, "attn_mask", B, hq, hkv, lq, lk);
  }
  if (attn_bias) {
    TORCH_CHECK(is_floating(attn_bias->scalar_type()), "attn_bias must be floating (got ", attn_bias->scalar_type(),
                ")");
    TORCH_CHECK(attn_bias->device() == q.device(), "attn_bias must be on ", q.device());
    to4d(*attn_bias, "attn_bias", B, hq, hkv, lq, lk);
  }
}

CoreBias make_core_bias(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& attn_mask,
                        const std::optional<at::Tensor>& attn_bias) {
  CoreBias cb;
  if (!attn_mask && !attn_bias) return cb;
  const int64_t B = q.size(0), hq = q.size(2), hkv = k.size(2), lq = q.size(1), lk = k.size(1);
  const int64_t hout = std::max(hq, hkv);
  std::optional<at::Tensor> m4, b4;
  if (attn_mask) m4 = to4d(*attn_mask, "attn_mask", B, hq, hkv, lq, lk);
  if (attn_bias) b4 = to4d(*attn_bias, "attn_bias", B, hq, hkv, lq, lk);

  bool rowwise = false, heads_kv = true;
  for (const auto* t : {&m4, &b4}) {
    if (!t->has_value()) continue;
    if ((lq > 1 || lq == 0) && (*t)->size(2) == lq) rowwise = true;  // lq == 0: zero rows, kept as such
    if ((*t)->size(1) != 1 && (*t)->size(1) != hkv) heads_kv = false;
  }
  const int64_t hd = (!rowwise && heads_kv) ? hkv : hout;
  // Output head h reads head h / (hout / Ht) of a tensor with Ht heads: repeat each head.
  auto map_heads = [&](const at::Tensor& t) {
    const int64_t ht = t.size(1);
    if (ht == hd || ht == 1) return t;
    return t.repeat_interleave(hout / ht, 1);
  };
  at::Tensor bias = b4 ? map_heads(*b4).to(at::kFloat) : at::zeros({1, 1, 1, 1}, q.options().dtype(at::kFloat));
  if (m4) {
    const at::Tensor ninf = at::full({}, -std::numeric_limits<float>::infinity(), bias.options());
    bias = at::where(map_heads(*m4), bias, ninf);
  }
  if (bias.size(3) != lk || (lk > 1 && bias.stride(3) != 1))
    bias = bias.expand({bias.size(0), bias.size(1), bias.size(2), lk}).contiguous();
  // The core reads a row stride of 0 as "one row for all queries" (row-broadcast dbias sums): a
  // per-row bias given as a stride-0 expand over Lq must be materialised to keep per-row gradients.
  if (rowwise && bias.size(2) == lq && bias.stride(2) == 0) bias = bias.contiguous();
  cb.has_bias = true;
  cb.bias = bias.expand({B, hd, rowwise ? lq : 1, lk});
  return cb;
}

at::Tensor reduce_dbias(const at::Tensor& dbias_core, const at::Tensor& attn_bias, int64_t hq, int64_t hkv) {
  (void)hq;
  (void)hkv;
  at::Tensor b4 = attn_bias;
  while (b4.dim() < 4) b4 = b4.unsqueeze(0);
  at::Tensor d = dbias_core;
  const int64_t B = d.size(0), hd = d.size(1), R = d.size(2), lk = d.size(3);
  const int64_t hb = b4.size(1);
  if (hb != hd) {
    if (hb == 1) {
      d = d.sum(1, /*keepdim=*/true);
    } else {
      TORCH_CHECK(hd % hb == 0, "masked_bias: internal head mapping error");
      d = d.reshape({B, hb, hd / hb, R, lk}).sum(2);
    }
  }
  if (b4.size(2) == 1 && d.size(2) != 1) d = d.sum(2, true);
  if (b4.size(0) == 1 && d.size(0) != 1) d = d.sum(0, true);
  if (b4.size(3) == 1 && d.size(3) != 1) d = d.sum(3, true);
  return d.reshape(attn_bias.sizes()).to(attn_bias.scalar_type());
}

}  // namespace attnkit::dma
