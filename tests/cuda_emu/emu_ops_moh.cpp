// run_ops_e2e.py: csrc/moh/moh_route.cu and csrc/moh/moh_move.cu compiled as host C++ against the CPU
// emulator (each .cu file its own translation unit under nvcc; here one, as they share no names
// outside their anonymous namespaces).
#define ATTNKIT_CUDA_EMU 1
#include "emu_cuda.h"
#include "emu_mma_prims.h"
#include "emu_ops_prims.h"
#include "moh/moh_route.cu"
#include "moh/moh_move.cu"
