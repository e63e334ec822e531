#include "sqa/sqa_api.h"

#include "flash/flash_api.h"
#include "flash/flash_checks.h"

#include <algorithm>
#include <limits>

namespace attnkit::sqa {

void check_fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool for_cuda_kernel) {
  flash::check_qkv_inputs(q, k, v, for_cuda_kernel);
}

void check_bwd_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, bool for_cuda_kernel) {
  flash::check_qkv_inputs(q, k, v, for_cuda_kernel);
  flash::check_backward_inputs(dout, q, k, out, lse);
}

void set_window(flash::FlashParams& p, int64_t window_left, int64_t window_right) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "window_size values must be >= -1 (-1: unbounded), got (",
              window_left, ", ", window_right, ")");
  // A window wider than any sequence is unbounded in effect; the clamp keeps it inside int.
  constexpr int64_t kMax = int64_t(1) << 30;
  p.window_left = static_cast<int>(std::min(window_left, kMax));
  p.window_right = static_cast<int>(std::min(window_right, kMax));
}

std::tuple<flash::FlashParams, at::Tensor, at::Tensor> fwd_setup(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, bool causal, double scale,
                                                                 int64_t window_left, int64_t window_right) {
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  set_window(p, window_left, window_right);
  auto [out, lse] = flash::alloc_output(p, q);
  flash::set_output(p, out, lse);
  return {p, out, lse};
}

namespace {

std::vector<int> host_int32(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU).contiguous();
  return std::vector<int>(c.data_ptr<int>(), c.data_ptr<int>() + c.numel());
}

void check_offsets(const char* name, const std::vector<int>& cu, int64_t rows, int64_t max_len,
                   const char* max_name) {
  TORCH_CHECK(cu[0] >= 0, name, "[0] must be >= 0, got ", cu[0]);
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], name, " must be non-decreasing, got ", name, "[", b, "] = ", cu[b], " > ", name,
                "[", b + 1, "] = ", cu[b + 1]);
    TORCH_CHECK(cu[b + 1] - cu[b] <= max_len, max_name, " (", max_len, ") is smaller than sequence ", b, "'s length ",
                cu[b + 1] - cu[b]);
  }
  TORCH_CHECK(cu.back() <= rows, name, " ends at ", cu.back(), ", past the tensor's ", rows, " rows");
}

}  // namespace

Varlen check_varlen_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                           const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                           bool for_cuda_kernel) {
  ATTNKIT_CHECK_DIM(q, 3);
  ATTNKIT_CHECK_DIM(k, 3);
  ATTNKIT_CHECK_DIM(v, 3);
  TORCH_CHECK(v.size(0) == k.size(0), "v must have the rows of k (", k.size(0), "), got ", v.size(0));
  flash::check_qkv_inputs(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), for_cuda_kernel);
  for (const at::Tensor* t : {&cu_seqlens_q, &cu_seqlens_k}) {
    const char* name = t == &cu_seqlens_q ? "cu_seqlens_q" : "cu_seqlens_k";
    TORCH_CHECK(t->dim() == 1 && t->size(0) >= 1, name, " must be 1-D [batch + 1], got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kInt, name, " must be int32, got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), name, " must be on the device of q (", q.device(), "), got ", t->device());
  }
  TORCH_CHECK(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), "cu_seqlens_k must have the size of cu_seqlens_q (",
              cu_seqlens_q.size(0), "), got ", cu_seqlens_k.size(0));
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_q <= std::numeric_limits<int>::max(),
              "max_seqlen_q must be in [0, 2^31), got ", max_seqlen_q);
  TORCH_CHECK(max_seqlen_k >= 0 && max_seqlen_k <= std::numeric_limits<int>::max(),
              "max_seqlen_k must be in [0, 2^31), got ", max_seqlen_k);
  Varlen r;
  r.cu_q = host_int32(cu_seqlens_q);
  r.cu_k = host_int32(cu_seqlens_k);
  r.batch = cu_seqlens_q.size(0) - 1;
  check_offsets("cu_seqlens_q", r.cu_q, q.size(0), max_seqlen_q, "max_seqlen_q");
  check_offsets("cu_seqlens_k", r.cu_k, k.size(0), max_seqlen_k, "max_seqlen_k");
  return r;
}

std::vector<int> check_kvcache_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
                                      const at::Tensor& cache_seqlens, int64_t num_splits, bool for_cuda_kernel) {
  flash::check_qkv_inputs(q, k_cache, v_cache, for_cuda_kernel);
  TORCH_CHECK(k.has_value() == v.has_value(), "k and v must be given together (or neither)");
  const int64_t B = q.size(0), lmax = k_cache.size(1);
  int64_t lnew = 0;
  if (k) {
    ATTNKIT_CHECK_DIM((*k), 4);
    TORCH_CHECK(k->scalar_type() == q.scalar_type() && v->scalar_type() == q.scalar_type(),
                "k and v must have the dtype of q (", q.scalar_type(), ")");
    TORCH_CHECK(k->device() == q.device() && v->device() == q.device(), "k and v must be on the device of q");
    TORCH_CHECK(k->size(0) == B && k->size(2) == k_cache.size(2) && k->size(3) == k_cache.size(3),
                "k must be [B, Lnew, Hkv, D] with B, Hkv, D of k_cache ", k_cache.sizes(), ", got ", k->sizes());
    TORCH_CHECK(v->sizes() == k->sizes(), "v must have the shape of k ", k->sizes(), ", got ", v->sizes());
    lnew = k->size(1);
  }
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, "cache_seqlens must be [B] = [", B,
              "], got shape ", cache_seqlens.sizes());
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens must be int32, got ", cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.device() == q.device(), "cache_seqlens must be on the device of q");
  TORCH_CHECK(num_splits >= 0, "num_splits must be >= 0 (0: automatic), got ", num_splits);
  std::vector<int> cs = host_int32(cache_seqlens);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cs[b] >= 0, "cache_seqlens[", b, "] must be >= 0, got ", cs[b]);
    TORCH_CHECK(cs[b] + lnew <= lmax, "the cache is too short: cache_seqlens[", b, "] (", cs[b], ") + ", lnew,
                " new keys > its ", lmax, " rows");
  }
  return cs;
}

void append_kv(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
               const std::vector<int>& cache_seqlens) {
  const int64_t lnew = k.size(1);
  if (lnew == 0) return;
  for (int64_t b = 0; b < k.size(0); ++b) {
    k_cache[b].narrow(0, cache_seqlens[b], lnew).copy_(k[b]);
    v_cache[b].narrow(0, cache_seqlens[b], lnew).copy_(v[b]);
  }
}

}  // namespace attnkit::sqa
