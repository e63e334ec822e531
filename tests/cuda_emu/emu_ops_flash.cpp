// run_ops_e2e.py, translation unit 1 of 4: the flash core's CUDA kernels and their dispatch
// (flash_fwd / flash_bwd of flash_launch.cu) on the CPU emulator, as in flash_emu_test.cpp.
#define ATTNKIT_CUDA_EMU 1
#include "emu_cuda.h"
#include "emu_mma_prims.h"

// Blocks run one at a time: the kernels' `extern __shared__` array is this one buffer.
#undef __shared__
#define __shared__
#undef __align__
#define __align__(x) __attribute__((aligned(x)))
namespace attnkit::flash {
constexpr size_t kEmuSmemBytes = 232 * 1024;
alignas(16) unsigned char smem_raw[kEmuSmemBytes];
namespace {
const bool kSmemSet = [] {
  emu::g_smem_buffer = reinterpret_cast<char*>(smem_raw);
  emu::g_smem_buffer_size = kEmuSmemBytes;
  return true;
}();
}  // namespace
}  // namespace attnkit::flash

#include "flash/flash_launch.cu"
#include "flash/flash_fwd_kernel.cuh"
#include "flash/flash_bwd_kernel.cuh"
#include "flash/inst/flash_bwd_hdim128_bf16.cu"
#include "flash/inst/flash_bwd_hdim128_fp16.cu"
#include "flash/inst/flash_bwd_hdim256_bf16.cu"
#include "flash/inst/flash_bwd_hdim256_fp16.cu"
#include "flash/inst/flash_bwd_hdim32_bf16.cu"
#include "flash/inst/flash_bwd_hdim32_fp16.cu"
#include "flash/inst/flash_bwd_hdim64_bf16.cu"
#include "flash/inst/flash_bwd_hdim64_fp16.cu"
#include "flash/inst/flash_bwd_hdim96_bf16.cu"
#include "flash/inst/flash_bwd_hdim96_fp16.cu"
#include "flash/inst/flash_fwd_hdim128_bf16.cu"
#include "flash/inst/flash_fwd_hdim128_fp16.cu"
#include "flash/inst/flash_fwd_hdim256_bf16.cu"
#include "flash/inst/flash_fwd_hdim256_fp16.cu"
#include "flash/inst/flash_fwd_hdim32_bf16.cu"
#include "flash/inst/flash_fwd_hdim32_fp16.cu"
#include "flash/inst/flash_fwd_hdim64_bf16.cu"
#include "flash/inst/flash_fwd_hdim64_fp16.cu"
#include "flash/inst/flash_fwd_hdim96_bf16.cu"
#include "flash/inst/flash_fwd_hdim96_fp16.cu"
