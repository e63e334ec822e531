// Host-side helpers shared by the CPU and CUDA registrations of the routing ops: argument checks
// (every message names the argument) and filling the flash core's FlashParams for clusters.
#pragma once
#include <torch/all.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "flash/flash_api.h"
#include "flash/flash_params.h"

namespace attnkit::routing {

// Score of a query with its own token under shared QK (Reformer / Routing Transformer convention).
constexpr float kSelfScore = -5e4f;

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
  flash::elem_type_of(q.scalar_type());
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

// Values of an index tensor must lie in [0, bound) (bound_name: "L" or "C"). Checked on the host
// before any kernel reads them, on every device, with the same message: on CUDA the min and max are
// reduced on the device and copied back together (one sync), instead of a device-side assert that
// would leave the CUDA context unusable.
inline void check_value_range(const at::Tensor& idx, const char* name, const char* bound_name, int64_t bound) {
  if (idx.numel() == 0) return;
  auto mm = at::aminmax(idx);
  const at::Tensor both = at::stack({std::get<0>(mm), std::get<1>(mm)}).to(at::kLong).cpu();
  const int64_t lo = both[0].item<int64_t>(), hi = both[1].item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < bound, name, " values must lie in [0, ", bound_name, "=", bound, ") (got [", lo, ", ",
              hi, "])");
}

inline void check_index_range(const at::Tensor& idx, const char* name, int64_t L) {
  check_value_range(idx, name, "L", L);
}

// q_idx / k_idx made contiguous, their values checked on the host; undefined tensors when not indexed.
struct Indices {
  at::Tensor q, k;
  const at::Tensor* q_ptr() const { return q.defined() ? &q : nullptr; }
  const at::Tensor* k_ptr() const { return k.defined() ? &k : nullptr; }
};
inline Indices checked_indices(const AttnShapes& s, const std::optional<at::Tensor>& q_idx,
                               const std::optional<at::Tensor>& k_idx) {
  Indices ix;
  if (s.indexed) {
    ix.q = q_idx->contiguous();
    ix.k = k_idx->contiguous();
    check_index_range(ix.q, "q_idx", s.L);
    check_index_range(ix.k, "k_idx", s.L);
  }
  return ix;
}

// routing_fwd's outputs. The core writes `core`: out_seg when indexed (out is then its combine,
// left undefined here), else out itself (out_seg is then empty).
struct FwdOutputs {
  at::Tensor out_seg, out, lse, core;
};
inline FwdOutputs alloc_fwd_outputs(const AttnShapes& s, const at::Tensor& q) {
  FwdOutputs f;
  f.out_seg = s.indexed ? at::empty({s.B, s.S * s.wq, s.H, s.D}, q.options()) : at::empty({0}, q.options());
  if (!s.indexed) f.out = at::empty({s.B, s.L, s.H, s.D}, q.options());
  f.lse = at::empty({s.B, s.H, s.S * s.wq}, q.options().dtype(at::kFloat));
  f.core = s.indexed ? f.out_seg : f.out;
  return f;
}

// routing_bwd's dout and the forward's saved out_seg and lse.
inline void check_bwd_saved(const AttnShapes& s, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out_seg,
                            const at::Tensor& lse) {
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout must have the shape of q ", q.sizes(), " (got ", dout.sizes(), ")");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "dout must have the dtype of q");
  TORCH_CHECK(dout.device() == q.device(), "dout must be on ", q.device());
  const int64_t rows_q = s.S * s.wq;
  const std::vector<int64_t> o_shape = s.indexed ? std::vector<int64_t>{s.B, rows_q, s.H, s.D} : q.sizes().vec();
  TORCH_CHECK(out_seg.sizes() == o_shape, "out_seg must have shape ", o_shape, " (got ", out_seg.sizes(), ")");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({s.B, s.H, rows_q}) && lse.scalar_type() == at::kFloat,
              "lse must be float32 of shape [", s.B, ", ", s.H, ", ", rows_q, "]");
}

// The core's parameters for routing: shapes, inputs, masks and (when indexed) the cluster gathers.
// q_idx / k_idx must be contiguous int32 [B, H, S, w] when given. Outputs / backward fields and the
// key-padding bias are set by the caller (flash_api.h helpers).
inline flash::FlashParams core_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor* q_idx, const at::Tensor* k_idx, bool causal,
                                      int64_t window_left, bool self_mask, double scale) {
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  p.window_left = window_left < 0 ? -1 : static_cast<int>(std::min<int64_t>(window_left, std::numeric_limits<int>::max()));
  if (q_idx != nullptr) flash::set_segments(p, *q_idx, *k_idx);
  p.self_mask = self_mask;
  p.self_score = kSelfScore;
  return p;
}

// key_padding_mask [B, L] bool (True = padded key): checked here; the op turns it into the core's
// row-broadcast additive bias in segment space ([B, H, 1, S*wk], or [B, 1, 1, L] without indices).
inline void check_key_padding_mask(const std::optional<at::Tensor>& m, const AttnShapes& s, const at::Tensor& q) {
  if (!m.has_value()) return;
  TORCH_CHECK(m->scalar_type() == at::kBool, "key_padding_mask must be bool (got ", m->scalar_type(), ")");
  TORCH_CHECK(m->dim() == 2 && m->size(0) == s.B && m->size(1) == s.L, "key_padding_mask must have shape [B=", s.B,
              ", L=", s.L, "] (got ", m->sizes(), ")");
  TORCH_CHECK(m->device() == q.device(), "key_padding_mask must be on ", q.device(), " (got ", m->device(), ")");
  TORCH_CHECK(!s.indexed || s.S == 1,
              "key_padding_mask cannot be combined with q_idx / k_idx (the flash core takes no bias with segments): "
              "pass it to routing_assign, which keeps padded tokens out of the clusters");
}

inline std::vector<int64_t> key_bias_shape(const AttnShapes& s) {
  return s.indexed ? std::vector<int64_t>{s.B, s.H, 1, s.S * s.wk} : std::vector<int64_t>{s.B, 1, 1, s.L};
}

// ---- routing_assign / k-means argument checks ----

inline void check_assign_inputs(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& centroids,
                                int64_t window, bool shared_qk, const std::optional<at::Tensor>& key_padding_mask) {
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "key_padding_mask must be bool (got ", m.scalar_type(), ")");
    TORCH_CHECK(q.dim() != 4 || (m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == q.size(1)),
                "key_padding_mask must have shape [B, L] (got ", m.sizes(), ")");
    TORCH_CHECK(m.device() == q.device(), "key_padding_mask must be on ", q.device(), " (got ", m.device(), ")");
  }
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
  TORCH_CHECK(at::isFloatingType(centroids.scalar_type()), "centroids must be a floating tensor (got ",
              centroids.scalar_type(), ")");
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
