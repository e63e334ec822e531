#include "moh/moh_api.h"

#include <limits>

#include "flash/flash_api.h"
#include "flash/flash_checks.h"

namespace attnkit::moh {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& head_idx,
                  const at::Tensor& head_weight, bool for_cuda_kernel, bool check_values) {
  flash::check_qkv_inputs(q, k, v, for_cuda_kernel);
  const int64_t B = q.size(0), L = q.size(1), hq = q.size(2), hkv = k.size(2);
  TORCH_CHECK(k.size(1) == L, "k must have the sequence length of q (", L, "), got ", k.size(1));
  TORCH_CHECK(hq % hkv == 0, "the head count of q (", hq, ") must be a multiple of that of k and v (", hkv, ")");
  TORCH_CHECK(head_idx.dim() == 3 && head_idx.size(0) == B && head_idx.size(1) == L,
              "head_idx must be [B, L, K] = [", B, ", ", L, ", K], got ", head_idx.sizes());
  TORCH_CHECK(head_idx.scalar_type() == at::kInt || head_idx.scalar_type() == at::kLong,
              "head_idx must be int32 or int64, got ", head_idx.scalar_type());
  TORCH_CHECK(head_weight.sizes() == head_idx.sizes(), "head_weight must have the shape of head_idx ",
              head_idx.sizes(), ", got ", head_weight.sizes());
  TORCH_CHECK(head_weight.scalar_type() == at::kFloat || head_weight.scalar_type() == q.scalar_type(),
              "head_weight must be float32 or the dtype of q (", q.scalar_type(), "), got ",
              head_weight.scalar_type());
  TORCH_CHECK(head_idx.device() == q.device(), "head_idx must be on the device of q (", q.device(), "), got ",
              head_idx.device());
  TORCH_CHECK(head_weight.device() == q.device(), "head_weight must be on the device of q (", q.device(),
              "), got ", head_weight.device());
  TORCH_CHECK(L <= INT32_MAX / 2 && hq <= 65535, "mixture_of_heads_attention: L or Hq too large");
  if (!check_values || head_idx.numel() == 0) return;
  TORCH_CHECK(!((head_idx < -1) | (head_idx >= hq)).any().item<bool>(),
              "head_idx values must lie in [-1, ", hq, ") (-1 marks an empty slot; ", hq, " query heads)");
  if (head_idx.size(2) > 1) {
    const at::Tensor s = std::get<0>(head_idx.sort(-1));
    const int64_t K = s.size(2);
    const at::Tensor a = s.slice(2, 1, K), b = s.slice(2, 0, K - 1);
    TORCH_CHECK(!((a == b) & (a >= 0)).any().item<bool>(),
                "head_idx selects a head twice for one token: the heads of a token must be distinct");
  }
}

void check_bwd_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out_slot,
                      const at::Tensor& lse_slot, const at::Tensor& q_index, const at::Tensor& q_count,
                      const at::Tensor& slot, const at::Tensor& head_idx) {
  const int64_t B = q.size(0), L = q.size(1), hq = q.size(2), D = q.size(3);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(),
              "dout must have the shape and dtype of the output ", q.sizes());
  TORCH_CHECK(dout.device() == q.device(), "dout must be on the device of q");
  TORCH_CHECK(dout.size(3) <= 1 || dout.stride(3) == 1, "dout must be contiguous in its last dimension");
  TORCH_CHECK(out_slot.sizes() == at::IntArrayRef({B, L, hq, D}) && out_slot.scalar_type() == q.scalar_type() &&
                  out_slot.is_contiguous(),
              "out_slot must be the forward's contiguous [B, L, Hq, D] slot-space output");
  TORCH_CHECK(lse_slot.sizes() == at::IntArrayRef({B, hq, L}) && lse_slot.scalar_type() == at::kFloat &&
                  lse_slot.is_contiguous(),
              "lse_slot must be the forward's contiguous fp32 [B, Hq, L]");
  TORCH_CHECK(q_index.sizes() == at::IntArrayRef({B, hq, L}) && q_index.scalar_type() == at::kInt &&
                  q_index.is_contiguous(),
              "q_index must be the forward's contiguous int32 [B, Hq, L]");
  TORCH_CHECK(q_count.sizes() == at::IntArrayRef({B, hq}) && q_count.scalar_type() == at::kInt &&
                  q_count.is_contiguous(),
              "q_count must be the forward's contiguous int32 [B, Hq]");
  TORCH_CHECK(slot.sizes() == head_idx.sizes() && slot.scalar_type() == at::kInt && slot.is_contiguous(),
              "slot must be the forward's contiguous int32 [B, L, K]");
  for (const at::Tensor* t : {&out_slot, &lse_slot, &q_index, &q_count, &slot})
    TORCH_CHECK(t->device() == q.device(), "the forward's residuals must be on the device of q");
}

at::Tensor index_i32(const at::Tensor& head_idx) { return head_idx.to(at::kInt).contiguous(); }
at::Tensor weight_f32(const at::Tensor& head_weight) { return head_weight.to(at::kFloat).contiguous(); }

std::tuple<at::Tensor, at::Tensor> alloc_slot_outputs(const at::Tensor& q) {
  const int64_t B = q.size(0), L = q.size(1), hq = q.size(2), D = q.size(3);
  return {at::zeros({B, L, hq, D}, q.options()),
          at::full({B, hq, L}, -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat))};
}

flash::FlashParams core_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_index,
                               const at::Tensor& q_count, bool causal, double scale) {
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  flash::set_compact_rows(p, q_index.unsqueeze(2), q_count);
  return p;
}

}  // namespace attnkit::moh
