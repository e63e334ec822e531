// Sparse Query Attention, CPU: runs the flash core's CPU implementation; TORCH_LIBRARY_IMPL(attnkit, CPU).
// q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; out [B, Lq, max(Hq, Hkv), D]; lse [B, max(Hq, Hkv), Lq] fp32.
#include <torch/all.h>

#include "flash/flash_api.h"
#include "flash/flash_cpu.h"
#include "sqa/sqa_api.h"

namespace attnkit::sqa {
namespace {

std::tuple<at::Tensor, at::Tensor> sqa_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               bool causal, double scale) {
  check_fwd_inputs(q, k, v, /*for_cuda_kernel=*/false);
  auto [p, out, lse] = fwd_setup(q, k, v, causal, scale);
  flash::flash_fwd_cpu(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sqa_bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                           const at::Tensor& k, const at::Tensor& v,
                                                           const at::Tensor& out, const at::Tensor& lse, bool causal,
                                                           double scale) {
  check_bwd_inputs(dout, q, k, v, out, lse, /*for_cuda_kernel=*/false);
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
