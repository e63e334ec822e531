// Kernel launch hook: ATTNKIT_LAUNCH_KERNEL(kernel, grid, block, smem, stream, args...) is exactly
// kernel<<<grid, block, smem, stream>>>(args...). Under ATTNKIT_CUDA_EMU (tests/cuda_emu only, never
// set by the build) the grid runs on the CPU emulator instead.
#pragma once

#ifdef ATTNKIT_CUDA_EMU
#define ATTNKIT_LAUNCH_KERNEL(kernel, grid, block, smem, stream, ...) \
  ::emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#else
#define ATTNKIT_LAUNCH_KERNEL(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif
