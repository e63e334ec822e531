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

// Forward: writes o and lse. With params.num_splits > 1 (split-KV, see flash_params.h) it runs the
// split forward into o_accum / lse_accum, then the combine kernel into o and lse.
void flash_fwd(const FlashParams& params, cudaStream_t stream);
// Split count for a forward of params with at most max_keys keys per batch (e.g. the largest
// seqused_k): requested > 0 is honoured, clamped to [1, min(key blocks, kFlashMaxSplits)];
// requested == 0 applies flash_num_splits_heuristic (flash_splits.h) with the current device's SM
// count. Key blocks: ceil(max_keys / kFwdBlockN), fewer when a window bounds what a query block sees.
int flash_fwd_num_splits(const FlashParams& params, int64_t max_keys, int64_t requested);
// Backward: needs dout, o, lse; fills delta and dq_accum (zeroed by the caller) as workspaces and
// writes dq, dk, dv (and dbias when set).
void flash_bwd(const FlashParams& params, cudaStream_t stream);

// One instantiation per (element type, head dim), each in its own .cu file under csrc/flash/inst/.
template <typename T, int kHeadDim>
void run_flash_fwd(const FlashParams& params, cudaStream_t stream);
template <typename T, int kHeadDim>
void run_flash_bwd(const FlashParams& params, cudaStream_t stream);

}  // namespace attnkit::flash
