// Test-only torch extension: the lightning ops (library "attnkit_emu", same schemas as attnkit's)
// running the CUDA kernels and the CUDA planner under the CPU emulator, on CPU tensors. Lets the
// end-to-end checks of run_e2e.py exercise the CUDA code path of every op without a GPU.
#include <torch/extension.h>
#include <torch/library.h>

#define ATTNKIT_CUDA_EMU 1
#include "lightning/lightning_launch.cu"
// the pass instantiations (each its own translation unit under nvcc)
#include "lightning/inst/lightning_pass_bf16_bt32.cu"
#include "lightning/inst/lightning_pass_bf16_bt64.cu"
#include "lightning/inst/lightning_pass_f16_bt32.cu"
#include "lightning/inst/lightning_pass_f16_bt64.cu"
#include "lightning/inst/lightning_pass_f32_bt32.cu"
#include "lightning/inst/lightning_pass_f32_bt64.cu"
#include "lightning/lightning_api.cpp"

namespace attnkit::lightning {
namespace {

void emu_plan(PassParams& p, int64_t requested_block, int64_t requested_splits, int64_t total_rows) {
  const int st = plan_pass_cuda(p, requested_block, requested_splits, total_rows);
  TORCH_CHECK(st == kPlanOk, "emulated plan failed: ", st);
}
void emu_run(const PassParams& p) { TORCH_CHECK(run_pass_cuda(p, nullptr) == cudaSuccess, "emulated launch failed"); }
void emu_reduce(const PassParams& p, void* ds) { reduce_dslopes_cuda(p, static_cast<float*>(ds), nullptr); }
void emu_decode(const DecodeParams& p) { decode_cuda(p, nullptr); }

const Backend& emu_backend() {
  // Named "CUDA": the op layer applies the CUDA argument checks (no fp64, head dims <= 256).
  static const Backend be{"CUDA", &emu_plan, &emu_run, &emu_reduce, &emu_decode};
  return be;
}

}  // namespace
}  // namespace attnkit::lightning

TORCH_LIBRARY(attnkit_emu, m) {
  // every schema of attnkit (op_schemas.h); only this file's ops get an implementation
#define ATTNKIT_OP(schema) m.def(schema);
#include "op_schemas.h"
#undef ATTNKIT_OP
  using namespace attnkit::lightning;
  m.impl("lightning_fwd", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slopes,
                             double scale, const std::optional<at::Tensor>& init, const std::optional<at::Tensor>& cu,
                             int64_t block_size, int64_t num_splits) {
    return lightning_fwd(emu_backend(), q, k, v, slopes, scale, init, cu, block_size, num_splits);
  });
  m.impl("lightning_bwd", [](const at::Tensor& dout, const std::optional<at::Tensor>& dfinal, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v, const at::Tensor& slopes, double scale,
                             const std::optional<at::Tensor>& init, const std::optional<at::Tensor>& cu,
                             int64_t block_size, int64_t num_splits, bool compute_dslopes) {
    return lightning_bwd(emu_backend(), dout, dfinal, q, k, v, slopes, scale, init, cu, block_size, num_splits,
                         compute_dslopes);
  });
  m.impl("lightning_decode", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& state,
                                const at::Tensor& slopes, double scale) {
    return lightning_decode(emu_backend(), q, k, v, state, slopes, scale);
  });
}
