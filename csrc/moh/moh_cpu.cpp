// Mixture-of-Head attention, CPU: the selections sorted on the host, the attention on the flash core's
// CPU implementation with compact query gathers, the row moves in plain loops;
// TORCH_LIBRARY_IMPL(attnkit, CPU).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <limits>

#include "common/cpu_workspace.h"
#include "flash/flash_api.h"
#include "flash/flash_cpu.h"
#include "moh/moh_api.h"

namespace attnkit::moh {
namespace {

// Counting sort of the selections, token by token: lists come out in position order.
void route_cpu(const at::Tensor& idx, at::Tensor& q_index, at::Tensor& q_count, at::Tensor& slot, int64_t hq) {
  const int64_t B = idx.size(0), L = idx.size(1), K = idx.size(2);
  const int* ix = idx.data_ptr<int>();
  int* qi = q_index.data_ptr<int>();
  int* qc = q_count.data_ptr<int>();
  int* sl = slot.data_ptr<int>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int* cnt = qc + b * hq;
      std::fill(cnt, cnt + hq, 0);
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t e = (b * L + t) * K + k;
          const int h = ix[e];
          if (h < 0) {
            sl[e] = -1;
            continue;
          }
          const int r = cnt[h]++;
          qi[(b * hq + h) * L + r] = int(t);
          sl[e] = r;
        }
      }
    }
  });
}

// For every selection (b, t, k) with slot s and head h, fn(b, t, h, s, e) with e its flat index.
template <typename Fn>
void for_each_selection(const at::Tensor& idx, const at::Tensor& slot, Fn&& fn) {
  const int64_t B = idx.size(0), L = idx.size(1), K = idx.size(2);
  const int* ix = idx.data_ptr<int>();
  const int* sl = slot.data_ptr<int>();
  at::parallel_for(0, B * L, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t bt = r0; bt < r1; ++bt)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = bt * K + k;
        if (sl[e] >= 0) fn(bt / L, bt % L, int64_t(ix[e]), int64_t(sl[e]), e);
      }
  });
}

// The weights in the accumulation type of the CPU path: double for double inputs, else float.
at::Tensor weight_acc(const at::Tensor& head_weight, const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? head_weight.to(at::kDouble).contiguous() : weight_f32(head_weight);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moh_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& head_idx,
    const at::Tensor& head_weight, bool causal, double scale) {
  check_inputs(q, k, v, head_idx, head_weight, /*for_cuda_kernel=*/false, /*check_values=*/true);
  const int64_t B = q.size(0), L = q.size(1), hq = q.size(2), D = q.size(3);
  // fp64 inputs keep fp64 weights (the CPU path accumulates in the inputs' opmath type)
  const at::Tensor idx = index_i32(head_idx), w = weight_acc(head_weight, q);
  const auto iopt = idx.options();
  at::Tensor q_index = at::full({B, hq, L}, -1, iopt), q_count = at::empty({B, hq}, iopt), slot = at::empty_like(idx);
  route_cpu(idx, q_index, q_count, slot, hq);

  flash::FlashParams p = core_params(q, k, v, q_index, q_count, causal, scale);
  auto [out_slot, lse_slot] = alloc_slot_outputs(q);
  flash::set_output(p, out_slot, lse_slot);
  flash::flash_fwd_cpu(p);

  at::Tensor out = at::zeros({B, L, hq, D}, q.options());
  at::Tensor lse = at::full({B, hq, L}, -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "moh_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* os = out_slot.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const float* ls = lse_slot.data_ptr<float>();
    float* lt = lse.data_ptr<float>();
    const acc_t* wp = w.data_ptr<acc_t>();
    for_each_selection(idx, slot, [&](int64_t b, int64_t t, int64_t h, int64_t s, int64_t e) {
      const acc_t wt = static_cast<acc_t>(wp[e]);
      const scalar_t* src = os + ((b * L + s) * hq + h) * D;
      scalar_t* dst = o + ((b * L + t) * hq + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d]) * wt);
      lt[(b * hq + h) * L + t] = ls[(b * hq + h) * L + s];
    });
  });
  return {out, lse, out_slot, lse_slot, q_index, q_count, slot};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moh_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& head_idx, const at::Tensor& head_weight, const at::Tensor& out_slot, const at::Tensor& lse_slot,
    const at::Tensor& q_index, const at::Tensor& q_count, const at::Tensor& slot, bool causal, double scale) {
  check_inputs(q, k, v, head_idx, head_weight, /*for_cuda_kernel=*/false, /*check_values=*/false);
  check_bwd_inputs(dout_in, q, out_slot, lse_slot, q_index, q_count, slot, head_idx);
  const int64_t B = q.size(0), L = q.size(1), hq = q.size(2), D = q.size(3);
  const at::Tensor idx = index_i32(head_idx), w = weight_acc(head_weight, q);
  const at::Tensor dout = dout_in.contiguous();
  // gradient of the unweighted head outputs (slot space) and of the weights: dO = w dY, dw = <dY, O>
  // Slot-space buffers from the thread's workspace (uninitialised, like at::empty): only the rows of
  // selected slots are written, and the core reads no others.
  at::Tensor dout_slot = cpu::workspace(0, {B, L, hq, D}, q.scalar_type());
  at::Tensor dweight = at::zeros(idx.sizes(), w.options());
  at::Tensor dq_slot = cpu::workspace(1, {B, L, hq, D}, q.scalar_type());
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "moh_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dy = dout.data_ptr<scalar_t>();
    const scalar_t* os = out_slot.data_ptr<scalar_t>();
    scalar_t* ds = dout_slot.data_ptr<scalar_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    acc_t* dw = dweight.data_ptr<acc_t>();
    for_each_selection(idx, slot, [&](int64_t b, int64_t t, int64_t h, int64_t s, int64_t e) {
      const acc_t wt = static_cast<acc_t>(wp[e]);
      const scalar_t* g = dy + ((b * L + t) * hq + h) * D;
      const scalar_t* o = os + ((b * L + s) * hq + h) * D;
      scalar_t* dst = ds + ((b * L + s) * hq + h) * D;
      acc_t acc = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t gv = static_cast<acc_t>(g[d]);
        dst[d] = static_cast<scalar_t>(gv * wt);
        acc += gv * static_cast<acc_t>(o[d]);
      }
      dw[e] = acc;
    });

    flash::FlashParams p = core_params(q, k, v, q_index, q_count, causal, scale);
    flash::set_output(p, out_slot, lse_slot);
    flash::set_backward(p, dout_slot, dq_slot, dk, dv);
    flash::flash_bwd_cpu(p);

    const scalar_t* dqs = dq_slot.data_ptr<scalar_t>();
    scalar_t* dqt = dq.data_ptr<scalar_t>();
    for_each_selection(idx, slot, [&](int64_t b, int64_t t, int64_t h, int64_t s, int64_t) {
      std::copy(dqs + ((b * L + s) * hq + h) * D, dqs + ((b * L + s) * hq + h + 1) * D, dqt + ((b * L + t) * hq + h) * D);
    });
  });
  return {dq, dk, dv, dweight.to(head_weight.scalar_type())};
}

}  // namespace
}  // namespace attnkit::moh

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("moh_fwd", &attnkit::moh::moh_fwd_cpu);
  m.impl("moh_bwd", &attnkit::moh::moh_bwd_cpu);
}
