// One instantiation of the lightning attention pass kernel: __half inputs, chunks of 32 rows.
#include "lightning/lightning_kernel.cuh"

namespace attnkit::lightning::kern {
template cudaError_t launch_pass<__half, 32>(const PassParams&, cudaStream_t);
}  // namespace attnkit::lightning::kern
