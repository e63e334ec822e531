// Launchers of the CUDA mask-selection kernels (dma_select.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "dma/dma_params.h"

namespace attnkit::dma {

// Bytes of p.workspace that select_cuda needs (sort buffers, ranks, wavelet matrix, tile flags).
size_t select_workspace_bytes(const SelectParams& p);
// Writes thr, tie and both tile lists (every entry, -1 padding included).
void select_cuda(const SelectParams& p, cudaStream_t stream);

// Tile lists of the compatibility path from its dense bias; fwd_list / bwd_list may be null.
size_t bias_lists_workspace_bytes(const BiasListParams& p);
void bias_lists_cuda(const BiasListParams& p, cudaStream_t stream);

}  // namespace attnkit::dma
