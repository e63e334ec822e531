// Sparse Query Attention, CUDA: runs the flash core's kernels; TORCH_LIBRARY_IMPL(attnkit, CUDA).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>

#include "flash/flash.h"
#include "flash/flash_api.h"
#include "sqa/sqa_api.h"

namespace attnkit::sqa {
namespace {

std::tuple<at::Tensor, at::Tensor> sqa_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                const at::Tensor& v_in, bool causal, double scale) {
  check_fwd_inputs(q_in, k_in, v_in, /*for_cuda_kernel=*/true);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  auto [p, out, lse] = fwd_setup(q, k, v, causal, scale);
  flash::flash_fwd(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sqa_bwd_cuda(const at::Tensor& dout_in, const at::Tensor& q_in,
                                                            const at::Tensor& k_in, const at::Tensor& v_in,
                                                            const at::Tensor& out_in, const at::Tensor& lse,
                                                            bool causal, double scale) {
  check_bwd_inputs(dout_in, q_in, k_in, v_in, out_in, lse, /*for_cuda_kernel=*/true);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  const at::Tensor dout = flash::cuda_aligned(dout_in), out = flash::cuda_aligned(out_in);
  flash::FlashParams p = flash::make_params(q, k, v, scale, causal);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  const at::Tensor lse_c = lse.contiguous();  // delta below shares its (contiguous) layout
  flash::set_output(p, out, lse_c);
  flash::set_backward(p, dout, dq, dk, dv);
  at::Tensor delta = at::empty(lse_c.sizes(), lse_c.options());
  at::Tensor dq_accum = flash::alloc_dq_accum(p, q.options(), /*deterministic=*/false);
  flash::set_workspaces(p, delta, dq_accum);
  flash::flash_bwd(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

}  // namespace
}  // namespace attnkit::sqa

TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("sqa_fwd", &attnkit::sqa::sqa_fwd_cuda);
  m.impl("sqa_bwd", &attnkit::sqa::sqa_bwd_cuda);
}
