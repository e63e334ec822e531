// Routing attention, CPU: top-w routing, the segment-space combine / scatter around the flash core's
// CPU path, and the online k-means update. Accumulates in fp32 (fp64 for double inputs).
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "common/cpu_workspace.h"
#include "flash/flash_cpu.h"
#include "routing/routing_api.h"

namespace attnkit::routing {
namespace {

using at::Tensor;

at::ScalarType acc_type_for(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

Tensor unit_rows(const Tensor& x, at::ScalarType acc) {
  Tensor xf = x.to(acc);
  return xf / at::linalg_vector_norm(xf, 2, {-1}, /*keepdim=*/true).clamp_min(1e-12);
}

// scores [R, L] (contiguous) -> out [R, w] int32: the w largest, ties to the lower position, in position order.
template <typename acc_t>
void topw_rows(const Tensor& scores, int64_t w, Tensor& out) {
  const int64_t R = scores.size(0), L = scores.size(1);
  const acc_t* s = scores.data_ptr<acc_t>();
  int* o = out.data_ptr<int>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int> pos(L);
    std::vector<acc_t> key(L);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t l = 0; l < L; ++l) {
        const acc_t v = s[r * L + l];
        key[l] = std::isnan(v) ? -std::numeric_limits<acc_t>::infinity() : v;  // NaN ranks lowest
      }
      std::iota(pos.begin(), pos.end(), 0);
      auto before = [&](int a, int b) { return key[a] > key[b] || (key[a] == key[b] && a < b); };
      if (w < L) std::nth_element(pos.begin(), pos.begin() + (w - 1), pos.end(), before);
      std::sort(pos.begin(), pos.begin() + w);
      std::copy(pos.begin(), pos.begin() + w, o + r * w);
    }
  });
}

// scores[b, h, c, l] = normalize(x[b, l, h]) . mu[h, c], as [B*H*C, L].
Tensor routing_scores(const Tensor& x, const Tensor& mu) {
  Tensor xn = unit_rows(x, mu.scalar_type());
  return at::einsum("blhd,hcd->bhcl", {xn, mu}).contiguous().view({-1, x.size(1)});
}

std::tuple<Tensor, Tensor, Tensor> routing_assign_cpu(const Tensor& q, const std::optional<Tensor>& k,
                                                      const Tensor& centroids, int64_t window, bool shared_qk,
                                                      bool with_assign, const std::optional<Tensor>& key_padding_mask) {
  check_assign_inputs(q, k, centroids, window, shared_qk, key_padding_mask);
  ATTNKIT_CHECK_DEVICE(q, at::Device(at::kCPU));
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), C = centroids.size(1);
  const at::ScalarType acc = acc_type_for(q.scalar_type());
  Tensor mu = centroids.to(acc).contiguous();
  auto opts = q.options().dtype(at::kInt);
  Tensor q_idx = at::empty({B, H, C, window}, opts);
  Tensor k_idx = at::empty({B, H, C, window}, opts);
  const int64_t nx = shared_qk ? 1 : 2;
  Tensor assign = with_assign ? at::empty({nx * B, L, H}, opts) : at::empty({0}, opts);
  if (B * H * L == 0) return {q_idx, k_idx, assign};
  auto run = [&](const Tensor& x, Tensor& out, int64_t i) {
    Tensor sc = routing_scores(x, mu);
    if (with_assign)  // first maximum over the clusters (padding does not change a token's cluster)
      assign.narrow(0, i * B, B).copy_(sc.view({B, H, C, L}).argmax(2).permute({0, 2, 1}));
    if (key_padding_mask.has_value())  // padded tokens rank last
      sc = sc.view({B, H, C, L})
               .masked_fill(key_padding_mask->reshape({B, 1, 1, L}), -std::numeric_limits<double>::infinity())
               .view({-1, L});
    Tensor o2 = out.view({-1, window});
    if (acc == at::kDouble) topw_rows<double>(sc, window, o2);
    else topw_rows<float>(sc, window, o2);
  };
  run(q, q_idx, 0);
  if (shared_qk) k_idx.copy_(q_idx);
  else run(*k, k_idx, 1);
  return {q_idx, k_idx, assign};
}

