// Host-side helpers shared by the CPU and CUDA registrations of the routing ops: argument checks
// (every message names the argument) and filling the flash core's FlashParams for clusters.
#pragma once
#include <torch/all.h>

#include <cmath>
#include <limits>
#include <optional>

#include "common/checks.h"
#include "flash/flash_params.h"

namespace attnkit::routing {

// Score of a query with its own token under shared QK (Reformer / Routing Transformer convention).
constexpr float kSelfScore = -5e4f;

inline flash::ElemType elem_type_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return flash::ElemType::kFloat16;
    case at::kBFloat16: return flash::ElemType::kBFloat16;
    case at::kFloat: return flash::ElemType::kFloat32;
    case at::kDouble: return flash::ElemType::kFloat64;
    default: TORCH_CHECK(false, "q must be float16, bfloat16, float32 or float64 (got ", t, ")");
  }
}

struct AttnShapes {
  int64_t B, L, H, D;
  int64_t S;       // segments (clusters); 1 without indices
  int64_t wq, wk;  // rows per segment
  bool indexed;
};

inline void check_index(const at::Tensor& idx, const char* name, int64_t B, int64_t H, const at::Tensor& q) {
  TORCH_CHECK(idx.dim() == 4, name, " must have 4 dimensions [B, H, C, w] (got ", idx.dim(), ")");
  TORCH_CHECK(idx.scalar_type() == at::kInt, name, " must be int32 (got ", idx.scalar_type(), ")");
  TORCH_CHECK(idx.device() == q.device(), name, " must be on ", q.device(), " (got ", idx.device(), ")");
  TORCH_CHECK(idx.size(0) == B && idx.size(1) == H, name, " must have shape [B=", B, ", H=", H,
              ", C, w] (got ", idx.sizes(), ")");
}

inline AttnShapes check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const std::optional<at::Tensor>& q_idx,
                                         const std::optional<at::Tensor>& k_idx) {
  ATTNKIT_CHECK_DIM(q, 4);
  ATTNKIT_CHECK_DIM(k, 4);
  ATTNKIT_CHECK_DIM(v, 4);
  TORCH_CHECK(k.device() == q.device(), "k must be on ", q.device(), " (got ", k.device(), ")");
  TORCH_CHECK(v.device() == q.device(), "v must be on ", q.device(), " (got ", v.device(), ")");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (", q.scalar_type(), ", got ",
              k.scalar_type(), ")");
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), "v must have the dtype of q (", q.scalar_type(), ", got ",
              v.scalar_type(), ")");
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), " (got ", k.sizes(), ")");
  TORCH_CHECK(v.sizes() == q.sizes(), "v must have the shape of q ", q.sizes(), " (got ", v.sizes(), ")");
  elem_type_of(q.scalar_type());
  AttnShapes s{q.size(0), q.size(1), q.size(2), q.size(3), 1, q.size(1), q.size(1), false};
  TORCH_CHECK(s.L < std::numeric_limits<int>::max(), "q: sequence length must be < 2^31");
  TORCH_CHECK(q_idx.has_value() == k_idx.has_value(), "q_idx and k_idx must both be given or both be None");
  if (q_idx.has_value()) {
    check_index(*q_idx, "q_idx", s.B, s.H, q);
    check_index(*k_idx, "k_idx", s.B, s.H, q);
    TORCH_CHECK(k_idx->size(2) == q_idx->size(2), "k_idx must have as many clusters as q_idx (", q_idx->size(2),
                ", got ", k_idx->size(2), ")");
    s.S = q_idx->size(2);
    s.wq = q_idx->size(3);
    s.wk = k_idx->size(3);
    s.indexed = true;
    TORCH_CHECK(s.S * s.wq < std::numeric_limits<int>::max() && s.S * s.wk < std::numeric_limits<int>::max(),
                "q_idx/k_idx: clusters * window must be < 2^31");
  }
  return s;
}

// Index values must lie in [0, L). Reads the values: CPU only (a device check would synchronise).
inline void check_index_range_cpu(const at::Tensor& idx, const char* name, int64_t L) {
  if (idx.numel() == 0) return;
  auto mm = at::aminmax(idx);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < L, name, " values must lie in [0, L=", L, ") (got [", lo, ", ", hi, "])");
}

// Fills the shapes, inputs, masks and gathers of the core. Outputs / backward fields are the caller's.
// q_idx / k_idx must be contiguous int32 [B, H, S, w] when given.
inline flash::FlashParams core_params(const AttnShapes& s, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor* q_idx, const at::Tensor* k_idx,
                                      bool causal, int64_t window_left, bool self_mask, double scale) {
  flash::FlashParams p{};
  p.batch = static_cast<int>(s.B);
  p.num_segments = static_cast<int>(s.S);
  p.seqlen_q = static_cast<int>(s.wq);
  p.seqlen_k = static_cast<int>(s.wk);
  p.h_q = p.h_kv = p.h_out = static_cast<int>(s.H);
  p.head_dim = static_cast<int>(s.D);
  p.q_group = p.kv_group = 1;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = causal;
  p.window_left = window_left < 0 ? -1 : static_cast<int>(std::min<int64_t>(window_left, std::numeric_limits<int>::max()));
  p.bias = nullptr;
  p.bias_head_group = 1;
  p.row_thr = nullptr;
  p.row_tie = nullptr;
  p.active_list = nullptr;
  p.active_count = nullptr;
  if (q_idx != nullptr) {
    p.q_index = q_idx->data_ptr<int>();
    p.k_index = k_idx->data_ptr<int>();
    p.q_index_batch_stride = s.H * s.S * s.wq, p.q_index_head_stride = s.S * s.wq;
    p.k_index_batch_stride = s.H * s.S * s.wk, p.k_index_head_stride = s.S * s.wk;
  }
  p.self_mask = self_mask;
  p.self_score = kSelfScore;
  p.dtype = elem_type_of(q.scalar_type());
  return p;
}

