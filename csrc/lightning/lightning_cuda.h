// Entry points of the lightning attention CUDA kernels (torch-free; implemented in lightning_launch.cu
// and the inst/lightning_pass_*.cu instantiations, called by lightning_cuda.cpp).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "lightning/lightning_params.h"

namespace attnkit::lightning {

enum PlanStatus : int { kPlanOk = 0, kPlanBadBlock = 1, kPlanNoFit = 2, kPlanDeviceError = 3 };

// Chooses block_t (32 or 64; requested_block 0: the largest that fits), bv (64, 32 or 16 o' columns
// per block, the largest that fits the shared memory), num_slabs and num_segments (requested_splits 0:
// split sequences only when (sequence, head, slab) blocks would fill less than half the GPU).
int plan_pass_cuda(PassParams& p, int64_t requested_block, int64_t requested_splits, int64_t total_rows);
// Bytes of dynamic shared memory a plan needs, and the device's opt-in limit (for error messages).
size_t pass_smem_bytes(const PassParams& p);
int max_smem_optin();

cudaError_t run_pass_cuda(const PassParams& p, cudaStream_t stream);
cudaError_t reduce_dslopes_cuda(const PassParams& p, float* dslopes, cudaStream_t stream);
cudaError_t decode_cuda(const DecodeParams& p, cudaStream_t stream);

}  // namespace attnkit::lightning
