// Sparse Query Attention, CPU: checks the inputs and runs the flash core's CPU implementation.
// q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; out [B, Lq, max(Hq, Hkv), D]; lse [B, max(Hq, Hkv), Lq] fp32.
#include <torch/all.h>

#include "common/checks.h"
#include "flash/flash_api.h"
#include "flash/flash_cpu.h"
#include "sqa/sqa_checks.h"

namespace attnkit::sqa {
namespace {

std::tuple<at::Tensor, at::Tensor> sqa_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               bool causal, double scale) {
  check_sqa_inputs(q, k, v);
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  auto [out, lse] = flash::alloc_output(p, q);
  flash::set_output(p, out, lse);
  flash::flash_fwd_cpu(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sqa_bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                           const at::Tensor& k, const at::Tensor& v,
                                                           const at::Tensor& out, const at::Tensor& lse, bool causal,
                                                           double scale) {
  check_sqa_inputs(q, k, v);
  check_sqa_backward_inputs(dout, q, k, out, lse);
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  flash::set_output(p, out, lse);
  flash::set_backward(p, dout, dq, dk, dv);
  flash::flash_bwd_cpu(p);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace attnkit::sqa

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  m.impl("sqa_fwd", &attnkit::sqa::sqa_fwd_cpu);
  m.impl("sqa_bwd", &attnkit::sqa::sqa_bwd_cpu);
}
