// CPU test hook of the flash core: exposes every optional FlashParams input so that the tests can
// check the core's semantics (bias, dbias, kept predicate, gathers, window, self mask) directly,
// before the ops that use them exist. Not public API.
#include <torch/all.h>

#include <optional>
#include <vector>

#include "flash/flash_api.h"
#include "flash/flash_cpu.h"
#include "flash/flash_splits.h"

namespace attnkit::flash {
namespace {

std::vector<at::Tensor> flash_core_cpu_test(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& row_thr,
                                            const std::optional<at::Tensor>& row_tie,
                                            const std::optional<at::Tensor>& q_index,
                                            const std::optional<at::Tensor>& k_index, bool causal, int64_t window_left,
                                            bool self_mask, double self_score, double scale,
                                            const std::optional<at::Tensor>& dout) {
  TORCH_CHECK(q.device().is_cpu(), "_flash_core_cpu_test: CPU tensors only");
  TORCH_CHECK(q_index.has_value() == k_index.has_value(), "q_index and k_index go together");
  TORCH_CHECK(row_thr.has_value() == row_tie.has_value(), "row_thr and row_tie go together");
  FlashParams p = make_params(q, k, v, scale, causal);
  p.window_left = static_cast<int>(window_left);
  p.self_mask = self_mask;
  p.self_score = static_cast<float>(self_score);
  if (q_index) set_segments(p, *q_index, *k_index);
  at::Tensor dbias;
  if (bias) {
    if (dout) dbias = at::full_like(*bias, std::nanf(""), at::MemoryFormat::Contiguous);  // must be overwritten
    set_bias(p, *bias, dout ? &dbias : nullptr);
  }
  if (row_thr) set_row_threshold(p, *row_thr, *row_tie);
  auto [out, lse] = alloc_output(p, q);
  set_output(p, out, lse);
  flash_fwd_cpu(p);
  at::Tensor dq, dk, dv;
  if (dout) {
    const int64_t rq = int64_t(p.num_segments) * p.seqlen_q, rk = int64_t(p.num_segments) * p.seqlen_k;
    // NaN-filled: the core must write every element.
    dq = at::full({p.batch, rq, p.h_q, p.head_dim}, std::nanf(""), q.options());
    dk = at::full({p.batch, rk, p.h_kv, p.head_dim}, std::nanf(""), q.options());
    dv = at::full({p.batch, rk, p.h_kv, p.head_dim}, std::nanf(""), q.options());
    set_backward(p, *dout, dq, dk, dv);
    flash_bwd_cpu(p);
  }
  auto empty = [&] { return at::empty({0}, q.options()); };
  return {out, lse, dq.defined() ? dq : empty(), dk.defined() ? dk : empty(), dv.defined() ? dv : empty(),
          dbias.defined() ? dbias : empty()};
}

int64_t num_splits_heuristic_test(int64_t blocks, int64_t key_tiles, int64_t sms) {
  TORCH_CHECK(sms > 0 && sms <= 1 << 20, "_flash_num_splits_heuristic: sms must be in [1, 2^20], got ", sms);
  return flash_num_splits_heuristic(blocks, key_tiles, static_cast<int>(sms));
}

}  // namespace
}  // namespace attnkit::flash

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("_flash_core_cpu_test", &attnkit::flash::flash_core_cpu_test);
}

// No tensor arguments: registered for every backend (the dispatcher's Undefined key included).
TORCH_LIBRARY_IMPL(attnkit, CompositeExplicitAutograd, m) {
  m.impl("_flash_num_splits_heuristic", &attnkit::flash::num_splits_heuristic_test);
}
