// Test-only torch extension: the lightning ops (library "attnkit_emu", same schemas as attnkit's)
// running the CUDA kernels and the CUDA planner under the CPU emulator, on CPU tensors. Lets the
// end-to-end checks of run_e2e.py exercise the CUDA code path of every op without a GPU.
#include <torch/extension.h>
#include <torch/library.h>

#define LT_EMULATE 1
#include "lightning/lightning_misc.cu"
#include "lightning/lightning_ops.cpp"

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
  using namespace attnkit::lightning;
  m.def(
      "lightning_fwd(Tensor q, Tensor k, Tensor v, Tensor slopes, float scale, Tensor? initial_state,"
      " Tensor? cu_seqlens, int block_size, int num_splits) -> (Tensor o, Tensor final_state)");
  m.def(
      "lightning_bwd(Tensor dout, Tensor? dfinal_state, Tensor q, Tensor k, Tensor v, Tensor slopes, float scale,"
      " Tensor? initial_state, Tensor? cu_seqlens, int block_size, int num_splits, bool compute_dslopes)"
      " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dslopes, Tensor dinitial_state)");
  m.def("lightning_decode(Tensor q, Tensor k, Tensor v, Tensor state, Tensor slopes, float scale) -> (Tensor o, Tensor new_state)");
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
