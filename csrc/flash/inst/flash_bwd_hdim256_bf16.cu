// One instantiation per file so the build compiles them in parallel.
#include "flash/flash_bwd_kernel.cuh"

namespace attnkit::flash {
template <>
void run_flash_bwd<__nv_bfloat16, 256>(const FlashParams& params, cudaStream_t stream) {
  launch_flash_bwd_main<__nv_bfloat16, 256>(params, stream);
}
}  // namespace attnkit::flash
