// Checks of the emulator's own sanitizer machinery on tiny kernels (tests/test_cuda_emu_sanitize.py):
//   emu_selftest barrier        a block exchange through shared memory with its barrier: right result
//   emu_selftest no-barrier     the same without the barrier: exit 1 when the result is wrong (under
//                               EMU_SCHEDULE=warps or warps-rev it must be)
//   emu_selftest global-race    two blocks store to the same output element: the watch reports it (66)
//   emu_selftest smem-overflow  a read one element past the dynamic shared memory (AddressSanitizer)
#define ATTNKIT_CUDA_EMU 1
#include <cstdio>
#include <string>
#include <vector>

#include "common/launch.cuh"
#include "emu_cuda.h"

namespace {

constexpr int kThreads = 128;

// each thread publishes its index, then reads the one of a thread in another warp
template <bool kBarrier>
__global__ void exchange(int* out) {
  ATTNKIT_DYNAMIC_SMEM(smem);
  int* s = reinterpret_cast<int*>(smem);
  const int t = threadIdx.x;
  s[t] = t + 1;
  if constexpr (kBarrier) __syncthreads();
  out[blockIdx.x * kThreads + t] = s[(t + 32) % kThreads];
}

// every block writes element 0 (and its own elements)
__global__ void overlapping(int* out) {
  const int t = threadIdx.x;
  out[1 + blockIdx.x * kThreads + t] = t;
  if (t == 0) out[0] = int(blockIdx.x);
}

__global__ void overflow(int* out) {
  ATTNKIT_DYNAMIC_SMEM(smem);
  int* s = reinterpret_cast<int*>(smem);
  s[threadIdx.x] = 1;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = s[kThreads];  // one past the launch's shared memory
}

int check_exchange(bool barrier) {
  const int blocks = 2;
  std::vector<int> out(blocks * kThreads, -1);
  if (barrier)
    ATTNKIT_LAUNCH_KERNEL(exchange<true>, dim3(blocks), dim3(kThreads), kThreads * sizeof(int), nullptr, out.data());
  else
    ATTNKIT_LAUNCH_KERNEL(exchange<false>, dim3(blocks), dim3(kThreads), kThreads * sizeof(int), nullptr, out.data());
  int bad = 0;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < kThreads; ++t) bad += out[b * kThreads + t] != (t + 32) % kThreads + 1;
  std::printf("exchange %s barrier: %d wrong\n", barrier ? "with" : "without", bad);
  return bad ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "";
  if (what == "barrier") return check_exchange(true);
  if (what == "no-barrier") return check_exchange(false);
  if (what == "global-race") {
    std::vector<int> out(1 + 2 * kThreads, -1);
    emu::watch(out.data(), out.size() * sizeof(int), "out");
    ATTNKIT_LAUNCH_KERNEL(overlapping, dim3(2), dim3(kThreads), 0, nullptr, out.data());
    std::printf("no race reported\n");
    return 0;
  }
  if (what == "smem-overflow") {
    std::vector<int> out(1, -1);
    ATTNKIT_LAUNCH_KERNEL(overflow, dim3(1), dim3(kThreads), kThreads * sizeof(int), nullptr, out.data());
    std::printf("no overflow reported (read %d)\n", out[0]);
    return 0;
  }
  std::fprintf(stderr, "usage: emu_selftest barrier | no-barrier | global-race | smem-overflow\n");
  return 2;
}
