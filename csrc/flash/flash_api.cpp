#include "flash/flash_api.h"
#include "flash/flash_validate.h"

#include <cmath>
#include <cstring>

namespace attnkit::flash {

ElemType elem_type_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return ElemType::kFloat16;
    case at::kBFloat16:
      return ElemType::kBFloat16;
    case at::kFloat:
      return ElemType::kFloat32;
    case at::kDouble:
      return ElemType::kFloat64;
    default:
      TORCH_CHECK(false, "flash core: unsupported dtype ", t, " (expected float16, bfloat16, float32 or float64)");
  }
}

int64_t output_heads(int64_t hq, int64_t hkv) {
  TORCH_CHECK(hq > 0 && hkv > 0, "flash core: head counts must be positive (got ", hq, " and ", hkv, ")");
  TORCH_CHECK(hq % hkv == 0 || hkv % hq == 0, "flash core: the number of query heads (", hq,
              ") and of key/value heads (", hkv, ") must divide one another");
  return std::max(hq, hkv);
}

FlashParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "flash core: q, k, v must be 4-D [B, L, H, D]");
  FlashParams p;
  std::memset(&p, 0, sizeof(p));
  p.batch = static_cast<int>(q.size(0));
  p.num_segments = 1;
  p.seqlen_q = static_cast<int>(q.size(1));
  p.seqlen_k = static_cast<int>(k.size(1));
  p.h_q = static_cast<int>(q.size(2));
  p.h_kv = static_cast<int>(k.size(2));
  p.h_out = static_cast<int>(output_heads(p.h_q, p.h_kv));
  p.head_dim = static_cast<int>(q.size(3));
  p.q_group = p.h_out / p.h_q;
  p.kv_group = p.h_out / p.h_kv;

  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_row_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0);
  p.k_row_stride = k.stride(1);
  p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0);
  p.v_row_stride = v.stride(1);
  p.v_head_stride = v.stride(2);

  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * M_LOG2E);
  p.causal = causal;
  p.window_left = -1;
  p.window_right = -1;
  p.bias_head_group = 1;
  p.self_score = 0.f;
  p.dtype = elem_type_of(q.scalar_type());
  return p;
}

std::tuple<at::Tensor, at::Tensor> alloc_output(const FlashParams& p, const at::Tensor& q) {
  const int64_t rows = int64_t(p.num_segments) * p.seqlen_q;
  at::Tensor o = at::empty({p.batch, rows, p.h_out, p.head_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.h_out, rows}, q.options().dtype(at::kFloat));
  return {o, lse};
}

void set_output(FlashParams& p, const at::Tensor& o, const at::Tensor& lse) {
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "flash core: lse must be float32");
  TORCH_CHECK(lse.size(2) <= 1 || lse.stride(2) == 1, "flash core: lse rows must be contiguous");
  p.o = o.data_ptr();
  p.o_batch_stride = o.stride(0);
  p.o_row_stride = o.stride(1);
  p.o_head_stride = o.stride(2);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = lse.stride(0);
  p.lse_head_stride = lse.stride(1);
}

void set_backward(FlashParams& p, const at::Tensor& dout, const at::Tensor& dq, const at::Tensor& dk,
                  const at::Tensor& dv) {
  p.dout = dout.data_ptr();
  p.do_batch_stride = dout.stride(0);
  p.do_row_stride = dout.stride(1);
  p.do_head_stride = dout.stride(2);
  p.dq = dq.data_ptr();
  p.dq_batch_stride = dq.stride(0);
  p.dq_row_stride = dq.stride(1);
  p.dq_head_stride = dq.stride(2);
  p.dk = dk.data_ptr();
  p.dk_batch_stride = dk.stride(0);
  p.dk_row_stride = dk.stride(1);
  p.dk_head_stride = dk.stride(2);
  p.dv = dv.data_ptr();
  p.dv_batch_stride = dv.stride(0);
  p.dv_row_stride = dv.stride(1);
  p.dv_head_stride = dv.stride(2);
}