// ---- segment space <-> tokens ----

// The entries r of an index tensor idx [B, H, S, w] (flattened per (b, h) to [S*w]) grouped by
// token: in row bh = b * H + h, token t's entries are ord(bh)[st(bh)[t] .. st(bh)[t + 1]), in
// ascending r (a stable counting sort).
struct TokenGroups {
  int64_t L = 0, SW = 0;
  std::vector<int> start, order;  // [B*H][L + 1], [B*H][SW]
  const int* st(int64_t bh) const { return start.data() + bh * (L + 1); }
  const int* ord(int64_t bh) const { return order.data() + bh * SW; }
};

TokenGroups group_tokens(const Tensor& idx, int64_t L) {
  TokenGroups g;
  const int64_t BH = idx.size(0) * idx.size(1);
  g.L = L;
  g.SW = idx.size(2) * idx.size(3);
  g.start.assign(BH * (L + 1), 0);
  g.order.resize(BH * g.SW);
  const int* ip = idx.data_ptr<int>();
  at::parallel_for(0, BH, 1, [&](int64_t bh0, int64_t bh1) {
    for (int64_t bh = bh0; bh < bh1; ++bh) {
      const int* row = ip + bh * g.SW;
      int* st = g.start.data() + bh * (L + 1);
      int* ord = g.order.data() + bh * g.SW;
      for (int64_t r = 0; r < g.SW; ++r) ++st[row[r] + 1];
      for (int64_t t = 0; t < L; ++t) st[t + 1] += st[t];
      for (int64_t r = 0; r < g.SW; ++r) ord[st[row[r]]++] = static_cast<int>(r);  // st[t] -> end of t
      for (int64_t t = L; t > 0; --t) st[t] = st[t - 1];
      st[0] = 0;
    }
  });
  return g;
}

// For each pair (seg, out): out[b, t, h, :] = sum (mean when `mean`) over token t's entries r in
// row (b, h) of seg[b, r, h, :], in ascending r; tokens with no entry get 0. seg [B, S*w, H, D],
// out [B, L, H, D] contiguous. The threads take ranges of tokens, so each writes its own pages of
// the outputs (fresh tensors: one thread first-touches a page), and every output row is gathered
// and written once.
template <typename scalar_t, typename acc_t, size_t N>
void combine_impl(const TokenGroups& g, const std::array<const Tensor*, N>& segs, const std::array<Tensor*, N>& outs,
                  bool mean) {
  const int64_t B = outs[0]->size(0), L = outs[0]->size(1), H = outs[0]->size(2), D = outs[0]->size(3);
  std::array<const scalar_t*, N> sp;
  std::array<int64_t, N> sb, sr, sh;
  std::array<scalar_t*, N> op;
  for (size_t x = 0; x < N; ++x) {
    sp[x] = segs[x]->template data_ptr<scalar_t>();
    sb[x] = segs[x]->stride(0);
    sr[x] = segs[x]->stride(1);
    sh[x] = segs[x]->stride(2);
    op[x] = outs[x]->template data_ptr<scalar_t>();
  }
  at::parallel_for(0, B * L, 16, [&](int64_t bt0, int64_t bt1) {
    std::vector<acc_t> acc(D);
    for (int64_t bt = bt0; bt < bt1; ++bt) {
      const int64_t b = bt / L, t = bt % L;
      for (int64_t h = 0; h < H; ++h) {
        const int* st = g.st(b * H + h);
        const int* ord = g.ord(b * H + h);
        const int n = st[t + 1] - st[t];
        const acc_t f = n == 0 ? acc_t(0) : (mean ? acc_t(1) / static_cast<acc_t>(n) : acc_t(1));
        for (size_t x = 0; x < N; ++x) {
          const scalar_t* base = sp[x] + b * sb[x] + h * sh[x];
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int e = st[t]; e < st[t + 1]; ++e) {
            const scalar_t* src = base + ord[e] * sr[x];
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(src[d]);
          }
          scalar_t* dst = op[x] + (bt * H + h) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d] * f);
        }
      }
    }
  });
}

