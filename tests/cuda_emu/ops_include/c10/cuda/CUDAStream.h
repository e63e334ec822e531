// CPU emulator stand-in (tests/cuda_emu/run_ops_e2e.py): one null stream; the emulator runs every
// launch synchronously.
#pragma once
#include <c10/cuda/CUDAException.h>  // as the real header does, through CUDAFunctions.h
#include <cuda_runtime.h>

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace c10::cuda
