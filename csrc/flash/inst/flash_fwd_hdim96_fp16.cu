// One instantiation per file so the build compiles them in parallel.
#include "flash/flash_fwd_kernel.cuh"

namespace attnkit::flash {
template <>
void run_flash_fwd<__half, 96>(const FlashParams& params, cudaStream_t stream) {
  launch_flash_fwd<__half, 96>(params, stream);
}
}  // namespace attnkit::flash