// The token-space tensors of segment-space ones that share one index (see combine_impl).
template <size_t N>
std::array<Tensor, N> combine(const TokenGroups& g, const std::array<const Tensor*, N>& segs, bool mean) {
  std::array<Tensor, N> outs;
  std::array<Tensor*, N> out_ptrs;
  for (size_t x = 0; x < N; ++x) {
    const Tensor& seg = *segs[x];
    outs[x] = at::empty({seg.size(0), g.L, seg.size(2), seg.size(3)}, seg.options());
    out_ptrs[x] = &outs[x];
  }
  if (outs[0].numel() == 0) return outs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, segs[0]->scalar_type(), "routing_combine", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    combine_impl<scalar_t, acc_t, N>(g, segs, out_ptrs, mean);
  });
  return outs;
}

// dseg[b, r, h, :] = dout[b, t, h, :] / (entries of token t in row (b, h)) for each entry r of
// token t. dseg [B, S*w, H, D] is given; every row is written (each r is the entry of one token).
void gather_dout(const Tensor& dout, const TokenGroups& g, Tensor& dseg) {
  const int64_t B = dout.size(0), L = dout.size(1), H = dout.size(2), D = dout.size(3);
  if (dseg.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dout.scalar_type(), "routing_gather_dout", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = dout.data_ptr<scalar_t>();
    scalar_t* dp = dseg.data_ptr<scalar_t>();
    const int64_t gb = dout.stride(0), gr = dout.stride(1), gh = dout.stride(2);
    const int64_t db = dseg.stride(0), dr = dseg.stride(1), dh = dseg.stride(2);
    at::parallel_for(0, B * L, 16, [&](int64_t bt0, int64_t bt1) {
      for (int64_t bt = bt0; bt < bt1; ++bt) {
        const int64_t b = bt / L, t = bt % L;
        for (int64_t h = 0; h < H; ++h) {
          const int* st = g.st(b * H + h);
          const int* ord = g.ord(b * H + h);
          if (st[t + 1] == st[t]) continue;
          const acc_t f = acc_t(1) / static_cast<acc_t>(st[t + 1] - st[t]);
          const scalar_t* src = gp + b * gb + t * gr + h * gh;
          for (int e = st[t]; e < st[t + 1]; ++e) {
            scalar_t* dst = dp + b * db + ord[e] * dr + h * dh;
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d]) * f);
          }
        }
      }
    });
  });
}

void check_cpu_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  ATTNKIT_CHECK_DEVICE(q, at::Device(at::kCPU));
  ATTNKIT_CHECK_LAST_CONTIGUOUS(q);
  ATTNKIT_CHECK_LAST_CONTIGUOUS(k);
  ATTNKIT_CHECK_LAST_CONTIGUOUS(v);
}

// The core's additive key bias for a key padding mask: -inf on padded keys, in segment space.
Tensor key_bias_cpu(const Tensor& mask, const AttnShapes& s, const Tensor* ki) {
  Tensor m = mask.contiguous();
  Tensor bias = at::zeros(key_bias_shape(s), m.options().dtype(at::kFloat));
  const bool* mp = m.data_ptr<bool>();
  float* bp = bias.data_ptr<float>();
  const float ninf = -std::numeric_limits<float>::infinity();
  if (ki == nullptr) {
    for (int64_t i = 0; i < s.B * s.L; ++i) bp[i] = mp[i] ? ninf : 0.f;
  } else {
    const int* ip = ki->data_ptr<int>();
    const int64_t SW = s.S * s.wk;
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t e = 0; e < s.H * SW; ++e) bp[b * s.H * SW + e] = mp[b * s.L + ip[b * s.H * SW + e]] ? ninf : 0.f;
  }
  return bias;
}

