// Compile-time dispatch helpers: turn runtime dtype / head-dim / flag values into template arguments.
// Keep the sets small: every combination is one more kernel instantiation in the build. The flash
// core takes dtype and head dim as template arguments; causal, window, bias, thresholds, tile lists
// and gathers are evaluated at run time (per tile, only where a tile needs masking), so the
// instantiation count stays dtype x head-dim.
#pragma once

#define ATTNKIT_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                            \
    if (COND) {                                    \
      constexpr static bool CONST_NAME = true;     \
      return __VA_ARGS__();                        \
    } else {                                       \
      constexpr static bool CONST_NAME = false;    \
      return __VA_ARGS__();                        \
    }                                              \
  }()

// IS_BF16 selects the 16-bit element type. Defined for CUDA sources only (and the CPU emulator).
#if defined(__CUDACC__) || defined(ATTNKIT_CUDA_EMU)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define ATTNKIT_FP16_SWITCH(IS_BF16, ELEM_T, ...) \
  [&] {                                           \
    if (IS_BF16) {                                \
      using ELEM_T = __nv_bfloat16;               \
      return __VA_ARGS__();                       \
    } else {                                      \
      using ELEM_T = __half;                      \
      return __VA_ARGS__();                       \
    }                                             \
  }()
#endif

// Head dims compiled for the flash core. Any other head dim (a multiple of 8 up to 256, see
// attnkit_flash_headdim_supported) runs the next larger instantiation: the kernels zero-fill the
// padded columns in their loads and store only the tensor's columns.
#define ATTNKIT_HEADDIM_SWITCH(HEADDIM, CONST_NAME, ...) \
  [&] {                                                  \
    if (HEADDIM <= 32) {                                 \
      constexpr static int CONST_NAME = 32;              \
      return __VA_ARGS__();                              \
    } else if (HEADDIM <= 64) {                          \
      constexpr static int CONST_NAME = 64;              \
      return __VA_ARGS__();                              \
    } else if (HEADDIM <= 96) {                          \
      constexpr static int CONST_NAME = 96;              \
      return __VA_ARGS__();                              \
    } else if (HEADDIM <= 128) {                         \
      constexpr static int CONST_NAME = 128;             \
      return __VA_ARGS__();                              \
    } else {                                             \
      constexpr static int CONST_NAME = 256;             \
      return __VA_ARGS__();                              \
    }                                                    \
  }()

// The head dims with their own flash instantiation (other kernels that need an exact one check this).
inline bool attnkit_headdim_supported(long d) {
  return d == 32 || d == 64 || d == 96 || d == 128 || d == 256;
}

// Head dims the flash core's CUDA kernels accept: multiples of 8 (16-byte rows) from 8 to 256.
inline bool attnkit_flash_headdim_supported(long d) { return d >= 8 && d <= 256 && d % 8 == 0; }
