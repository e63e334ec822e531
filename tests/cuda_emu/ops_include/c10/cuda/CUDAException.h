// CPU emulator stand-in (tests/cuda_emu/run_ops_e2e.py): emulated launches report their errors
// through cudaGetLastError like the runtime does.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "emulated CUDA call failed: " #expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
