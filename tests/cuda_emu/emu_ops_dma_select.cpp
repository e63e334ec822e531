// run_ops_e2e.py: csrc/dma/dma_select.cu compiled as host C++ against the CPU emulator, with the
// stand-in cub radix sort of ops_include/cub. Kernels' __shared__ arrays are function statics.
#define ATTNKIT_CUDA_EMU 1
#include "emu_cuda.h"
#include "emu_ops_prims.h"
#include "dma/dma_select.cu"
