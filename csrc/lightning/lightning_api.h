// Lightning attention ops, device-agnostic: argument checks, allocation, and the composition of
// chunk passes (see lightning_params.h). Each device supplies a Backend; the CPU one lives in
// lightning_cpu.cpp, the CUDA one in lightning_cuda.cpp.
#pragma once
#include <torch/all.h>

#include <optional>
#include <tuple>

#include "lightning/lightning_params.h"

namespace attnkit::lightning {

constexpr int kDefaultBlockT = 64;

struct Backend {
  const char* name;  // "CPU" / "CUDA"
  // Chooses p.block_t (requested_block == 0: automatic), p.bv, p.num_slabs and p.num_segments
  // (requested_splits == 0: automatic). `total_rows` is the number of rows over all sequences.
  void (*plan)(PassParams& p, int64_t requested_block, int64_t requested_splits, int64_t total_rows);
  // Runs a planned pass: state-only phase and scan when num_segments > 1, then the main phase.
  void (*run)(const PassParams& p);
  // Sums dlambda_partial per head into dslopes[h] = -lambda_h * sum (accumulation type, [H]).
  void (*reduce_dslopes)(const PassParams& p, void* dslopes);
  void (*decode)(const DecodeParams& p);
};

std::tuple<at::Tensor, at::Tensor> lightning_fwd(const Backend& be, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& slopes, double scale,
                                                 const std::optional<at::Tensor>& initial_state,
                                                 const std::optional<at::Tensor>& cu_seqlens, int64_t block_size,
                                                 int64_t num_splits);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lightning_bwd(
    const Backend& be, const at::Tensor& dout, const std::optional<at::Tensor>& dfinal_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& slopes, double scale,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& cu_seqlens, int64_t block_size,
    int64_t num_splits, bool compute_dslopes);

at::Tensor lightning_decode_(const Backend& be, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& state, const at::Tensor& slopes, double scale);

std::tuple<at::Tensor, at::Tensor> lightning_decode(const Backend& be, const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& state,
                                                    const at::Tensor& slopes, double scale);

}  // namespace attnkit::lightning
