// Entry points of the flash-attention core (CUDA). Ops fill a FlashParams and call these.
#pragma once
#include <cuda_runtime.h>

#include "flash/flash_params.h"

namespace attnkit::flash {

// Tile sizes of the kernels, for every dtype and head dim. Tile-skipping lists are built at this
// granularity: forward lists are per kFwdBlockM query rows, backward lists per kBwdBlockN keys.
constexpr int kFwdBlockM = 64;
constexpr int kFwdBlockN = 64;
constexpr int kBwdBlockM = 64;
constexpr int kBwdBlockN = 64;

// Forward: writes o and lse.
void flash_fwd(const FlashParams& params, cudaStream_t stream);
// Backward: needs dout, o, lse; fills delta and dq_accum (zeroed by the caller) as workspaces and
// writes dq, dk, dv (and dbias when set).
void flash_bwd(const FlashParams& params, cudaStream_t stream);

// One instantiation per (element type, head dim), each in its own .cu file under csrc/flash/inst/.
template <typename T, int kHeadDim>
void run_flash_fwd(const FlashParams& params, cudaStream_t stream);
template <typename T, int kHeadDim>
void run_flash_bwd(const FlashParams& params, cudaStream_t stream);

}  // namespace attnkit::flash