std::tuple<Tensor, Tensor, Tensor> routing_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const std::optional<Tensor>& q_idx,
                                                   const std::optional<Tensor>& k_idx,
                                                   const std::optional<Tensor>& key_padding_mask, bool causal,
                                                   int64_t window_left, bool self_mask, double scale,
                                                   bool /*deterministic: backward only*/) {
  const AttnShapes s = check_attention_inputs(q, k, v, q_idx, k_idx);
  check_cpu_qkv(q, k, v);
  check_key_padding_mask(key_padding_mask, s, q);
  const Indices ix = checked_indices(s, q_idx, k_idx);
  FwdOutputs f = alloc_fwd_outputs(s, q);
  if (f.core.numel() > 0 && s.wk > 0) {
    flash::FlashParams p = core_params(q, k, v, ix.q_ptr(), ix.k_ptr(), causal, window_left, self_mask, scale);
    Tensor bias;
    if (key_padding_mask.has_value()) {
      bias = key_bias_cpu(*key_padding_mask, s, ix.k_ptr());
      flash::set_bias(p, bias, nullptr);
    }
    flash::set_output(p, f.core, f.lse);
    flash::flash_fwd_cpu(p);
  } else {  // no query row, or no key anywhere: every row is fully masked
    f.core.zero_();
    f.lse.fill_(-std::numeric_limits<float>::infinity());
  }
  if (s.indexed) f.out = combine<1>(group_tokens(ix.q, s.L), {&f.out_seg}, /*mean=*/true)[0];
  return {f.out, f.out_seg, f.lse};
}

std::tuple<Tensor, Tensor, Tensor> routing_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                   const Tensor& v, const std::optional<Tensor>& q_idx,
                                                   const std::optional<Tensor>& k_idx,
                                                   const std::optional<Tensor>& key_padding_mask,
                                                   const Tensor& out_seg, const Tensor& lse, bool causal,
                                                   int64_t window_left, bool self_mask, double scale,
                                                   bool /*deterministic: the CPU path always is*/) {
  const AttnShapes s = check_attention_inputs(q, k, v, q_idx, k_idx);
  check_cpu_qkv(q, k, v);
  check_key_padding_mask(key_padding_mask, s, q);
  check_bwd_saved(s, dout, q, out_seg, lse);
  const int64_t rows_q = s.S * s.wq;
  Tensor o = out_seg.stride(-1) == 1 ? out_seg : out_seg.contiguous();
  Tensor lse_c = lse.contiguous();
  Tensor g = dout.stride(-1) == 1 ? dout : dout.contiguous();
  const Indices ix = checked_indices(s, q_idx, k_idx);
  auto run_core = [&](const Tensor& dseg, const Tensor& dq, const Tensor& dk, const Tensor& dv) {
    flash::FlashParams p = core_params(q, k, v, ix.q_ptr(), ix.k_ptr(), causal, window_left, self_mask, scale);
    Tensor bias;
    if (key_padding_mask.has_value()) {
      bias = key_bias_cpu(*key_padding_mask, s, ix.k_ptr());
      flash::set_bias(p, bias, nullptr);
    }
    flash::set_output(p, o, lse_c);
    flash::set_backward(p, dseg, dq, dk, dv);
    flash::flash_bwd_cpu(p);
  };
  auto opts = q.options();
  if (!s.indexed) {
    Tensor dq = at::zeros({s.B, s.L, s.H, s.D}, opts), dk = at::zeros({s.B, s.L, s.H, s.D}, opts),
           dv = at::zeros({s.B, s.L, s.H, s.D}, opts);
    if (dq.numel() > 0) run_core(g, dq, dk, dv);
    return {dq, dk, dv};
  }
  // Segment-space buffers from the thread's workspace: the core writes every row of dq_seg, dk_seg
  // and dv_seg (routing has no compact gathers and no head groups), and gather_dout every row of dseg.
  const auto dt = q.scalar_type();
  Tensor dq_seg = cpu::workspace(0, {s.B, rows_q, s.H, s.D}, dt);
  Tensor dk_seg = cpu::workspace(1, {s.B, s.S * s.wk, s.H, s.D}, dt);
  Tensor dv_seg = cpu::workspace(2, {s.B, s.S * s.wk, s.H, s.D}, dt);
  const TokenGroups gq = group_tokens(ix.q, s.L), gk = group_tokens(ix.k, s.L);
  if (dq_seg.numel() > 0 && dk_seg.numel() > 0) {
    Tensor dseg = cpu::workspace(3, {s.B, rows_q, s.H, s.D}, dt);
    gather_dout(g, gq, dseg);
    run_core(dseg, dq_seg, dk_seg, dv_seg);
  } else {  // no query row or no key: every gradient is 0
    dq_seg.zero_();
    dk_seg.zero_();
    dv_seg.zero_();
  }
  auto [dq] = combine<1>(gq, {&dq_seg}, false);
  auto [dk, dv] = combine<2>(gk, {&dk_seg, &dv_seg}, false);
  return {dq, dk, dv};
}

