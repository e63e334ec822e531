// Element type of the tensors a kernel reads, in the torch-free params structs of every op.
// fp64 is CPU only.
#pragma once

namespace attnkit {

enum class ElemType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

}  // namespace attnkit
