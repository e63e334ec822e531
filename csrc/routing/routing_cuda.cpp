// Routing attention, CUDA registrations: routing (scores + top-w select), the attention through the
// flash core's segment gathers with our combine / scatter kernels, and the online k-means update.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>
#include <torch/library.h>

#include "common/static_switch.h"
#include "flash/flash.h"
#include "routing/routing_api.h"
#include "routing/routing_cuda.h"

namespace attnkit::routing {
namespace {

using at::Tensor;

ElemType kernel_elem_type(at::ScalarType t, const char* name) {
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat, name,
              " must be float16, bfloat16 or float32 on CUDA (got ", t, ")");
  return flash::elem_type_of(t);
}

ScoreParams score_params(const Tensor& x, const Tensor& mu, int64_t B, int64_t L) {
  ScoreParams p{};
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.x_row_stride = x.stride(1);
  p.x_head_stride = x.stride(2);
  p.dtype = kernel_elem_type(x.scalar_type(), "q");
  p.centroids = mu.data_ptr<float>();
  p.B = static_cast<int>(B);
  p.L = static_cast<int>(L);
  p.H = static_cast<int>(mu.size(0));
  p.C = static_cast<int>(mu.size(1));
  p.D = static_cast<int>(mu.size(2));
  return p;
}

// Returns (q_idx, k_idx, assign): assign is [(1 or 2) * B, L, H] int32 (the argmax cluster of q, then
// of k when not shared) when with_assign, else empty.
std::tuple<Tensor, Tensor, Tensor> routing_assign_cuda(const Tensor& q, const std::optional<Tensor>& k,
                                                       const Tensor& centroids, int64_t window, bool shared_qk,
                                                       bool with_assign, const std::optional<Tensor>& key_padding_mask) {
  check_assign_inputs(q, k, centroids, window, shared_qk, key_padding_mask);
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor");
  ATTNKIT_CHECK_LAST_CONTIGUOUS(q);
  if (!shared_qk) ATTNKIT_CHECK_LAST_CONTIGUOUS((*k));
  c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), C = centroids.size(1);
  Tensor mu = centroids.to(at::kFloat).contiguous();
  auto iopts = q.options().dtype(at::kInt);
  Tensor q_idx = at::empty({B, H, C, window}, iopts);
  Tensor k_idx = at::empty({B, H, C, window}, iopts);
  const int64_t nx = shared_qk ? 1 : 2;
  Tensor assign = with_assign ? at::empty({nx * B, L, H}, iopts) : at::empty({0}, iopts);
  if (B * H * L == 0) return {q_idx, k_idx, assign};
  const int64_t rows = B * H * C;
  Tensor scores = at::empty({nx * rows, L}, q.options().dtype(at::kFloat));
  Tensor best = with_assign ? at::zeros({nx * B * H * L}, q.options().dtype(at::kLong)) : Tensor();
  Tensor pad = key_padding_mask.has_value() ? key_padding_mask->contiguous() : Tensor();
  for (int64_t i = 0; i < nx; ++i) {
    const Tensor& x = i == 0 ? q : *k;
    ScoreParams p = score_params(x, mu, B, L);
    p.scores = scores.data_ptr<float>() + i * rows * L;
    p.best = with_assign ? reinterpret_cast<unsigned long long*>(best.data_ptr<int64_t>()) + i * B * H * L : nullptr;
    p.pad = pad.defined() ? pad.data_ptr<bool>() : nullptr;
    launch_routing_scores(p, stream);
  }
  launch_topw_select(scores.data_ptr<float>(), nx * rows, rows, static_cast<int>(L), static_cast<int>(window),
                     q_idx.data_ptr<int>(), k_idx.data_ptr<int>(), stream);
  if (shared_qk) k_idx.copy_(q_idx);
  if (with_assign)
    launch_extract_assign(reinterpret_cast<const unsigned long long*>(best.data_ptr<int64_t>()), nx * B,
                          static_cast<int>(H), static_cast<int>(L), assign.data_ptr<int>(), stream);
  return {q_idx, k_idx, assign};
}

struct Inverse {
  Tensor offsets, cursor, entries;
};

// CSR inverse of idx [B, H, S, w] over L tokens (see launch_build_inverse).
Inverse build_inverse(const Tensor& idx, int64_t L, bool counts_only, cudaStream_t stream) {
  const int64_t BH = idx.size(0) * idx.size(1), SW = idx.size(2) * idx.size(3);
  auto iopts = idx.options();
  Inverse inv;
  inv.offsets = at::zeros({BH, L + 1}, iopts);
  inv.cursor = counts_only ? at::empty({0}, iopts) : at::zeros({BH, L}, iopts);
  inv.entries = counts_only ? at::empty({0}, iopts) : at::empty({BH, SW}, iopts);
  launch_build_inverse(idx.data_ptr<int>(), BH, SW, static_cast<int>(L), inv.offsets.data_ptr<int>(),
                       counts_only ? nullptr : inv.cursor.data_ptr<int>(),
                       counts_only ? nullptr : inv.entries.data_ptr<int>(), counts_only, stream);
  return inv;
}

