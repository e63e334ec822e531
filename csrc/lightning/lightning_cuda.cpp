// Lightning attention: CUDA registration. The op logic is device-agnostic (lightning_api.cpp); this
// file supplies the CUDA backend (planning, launches on the current stream, error checks).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>
#include <torch/library.h>

#include "lightning/lightning_cuda.h"
#include "lightning/lightning_api.h"

namespace attnkit::lightning {
namespace {

void cuda_plan(PassParams& p, int64_t requested_block, int64_t requested_splits, int64_t total_rows) {
  const int st = plan_pass_cuda(p, requested_block, requested_splits, total_rows);
  TORCH_CHECK(st != kPlanBadBlock, "block_size must be 32 or 64 on CUDA (0: automatic), got ", requested_block);
  TORCH_CHECK(st != kPlanDeviceError, "lightning attention: cannot query the CUDA device");
  TORCH_CHECK(st != kPlanNoFit, "lightning attention: head dims (Dk = ", p.dk, ", Dv = ", p.dv,
              ") need ", pass_smem_bytes(p), " bytes of shared memory with block_size ", p.block_t,
              ", more than this GPU's ", max_smem_optin(), "; use a smaller Dk or block_size 32");
}

void cuda_run(const PassParams& p) {
  C10_CUDA_CHECK(run_pass_cuda(p, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_reduce_dslopes(const PassParams& p, void* dslopes) {
  C10_CUDA_CHECK(reduce_dslopes_cuda(p, static_cast<float*>(dslopes), c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_decode(const DecodeParams& p) {
  C10_CUDA_CHECK(decode_cuda(p, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const Backend& cuda_backend() {
  static const Backend be{"CUDA", &cuda_plan, &cuda_run, &cuda_reduce_dslopes, &cuda_decode};
  return be;
}

}  // namespace
}  // namespace attnkit::lightning

TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  using namespace attnkit::lightning;
  m.impl("lightning_fwd", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slopes,
                             double scale, const std::optional<at::Tensor>& initial_state,
                             const std::optional<at::Tensor>& cu_seqlens, int64_t block_size, int64_t num_splits) {
    const c10::cuda::CUDAGuard guard(q.device());
    return lightning_fwd(cuda_backend(), q, k, v, slopes, scale, initial_state, cu_seqlens, block_size, num_splits);
  });
  m.impl("lightning_bwd",
         [](const at::Tensor& dout, const std::optional<at::Tensor>& dfinal_state, const at::Tensor& q,
            const at::Tensor& k, const at::Tensor& v, const at::Tensor& slopes, double scale,
            const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& cu_seqlens,
            int64_t block_size, int64_t num_splits, bool compute_dslopes) {
           const c10::cuda::CUDAGuard guard(q.device());
           return lightning_bwd(cuda_backend(), dout, dfinal_state, q, k, v, slopes, scale, initial_state, cu_seqlens,
                                block_size, num_splits, compute_dslopes);
         });
  m.impl("lightning_decode_", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& state,
                                 const at::Tensor& slopes, double scale) {
    const c10::cuda::CUDAGuard guard(q.device());
    return lightning_decode_(cuda_backend(), q, k, v, state, slopes, scale);
  });
  m.impl("lightning_decode", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& state,
                                const at::Tensor& slopes, double scale) {
    const c10::cuda::CUDAGuard guard(q.device());
    return lightning_decode(cuda_backend(), q, k, v, state, slopes, scale);
  });
}