// ---- online k-means ----

Tensor kmeans_assign_cpu(const Tensor& x, const Tensor& centroids) {
  check_kmeans_inputs(x, centroids);
  ATTNKIT_CHECK_DEVICE(x, at::Device(at::kCPU));
  const at::ScalarType acc =
      (x.scalar_type() == at::kDouble || centroids.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  if (x.numel() == 0) return at::zeros({x.size(0), x.size(1)}, x.options().dtype(at::kInt));
  Tensor xn = unit_rows(x, acc);
  Tensor sim = at::einsum("nhd,hcd->nhc", {xn, centroids.to(acc)});
  return sim.argmax(-1).to(at::kInt);  // first maximum
}

void kmeans_ema_update_cpu(const Tensor& centroids, const Tensor& x, const std::optional<Tensor>& assign, double decay) {
  check_kmeans_inputs(x, centroids);
  ATTNKIT_CHECK_DEVICE(x, at::Device(at::kCPU));
  TORCH_CHECK(decay >= 0.0 && decay <= 1.0, "decay must lie in [0, 1] (got ", decay, ")");
  const int64_t N = x.size(0), H = x.size(1), D = x.size(2), C = centroids.size(1);
  Tensor a;
  if (assign.has_value()) {
    check_assign_tensor(*assign, x, C);
    a = assign->contiguous();
    check_value_range(a, "assign", "C", C);
  } else {
    a = kmeans_assign_cpu(x, centroids);
  }
  if (N == 0) return;
  Tensor xn = unit_rows(x, at::kDouble).contiguous();
  Tensor mu = centroids.to(at::kDouble).contiguous();
  const double* xp = xn.data_ptr<double>();
  const int* ap = a.data_ptr<int>();
  double* mp = mu.data_ptr<double>();
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<double> sum(C * D);
    std::vector<int64_t> cnt(C);
    std::vector<double> nv(D);
    for (int64_t h = h0; h < h1; ++h) {
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(cnt.begin(), cnt.end(), 0);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t c = ap[n * H + h];
        ++cnt[c];
        for (int64_t d = 0; d < D; ++d) sum[c * D + d] += xp[(n * H + h) * D + d];
      }
      for (int64_t c = 0; c < C; ++c) {
        if (cnt[c] == 0) continue;  // keeps its centroid
        double ss = 0.0;
        for (int64_t d = 0; d < D; ++d) ss += (sum[c * D + d] / cnt[c]) * (sum[c * D + d] / cnt[c]);
        const double inv_mean = 1.0 / std::max(std::sqrt(ss), 1e-12);
        double* m = mp + (h * C + c) * D;
        double ns = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          nv[d] = decay * m[d] + (1.0 - decay) * (sum[c * D + d] / cnt[c]) * inv_mean;
          ns += nv[d] * nv[d];
        }
        const double inv = 1.0 / std::max(std::sqrt(ns), 1e-12);
        for (int64_t d = 0; d < D; ++d) m[d] = nv[d] * inv;
      }
    }
  });
  centroids.copy_(mu);
}

}  // namespace
}  // namespace attnkit::routing

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("routing_assign", &attnkit::routing::routing_assign_cpu);
  m.impl("routing_fwd", &attnkit::routing::routing_fwd_cpu);
  m.impl("routing_bwd", &attnkit::routing::routing_bwd_cpu);
  m.impl("kmeans_assign", &attnkit::routing::kmeans_assign_cpu);
  m.impl("kmeans_ema_update_", &attnkit::routing::kmeans_ema_update_cpu);
}