void set_workspaces(FlashParams& p, const at::Tensor& delta, const at::Tensor& dq_accum) {
  TORCH_CHECK(delta.scalar_type() == at::kFloat && dq_accum.scalar_type() == at::kFloat,
              "flash core: delta and dq_accum must be float32");
  TORCH_CHECK(delta.is_contiguous() && dq_accum.is_contiguous(), "flash core: delta and dq_accum must be contiguous");
  TORCH_CHECK(delta.dim() == 3 && delta.stride(0) == p.lse_batch_stride && delta.stride(1) == p.lse_head_stride,
              "flash core: delta must have the layout of lse (call set_output first)");
  TORCH_CHECK(dq_accum.dim() == 4 || dq_accum.dim() == 5, "flash core: dq_accum must be 4-D or 5-D (split)");
  const int64_t off = dq_accum.dim() - 4;
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dq_splits = off ? static_cast<int>(dq_accum.size(0)) : 0;
  p.dqa_split_stride = off ? dq_accum.stride(0) : 0;
  p.dqa_batch_stride = dq_accum.stride(off);
  p.dqa_row_stride = dq_accum.stride(off + 1);
  p.dqa_head_stride = dq_accum.stride(off + 2);
}

at::Tensor alloc_dq_accum(const FlashParams& p, const at::TensorOptions& options, bool deterministic) {
  const int64_t rows = int64_t(p.num_segments) * p.seqlen_q;
  const auto opts = options.dtype(at::kFloat);
  if (!deterministic) return at::zeros({p.batch, rows, p.h_q, p.head_dim}, opts);
  // bounded by the window for causal local attention (see dq_split_key_blocks)
  const int64_t splits = int64_t(dq_split_key_blocks(p)) * p.q_group;
  return at::zeros({std::max<int64_t>(splits, 1), p.batch, rows, p.h_q, p.head_dim}, opts);
}

void set_bias(FlashParams& p, const at::Tensor& bias, const at::Tensor* dbias) {
  TORCH_CHECK(bias.dim() == 4 && bias.scalar_type() == at::kFloat, "flash core: bias must be float32 [B, H, R, Lk]");
  TORCH_CHECK(bias.size(3) <= 1 || bias.stride(3) == 1, "flash core: bias must be contiguous in its last dimension");
  const int64_t hb = bias.size(1);
  TORCH_CHECK(bias.size(0) == p.batch, "flash core: bias must have the batch size (expand it to broadcast)");
  TORCH_CHECK(hb > 0 && p.h_out % hb == 0, "flash core: bias heads (", hb, ") must divide the output heads (", p.h_out,
              ")");
  p.bias = bias.data_ptr<float>();
  p.bias_batch_stride = bias.stride(0);
  p.bias_head_stride = bias.stride(1);
  p.bias_row_stride = bias.size(2) == 1 ? 0 : bias.stride(2);
  p.bias_head_group = static_cast<int>(p.h_out / hb);
  if (dbias) {
    TORCH_CHECK(dbias->scalar_type() == at::kFloat && dbias->sizes() == bias.sizes(),
                "flash core: dbias must be float32 with the shape of bias");
    TORCH_CHECK(dbias->size(3) <= 1 || dbias->stride(3) == 1, "flash core: dbias must be contiguous in its last dim");
    p.dbias = dbias->data_ptr<float>();
    p.dbias_batch_stride = dbias->stride(0);
    p.dbias_head_stride = dbias->stride(1);
    p.dbias_row_stride = dbias->size(2) == 1 ? 0 : dbias->stride(2);
  }
}

void set_row_threshold(FlashParams& p, const at::Tensor& thr, const at::Tensor& tie) {
  TORCH_CHECK(thr.scalar_type() == at::kFloat && tie.scalar_type() == at::kInt,
              "flash core: row_thr must be float32 and row_tie int32");
  TORCH_CHECK(thr.dim() == 3 && thr.sizes() == tie.sizes() && thr.strides() == tie.strides(),
              "flash core: row_thr and row_tie must be [B, h_kv, rows] with equal strides");
  TORCH_CHECK(thr.size(2) <= 1 || thr.stride(2) == 1, "flash core: row_thr rows must be contiguous");
  p.row_thr = thr.data_ptr<float>();
  p.row_tie = tie.data_ptr<int>();
  p.thr_batch_stride = thr.stride(0);
  p.thr_head_stride = thr.stride(1);
}

void set_segments(FlashParams& p, const at::Tensor& q_index, const at::Tensor& k_index) {
  for (const at::Tensor* t : {&q_index, &k_index}) {
    TORCH_CHECK(t->dim() == 4 && t->scalar_type() == at::kInt, "flash core: gather indices must be int32 [B, H, S, w]");
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1, "flash core: gather indices must be contiguous in w");
    TORCH_CHECK(t->size(2) <= 1 || t->stride(2) == t->size(3), "flash core: gather index segments must be packed");
  }
  TORCH_CHECK(q_index.size(2) == k_index.size(2), "flash core: q_index and k_index must have the same segment count");
  p.num_segments = static_cast<int>(q_index.size(2));
  p.seqlen_q = static_cast<int>(q_index.size(3));
  p.seqlen_k = static_cast<int>(k_index.size(3));
  p.q_index = q_index.data_ptr<int>();
  p.k_index = k_index.data_ptr<int>();
  p.q_index_batch_stride = q_index.stride(0);
  p.q_index_head_stride = q_index.stride(1);
  p.k_index_batch_stride = k_index.stride(0);
  p.k_index_head_stride = k_index.stride(1);
}

