// run_ops_e2e.py, the op layer: csrc/sqa/sqa_cuda.cpp, csrc/routing/routing_cuda.cpp,
// csrc/dma/dma_cuda.cpp and csrc/moh/moh_cuda.cpp (the CUDA registrations, unchanged) compiled against stand-in c10/cuda and cub
// headers (ops_include/) and registered as torch ops of the library "attnkit_emu" on CPU tensors;
// their kernels run on the CPU emulator (emu_ops_flash.cpp, emu_ops_routing_*.cpp, emu_ops_kmeans.cpp,
// emu_ops_dma_select.cpp). Schemas come from csrc/op_schemas.h.
#include <torch/all.h>
#include <torch/library.h>

#include "common/checks.h"
#include "dma/dma_api.h"
#include "flash/flash_api.h"
#include "routing/routing_api.h"
#include "flash/flash_checks.h"

// The CUDA registrations check that their inputs live on the GPU: here they are CPU tensors.
#define is_cuda() is_cpu()
// Each file's TORCH_LIBRARY_IMPL(attnkit, CUDA, m) block becomes a function called below.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) static void EMU_REGISTER(torch::Library& m)

#define EMU_REGISTER register_sqa
#include "sqa/sqa_cuda.cpp"
#undef EMU_REGISTER
#define EMU_REGISTER register_routing
#include "routing/routing_cuda.cpp"
#undef EMU_REGISTER
#define EMU_REGISTER register_dma
#include "dma/dma_cuda.cpp"
#undef EMU_REGISTER
#define EMU_REGISTER register_moh
#include "moh/moh_cuda.cpp"
#undef EMU_REGISTER

TORCH_LIBRARY(attnkit_emu, m) {
  // every schema of attnkit (op_schemas.h); only this file's ops get an implementation
#define ATTNKIT_OP(schema) m.def(schema);
#include "op_schemas.h"
#undef ATTNKIT_OP
  register_sqa(m);
  register_dma(m);
  register_routing(m);
  register_moh(m);
}
