// Argument checks shared by the ops. Every message names the argument.
#pragma once
#include <torch/all.h>

#define ATTNKIT_CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device() == (dev), #x " must be on ", (dev), " (got ", (x).device(), ")")
#define ATTNKIT_CHECK_DIM(x, n) \
  TORCH_CHECK((x).dim() == (n), #x " must have ", (n), " dimensions (got ", (x).dim(), ")")
#define ATTNKIT_CHECK_LAST_CONTIGUOUS(x) \
  TORCH_CHECK((x).numel() == 0 || (x).size(-1) <= 1 || (x).stride(-1) == 1, \
              #x " must be contiguous in its last dimension")

namespace attnkit {

inline bool is_half_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

}  // namespace attnkit
