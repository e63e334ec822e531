// Device helpers shared by the routing kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/launch.cuh"
#include "routing/routing_cuda.h"

namespace attnkit::routing {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Monotone map of a float score to uint32: larger score -> larger key. NaN ranks below -inf's key
// neighbour (it is mapped to -inf), -0 is mapped to +0 so that equal scores give equal keys.
__device__ __forceinline__ unsigned score_key(float f) {
  if (isnan(f)) f = -INFINITY;
  unsigned u = __float_as_uint(f);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline int ceil_div_i(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Grid of a 1-D elementwise launch with a grid-stride loop.
inline unsigned grid_1d(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks > (int64_t{1} << 20)) blocks = int64_t{1} << 20;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

#define ATTNKIT_ROUTING_TYPE_SWITCH(DTYPE, T, ...)                                   \
  [&] {                                                                              \
    if ((DTYPE) == ::attnkit::flash::ElemType::kFloat16) {                           \
      using T = __half;                                                              \
      return __VA_ARGS__();                                                          \
    } else if ((DTYPE) == ::attnkit::flash::ElemType::kBFloat16) {                   \
      using T = __nv_bfloat16;                                                       \
      return __VA_ARGS__();                                                          \
    } else {                                                                         \
      using T = float;                                                               \
      return __VA_ARGS__();                                                          \
    }                                                                                \
  }()

}  // namespace attnkit::routing
