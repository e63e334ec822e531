// One instantiation of the lightning attention pass kernel: float inputs, chunks of 64 rows.
#include "lightning/lightning_kernel.cuh"

namespace attnkit::lightning::kern {
template cudaError_t launch_pass<float, 64>(const PassParams&, cudaStream_t);
}  // namespace attnkit::lightning::kern