Tensor combine(const Tensor& seg, const Inverse& inv, int64_t L, bool mean, cudaStream_t stream) {
  Tensor out = at::empty({seg.size(0), L, seg.size(2), seg.size(3)}, seg.options());
  CombineParams p{};
  p.seg = seg.data_ptr();
  p.seg_batch_stride = seg.stride(0), p.seg_row_stride = seg.stride(1), p.seg_head_stride = seg.stride(2);
  p.offsets = inv.offsets.data_ptr<int>();
  p.entries = inv.entries.data_ptr<int>();
  p.SW = seg.size(1);
  p.B = static_cast<int>(seg.size(0)), p.L = static_cast<int>(L), p.H = static_cast<int>(seg.size(2)),
  p.D = static_cast<int>(seg.size(3));
  p.mean = mean;
  p.out = out.data_ptr();
  p.dtype = flash::elem_type_of(seg.scalar_type());
  launch_combine(p, stream);
  return out;
}

Tensor scatter_atomic(const Tensor& seg, const Tensor& idx, int64_t L, cudaStream_t stream) {
  Tensor acc = at::zeros({seg.size(0), L, seg.size(2), seg.size(3)}, seg.options().dtype(at::kFloat));
  ScatterParams p{};
  p.seg = seg.data_ptr();
  p.seg_batch_stride = seg.stride(0), p.seg_row_stride = seg.stride(1), p.seg_head_stride = seg.stride(2);
  p.idx = idx.data_ptr<int>();
  p.SW = seg.size(1);
  p.B = static_cast<int>(seg.size(0)), p.L = static_cast<int>(L), p.H = static_cast<int>(seg.size(2)),
  p.D = static_cast<int>(seg.size(3));
  p.acc = acc.data_ptr<float>();
  p.dtype = flash::elem_type_of(seg.scalar_type());
  launch_scatter_add_atomic(p, stream);
  Tensor out = at::empty(acc.sizes(), seg.options());
  launch_cast_from_f32(acc.data_ptr<float>(), out.data_ptr(), acc.numel(), p.dtype, stream);
  return out;
}


void check_cuda_attention(const Tensor& q, const Tensor& k, const Tensor& v, const AttnShapes& s) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q must be float16 or bfloat16 on CUDA (got ", q.scalar_type(), ")");
  TORCH_CHECK(attnkit_headdim_supported(s.D), "q: head dim must be one of 32, 64, 96, 128, 256 on CUDA (got ", s.D,
              ")");
  ATTNKIT_CHECK_LAST_CONTIGUOUS(q);
  ATTNKIT_CHECK_LAST_CONTIGUOUS(k);
  ATTNKIT_CHECK_LAST_CONTIGUOUS(v);
}

Tensor key_bias_cuda(const Tensor& mask, const AttnShapes& s, const Tensor* ki, cudaStream_t stream) {
  Tensor m = mask.contiguous();
  Tensor bias = at::empty(key_bias_shape(s), m.options().dtype(at::kFloat));
  launch_key_bias(m.data_ptr<bool>(), ki != nullptr ? ki->data_ptr<int>() : nullptr, s.B, bias.size(1), bias.size(3),
                  static_cast<int>(s.L), bias.data_ptr<float>(), stream);
  return bias;
}

std::tuple<Tensor, Tensor, Tensor> routing_fwd_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                    const std::optional<Tensor>& q_idx,
                                                    const std::optional<Tensor>& k_idx,
                                                    const std::optional<Tensor>& key_padding_mask, bool causal,
                                                    int64_t window_left, bool self_mask, double scale,
                                                   bool /*deterministic: backward only*/) {
  const AttnShapes s = check_attention_inputs(q_in, k_in, v_in, q_idx, k_idx);
  check_cuda_attention(q_in, k_in, v_in, s);
  // the core copies 16-byte chunks: aligned pointers and strides (a copy only when needed)
  const Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  check_key_padding_mask(key_padding_mask, s, q);
  c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const Indices ix = checked_indices(s, q_idx, k_idx);
  const Tensor &qi = ix.q, &ki = ix.k;
  FwdOutputs f = alloc_fwd_outputs(s, q);
  if (f.core.numel() > 0 && s.wk > 0) {
    flash::FlashParams p = core_params(q, k, v, ix.q_ptr(), ix.k_ptr(), causal, window_left, self_mask, scale);
    Tensor bias;
    if (key_padding_mask.has_value()) {
      bias = key_bias_cuda(*key_padding_mask, s, ix.k_ptr(), stream);
      flash::set_bias(p, bias, nullptr);
    }
    flash::set_output(p, f.core, f.lse);
    flash::flash_fwd(p, stream);
  } else {  // no query row, or no key anywhere: every row is fully masked
    f.core.zero_();
    f.lse.fill_(-std::numeric_limits<float>::infinity());
  }
  if (s.indexed) {
    if (s.B * s.L * s.H * s.D == 0) {
      f.out = at::zeros({s.B, s.L, s.H, s.D}, q.options());
    } else {
      Inverse inv = build_inverse(qi, s.L, false, stream);
      f.out = combine(f.out_seg, inv, s.L, true, stream);
    }
  }
  return {f.out, f.out_seg, f.lse};
}

