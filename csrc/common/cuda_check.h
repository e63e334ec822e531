// Checked CUDA runtime calls for code that must also build under the CPU emulator (tests/cuda_emu),
// where c10/cuda is not available: ATTNKIT_CUDA_CHECK(expr) raises a c10::Error naming the call when
// it does not return cudaSuccess; ATTNKIT_LAUNCH_CHECK() does so for the last kernel launch.
#pragma once
#include <c10/util/Exception.h>

#ifdef ATTNKIT_CUDA_EMU
#define ATTNKIT_CUDA_ERROR_STRING(err) (err)
#else
#define ATTNKIT_CUDA_ERROR_STRING(err) cudaGetErrorString(err)
#endif

#define ATTNKIT_CUDA_CHECK(expr)                                                                          \
  do {                                                                                                    \
    const cudaError_t attnkit_cuda_err_ = (expr);                                                         \
    TORCH_CHECK(attnkit_cuda_err_ == cudaSuccess, "CUDA error: ", ATTNKIT_CUDA_ERROR_STRING(attnkit_cuda_err_), \
                " (from ", #expr, ")");                                                                   \
  } while (0)

#define ATTNKIT_LAUNCH_CHECK() ATTNKIT_CUDA_CHECK(cudaGetLastError())
