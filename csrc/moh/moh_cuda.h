// Launchers of the Mixture-of-Head kernels (moh_route.cu, moh_move.cu); params in moh_params.h.
#pragma once
#include <cuda_runtime.h>

#include "moh/moh_params.h"

namespace attnkit::moh {

// Counting sort: q_index, q_count and slot from head_idx, O(B * L * K) plus O(B * h_q * L / 32).
void launch_route(const RouteParams& p, cudaStream_t stream);
// Weighted scatter slot space -> token space (and lse), see MoveParams.
void launch_scatter(const MoveParams& p, cudaStream_t stream);
// Output gradient gather token space -> slot space, with the weight gradient, see MoveParams.
void launch_gather_grad(const MoveParams& p, cudaStream_t stream);

}  // namespace attnkit::moh