std::tuple<Tensor, Tensor, Tensor> routing_bwd_cuda(const Tensor& dout, const Tensor& q_in, const Tensor& k_in,
                                                    const Tensor& v_in, const std::optional<Tensor>& q_idx,
                                                    const std::optional<Tensor>& k_idx,
                                                    const std::optional<Tensor>& key_padding_mask,
                                                    const Tensor& out_seg, const Tensor& lse, bool causal,
                                                    int64_t window_left, bool self_mask, double scale,
                                                    bool deterministic) {
  const AttnShapes s = check_attention_inputs(q_in, k_in, v_in, q_idx, k_idx);
  check_cuda_attention(q_in, k_in, v_in, s);
  const Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  check_key_padding_mask(key_padding_mask, s, q);
  check_bwd_saved(s, dout, q, out_seg, lse);
  const int64_t rows_q = s.S * s.wq, rows_k = s.S * s.wk;
  c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  Tensor o = flash::cuda_aligned(out_seg);
  Tensor lse_c = lse.contiguous();
  Tensor g = flash::cuda_aligned(dout);
  auto opts = q.options();
  const Indices ix = checked_indices(s, q_idx, k_idx);
  const Tensor &qi = ix.q, &ki = ix.k;
  auto run_core = [&](const Tensor& dseg, const Tensor& dq, const Tensor& dk, const Tensor& dv) {
    const int64_t rows = dq.size(1);
    Tensor delta = at::empty({s.B, s.H, rows}, opts.dtype(at::kFloat));
    flash::FlashParams p = core_params(q, k, v, ix.q_ptr(), ix.k_ptr(), causal, window_left, self_mask, scale);
    // deterministic: one dq slice per key block, summed in order (no atomics anywhere)
    Tensor dq_accum = flash::alloc_dq_accum(p, opts, deterministic);
    Tensor bias;
    if (key_padding_mask.has_value()) {
      bias = key_bias_cuda(*key_padding_mask, s, ix.k_ptr(), stream);
      flash::set_bias(p, bias, nullptr);
    }
    flash::set_output(p, o, lse_c);
    flash::set_backward(p, dseg, dq, dk, dv);
    flash::set_workspaces(p, delta, dq_accum);
    flash::flash_bwd(p, stream);
  };
  if (!s.indexed) {
    Tensor dq = at::zeros({s.B, s.L, s.H, s.D}, opts), dk = at::zeros({s.B, s.L, s.H, s.D}, opts),
           dv = at::zeros({s.B, s.L, s.H, s.D}, opts);
    if (dq.numel() > 0) run_core(g, dq, dk, dv);
    return {dq, dk, dv};
  }
  if (s.B * s.L * s.H * s.D == 0 || rows_q == 0 || rows_k == 0) {
    return {at::zeros({s.B, s.L, s.H, s.D}, opts), at::zeros({s.B, s.L, s.H, s.D}, opts),
            at::zeros({s.B, s.L, s.H, s.D}, opts)};
  }
  Inverse inv_q = build_inverse(qi, s.L, /*counts_only=*/!deterministic, stream);
  Tensor dseg = at::empty({s.B, rows_q, s.H, s.D}, opts);
  {
    GatherParams gp{};
    gp.dout = g.data_ptr();
    gp.do_batch_stride = g.stride(0), gp.do_row_stride = g.stride(1), gp.do_head_stride = g.stride(2);
    gp.idx = qi.data_ptr<int>();
    gp.offsets = inv_q.offsets.data_ptr<int>();
    gp.scanned = deterministic;
    gp.SW = rows_q;
    gp.B = static_cast<int>(s.B), gp.L = static_cast<int>(s.L), gp.H = static_cast<int>(s.H),
    gp.D = static_cast<int>(s.D);
    gp.dseg = dseg.data_ptr();
    gp.dtype = flash::elem_type_of(q.scalar_type());
    launch_gather_dout(gp, stream);
  }
  Tensor dq_seg = at::empty({s.B, rows_q, s.H, s.D}, opts);
  Tensor dk_seg = at::empty({s.B, rows_k, s.H, s.D}, opts);
  Tensor dv_seg = at::empty({s.B, rows_k, s.H, s.D}, opts);
  run_core(dseg, dq_seg, dk_seg, dv_seg);
  if (!deterministic) {
    return {scatter_atomic(dq_seg, qi, s.L, stream), scatter_atomic(dk_seg, ki, s.L, stream),
            scatter_atomic(dv_seg, ki, s.L, stream)};
  }
  Inverse inv_k = build_inverse(ki, s.L, false, stream);
  return {combine(dq_seg, inv_q, s.L, false, stream), combine(dk_seg, inv_k, s.L, false, stream),
          combine(dv_seg, inv_k, s.L, false, stream)};
}