void set_varlen(FlashParams& p, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                int64_t max_seqlen_k) {
  TORCH_CHECK(p.batch == 1 && p.num_segments == 1, "flash core: set_varlen expects [1, total, H, D] views");
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt && cu_seqlens_k.scalar_type() == at::kInt &&
                  cu_seqlens_q.is_contiguous() && cu_seqlens_k.is_contiguous() &&
                  cu_seqlens_q.numel() == cu_seqlens_k.numel() && cu_seqlens_q.numel() >= 1,
              "flash core: cu_seqlens must be contiguous int32 [batch + 1]");
  p.total_q = p.seqlen_q;
  p.batch = static_cast<int>(cu_seqlens_q.numel() - 1);
  p.seqlen_q = static_cast<int>(max_seqlen_q);
  p.seqlen_k = static_cast<int>(max_seqlen_k);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = 0;
  p.o_batch_stride = p.lse_batch_stride = p.do_batch_stride = 0;
  p.dqa_batch_stride = p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = 0;
}

void set_seqused_k(FlashParams& p, const at::Tensor& seqused_k) {
  TORCH_CHECK(seqused_k.scalar_type() == at::kInt && seqused_k.is_contiguous() && seqused_k.numel() == p.batch,
              "flash core: seqused_k must be contiguous int32 [batch]");
  p.seqused_k = seqused_k.data_ptr<int>();
}

std::tuple<at::Tensor, at::Tensor> set_split_workspaces(FlashParams& p, int64_t num_splits,
                                                        const at::TensorOptions& options) {
  TORCH_CHECK(num_splits >= 0 && num_splits <= kFlashMaxSplits, "flash core: num_splits must be in [0, ",
              kFlashMaxSplits, "], got ", num_splits);
  if (num_splits <= 1) {
    p.num_splits = 1;
    p.o_accum = p.lse_accum = nullptr;
    return {at::Tensor(), at::Tensor()};
  }
  const int64_t rows = int64_t(p.num_segments) * p.seqlen_q;
  const at::TensorOptions f32 = options.dtype(at::kFloat);
  at::Tensor o_accum = at::empty({num_splits, p.batch, p.h_out, rows, p.head_dim}, f32);
  at::Tensor lse_accum = at::empty({num_splits, p.batch, p.h_out, rows}, f32);
  p.num_splits = static_cast<int>(num_splits);
  p.o_accum = o_accum.data_ptr<float>();
  p.lse_accum = lse_accum.data_ptr<float>();
  return {o_accum, lse_accum};
}

void set_compact_rows(FlashParams& p, const at::Tensor& q_index, const at::Tensor& q_count) {
  TORCH_CHECK(q_index.dim() == 4 && q_index.scalar_type() == at::kInt && q_index.size(2) == 1,
              "flash core: compact q_index must be int32 [B, H, 1, w]");
  TORCH_CHECK(q_index.size(0) == p.batch && q_index.size(1) == p.h_out, "flash core: q_index must be [B, h_out, 1, w]");
  TORCH_CHECK(q_index.size(3) <= 1 || q_index.stride(3) == 1, "flash core: q_index must be contiguous in w");
  TORCH_CHECK(q_count.scalar_type() == at::kInt && q_count.dim() == 2 && q_count.size(0) == p.batch &&
                  q_count.size(1) == p.h_out && q_count.is_contiguous(),
              "flash core: q_count must be contiguous int32 [B, h_out]");
  p.num_segments = 1;
  p.seqlen_q = static_cast<int>(q_index.size(3));
  p.q_index = q_index.data_ptr<int>();
  p.q_index_batch_stride = q_index.stride(0);
  p.q_index_head_stride = q_index.stride(1);
  p.k_index = nullptr;
  p.q_count = q_count.data_ptr<int>();
}

at::Tensor cuda_aligned(const at::Tensor& t) {
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; ok && d + 1 < t.dim(); ++d) ok = t.size(d) <= 1 || t.stride(d) % 8 == 0;
  ok = ok && (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1);
  if (ok) return t;
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

}  // namespace attnkit::flash
