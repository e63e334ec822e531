// Launchers of the routing kernels (routing_select.cu, routing_combine.cu, routing_kmeans.cu),
// torch-free; each takes the params struct of routing_params.h that documents what it computes.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "routing/routing_params.h"

namespace attnkit::routing {

void launch_routing_scores(const ScoreParams& p, cudaStream_t stream);
// assign[(b*L + l)*H + h] = the cluster packed in best[(b*H + h)*L + l] (int32).
void launch_extract_assign(const unsigned long long* best, int64_t B, int H, int L, int* assign, cudaStream_t stream);

// For every row r of scores [rows, L]: the w largest (ties to the lower position) in position order,
// into out0[r] for r < rows0 and out1[r - rows0] otherwise (each [*, w] int32).
void launch_topw_select(const float* scores, int64_t rows, int64_t rows0, int L, int w, int* out0, int* out1,
                        cudaStream_t stream);

// Inverse of index lists idx [BH][SW] (values in [0, L)): per (bh, token) the ascending list of entries
// r with idx == token, as CSR: offsets [BH][L+1], entries [BH][SW]. Deterministic.
// offsets and cursor ([BH][L]) must be zeroed by the caller. counts_only: stop after the counts
// (offsets[bh][t + 1] = count of t, not scanned; entries and cursor unused).
void launch_build_inverse(const int* idx, int64_t BH, int64_t SW, int L, int* offsets, int* cursor, int* entries,
                          bool counts_only, cudaStream_t stream);

void launch_combine(const CombineParams& p, cudaStream_t stream);

void launch_gather_dout(const GatherParams& p, cudaStream_t stream);

void launch_scatter_add_atomic(const ScatterParams& p, cudaStream_t stream);
void launch_cast_from_f32(const float* acc, void* out, int64_t n, ElemType dtype, cudaStream_t stream);

// Key-padding bias in segment space: bias[(b*Hb + h)*SW + r] = -inf when mask[b, t] else 0, with
// t = idx[(b*Hb + h)*SW + r] (or t = r when idx is null). mask is contiguous bool [B, L].
void launch_key_bias(const bool* mask, const int* idx, int64_t B, int64_t Hb, int64_t SW, int L, float* bias,
                     cudaStream_t stream);

void launch_kmeans_sums(const KmeansSumParams& p, cudaStream_t stream);
// mu[h, c] <- normalize(decay mu + (1 - decay) normalize(sums / count)) where count > 0; mu fp32 [H, C, D].
void launch_kmeans_finalize(const unsigned long long* sums, const int* counts, float* mu, int H, int C, int D,
                            float decay, cudaStream_t stream);

}  // namespace attnkit::routing