inline void set_outputs(flash::FlashParams& p, const at::Tensor& o, const at::Tensor& lse) {
  p.o = o.data_ptr();
  p.o_batch_stride = o.stride(0), p.o_row_stride = o.stride(1), p.o_head_stride = o.stride(2);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
}

inline void set_grads(flash::FlashParams& p, const at::Tensor& dout, const at::Tensor& dq, const at::Tensor& dk,
                      const at::Tensor& dv) {
  p.dout = dout.data_ptr();
  p.do_batch_stride = dout.stride(0), p.do_row_stride = dout.stride(1), p.do_head_stride = dout.stride(2);
  p.dq = dq.data_ptr();
  p.dq_batch_stride = dq.stride(0), p.dq_row_stride = dq.stride(1), p.dq_head_stride = dq.stride(2);
  p.dk = dk.data_ptr();
  p.dk_batch_stride = dk.stride(0), p.dk_row_stride = dk.stride(1), p.dk_head_stride = dk.stride(2);
  p.dv = dv.data_ptr();
  p.dv_batch_stride = dv.stride(0), p.dv_row_stride = dv.stride(1), p.dv_head_stride = dv.stride(2);
}

// ---- routing_assign / k-means argument checks ----

inline void check_assign_inputs(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& centroids,
                                int64_t window, bool shared_qk) {
  TORCH_CHECK(q.dim() == 4, "q must have 4 dimensions [B, L, H, D] (got ", q.dim(), ")");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "q must be a floating tensor (got ", q.scalar_type(), ")");
  TORCH_CHECK(centroids.dim() == 3, "centroids must have 3 dimensions [H, C, D] (got ", centroids.dim(), ")");
  TORCH_CHECK(at::isFloatingType(centroids.scalar_type()), "centroids must be a floating tensor (got ",
              centroids.scalar_type(), ")");
  TORCH_CHECK(centroids.device() == q.device(), "centroids must be on ", q.device(), " (got ", centroids.device(), ")");
  TORCH_CHECK(centroids.size(0) == q.size(2) && centroids.size(2) == q.size(3),
              "centroids must have shape [H=", q.size(2), ", C, D=", q.size(3), "] (got ", centroids.sizes(), ")");
  TORCH_CHECK(centroids.size(1) >= 1, "centroids must hold at least one cluster");
  TORCH_CHECK(q.size(1) < std::numeric_limits<int>::max(), "q: sequence length must be < 2^31");
  TORCH_CHECK(window >= 1 && window <= q.size(1), "window must lie in [1, L=", q.size(1), "] (got ", window, ")");
  if (!shared_qk) {
    TORCH_CHECK(k.has_value(), "k must be given when shared_qk is False");
    TORCH_CHECK(k->sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), " (got ", k->sizes(), ")");
    TORCH_CHECK(k->scalar_type() == q.scalar_type(), "k must have the dtype of q (", q.scalar_type(), ", got ",
                k->scalar_type(), ")");
    TORCH_CHECK(k->device() == q.device(), "k must be on ", q.device(), " (got ", k->device(), ")");
  }
}

inline void check_kmeans_inputs(const at::Tensor& x, const at::Tensor& centroids) {
  TORCH_CHECK(x.dim() == 3, "x must have 3 dimensions [N, H, D] (got ", x.dim(), ")");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating tensor (got ", x.scalar_type(), ")");
  TORCH_CHECK(centroids.dim() == 3, "centroids must have 3 dimensions [H, C, D] (got ", centroids.dim(), ")");
  TORCH_CHECK(centroids.scalar_type() == at::kFloat || centroids.scalar_type() == at::kDouble,
              "centroids must be float32 or float64 (got ", centroids.scalar_type(), ")");
  TORCH_CHECK(centroids.device() == x.device(), "centroids must be on ", x.device(), " (got ", centroids.device(), ")");
  TORCH_CHECK(centroids.size(0) == x.size(1) && centroids.size(2) == x.size(2),
              "centroids must have shape [H=", x.size(1), ", C, D=", x.size(2), "] (got ", centroids.sizes(), ")");
  TORCH_CHECK(centroids.size(1) >= 1, "centroids must hold at least one cluster");
  TORCH_CHECK(centroids.size(1) < std::numeric_limits<int>::max(), "centroids: too many clusters");
}

inline void check_assign_tensor(const at::Tensor& a, const at::Tensor& x, int64_t C) {
  TORCH_CHECK(a.scalar_type() == at::kInt, "assign must be int32 (got ", a.scalar_type(), ")");
  TORCH_CHECK(a.dim() == 2 && a.size(0) == x.size(0) && a.size(1) == x.size(1),
              "assign must have shape [N=", x.size(0), ", H=", x.size(1), "] (got ", a.sizes(), ")");
  TORCH_CHECK(a.device() == x.device(), "assign must be on ", x.device(), " (got ", a.device(), ")");
}

}  // namespace attnkit::routing
