#include "sqa/sqa_api.h"

#include "flash/flash_api.h"
#include "flash/flash_checks.h"

namespace attnkit::sqa {

void check_fwd_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool for_cuda_kernel) {
  flash::check_qkv_inputs(q, k, v, for_cuda_kernel);
}

void check_bwd_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& out, const at::Tensor& lse, bool for_cuda_kernel) {
  flash::check_qkv_inputs(q, k, v, for_cuda_kernel);
  flash::check_backward_inputs(dout, q, k, out, lse);
}

std::tuple<flash::FlashParams, at::Tensor, at::Tensor> fwd_setup(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, bool causal, double scale) {
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  auto [out, lse] = flash::alloc_output(p, q);
  flash::set_output(p, out, lse);
  return {p, out, lse};
}

}  // namespace attnkit::sqa