// ---- online k-means ----

Tensor kmeans_assign_cuda(const Tensor& x, const Tensor& centroids) {
  check_kmeans_inputs(x, centroids);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  ATTNKIT_CHECK_LAST_CONTIGUOUS(x);
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t N = x.size(0), H = x.size(1);
  TORCH_CHECK(N < std::numeric_limits<int>::max(), "x: too many vectors (N must be < 2^31)");
  Tensor assign = at::empty({N, H}, x.options().dtype(at::kInt));
  if (N * H == 0) return assign;
  Tensor mu = centroids.to(at::kFloat).contiguous();
  Tensor best = at::zeros({H * N}, x.options().dtype(at::kLong));
  ScoreParams p{};
  p.x = x.data_ptr();
  p.x_batch_stride = 0;
  p.x_row_stride = x.stride(0);
  p.x_head_stride = x.stride(1);
  p.dtype = kernel_elem_type(x.scalar_type(), "x");
  p.centroids = mu.data_ptr<float>();
  p.B = 1, p.L = static_cast<int>(N), p.H = static_cast<int>(H), p.C = static_cast<int>(mu.size(1)),
  p.D = static_cast<int>(mu.size(2));
  p.scores = nullptr;
  p.best = reinterpret_cast<unsigned long long*>(best.data_ptr<int64_t>());
  launch_routing_scores(p, stream);
  launch_extract_assign(p.best, 1, p.H, p.L, assign.data_ptr<int>(), stream);
  return assign;
}

void kmeans_ema_update_cuda(const Tensor& centroids, const Tensor& x, const std::optional<Tensor>& assign,
                            double decay) {
  check_kmeans_inputs(x, centroids);
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  TORCH_CHECK(decay >= 0.0 && decay <= 1.0, "decay must lie in [0, 1] (got ", decay, ")");
  ATTNKIT_CHECK_LAST_CONTIGUOUS(x);
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t N = x.size(0), H = x.size(1), D = x.size(2), C = centroids.size(1);
  Tensor a;
  if (assign.has_value()) {
    check_assign_tensor(*assign, x, C);
    a = assign->contiguous();
    check_value_range(a, "assign", "C", C);  // before the sums kernel indexes clusters with them
  } else {
    a = kmeans_assign_cuda(x, centroids);
  }
  if (N * H == 0) return;
  const bool direct = centroids.scalar_type() == at::kFloat && centroids.is_contiguous();
  Tensor mu = direct ? centroids : centroids.to(at::kFloat).contiguous();
  Tensor sums = at::zeros({H * C * D}, x.options().dtype(at::kLong));
  Tensor counts = at::zeros({H * C}, x.options().dtype(at::kInt));
  KmeansSumParams p{};
  p.x = x.data_ptr();
  p.x_row_stride = x.stride(0);
  p.x_head_stride = x.stride(1);
  p.dtype = kernel_elem_type(x.scalar_type(), "x");
  p.assign = a.data_ptr<int>();
  p.N = N;
  p.H = static_cast<int>(H), p.C = static_cast<int>(C), p.D = static_cast<int>(D);
  p.sums = reinterpret_cast<unsigned long long*>(sums.data_ptr<int64_t>());
  p.counts = counts.data_ptr<int>();
  launch_kmeans_sums(p, stream);
  launch_kmeans_finalize(p.sums, p.counts, mu.data_ptr<float>(), p.H, p.C, p.D, static_cast<float>(decay), stream);
  if (!direct) centroids.copy_(mu);
}

}  // namespace
}  // namespace attnkit::routing

TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("routing_assign", &attnkit::routing::routing_assign_cuda);
  m.impl("routing_fwd", &attnkit::routing::routing_fwd_cuda);
  m.impl("routing_bwd", &attnkit::routing::routing_bwd_cuda);
  m.impl("kmeans_assign", &attnkit::routing::kmeans_assign_cuda);
  m.impl("kmeans_ema_update_", &attnkit::routing::kmeans_ema_update_cuda);
}
