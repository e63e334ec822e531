// Kernel launch hooks.
// ATTNKIT_LAUNCH_KERNEL(kernel, grid, block, smem, stream, args...) is exactly
// kernel<<<grid, block, smem, stream>>>(args...); ATTNKIT_DYNAMIC_SMEM(name) declares a kernel's
// dynamic shared memory as `char name[]` (16-byte aligned). Under ATTNKIT_CUDA_EMU (tests/cuda_emu only,
// never set by the build) the grid runs on the CPU emulator and the buffer is the emulated block's.
#pragma once

#ifdef ATTNKIT_CUDA_EMU
#define ATTNKIT_LAUNCH_KERNEL(kernel, grid, block, smem, stream, ...) \
  ::emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#define ATTNKIT_DYNAMIC_SMEM(name) char* name = ::emu::dynamic_smem()
#else
#define ATTNKIT_LAUNCH_KERNEL(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define ATTNKIT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) char name[]
#endif
