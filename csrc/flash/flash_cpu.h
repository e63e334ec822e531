// CPU implementation of the flash core: the same FlashParams and the same semantics as the CUDA
// kernels (see flash_params.h), so every op that runs on the core gets its CPU path from here.
// Accumulates in fp32 (fp64 for double). Tile lists only skip work, so the CPU core may ignore
// them; it also ignores the delta / dq_accum workspaces (it keeps its own).
#pragma once
#include "flash/flash_params.h"

namespace attnkit::flash {

void flash_fwd_cpu(const FlashParams& params);
void flash_bwd_cpu(const FlashParams& params);

}  // namespace attnkit::flash
