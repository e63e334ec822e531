// run_ops_e2e.py: csrc/routing/routing_kmeans.cu compiled as host C++ against the CPU emulator (each .cu file
// is its own translation unit, as under nvcc). Kernels' __shared__ arrays are function statics:
// blocks run one at a time.
#define ATTNKIT_CUDA_EMU 1
#include "emu_cuda.h"
#include "emu_ops_prims.h"
#include "routing/routing_kmeans.cu"
