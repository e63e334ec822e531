// CPU emulator stand-in (tests/cuda_emu/run_ops_e2e.py): the device guard does nothing.
#pragma once
#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
}  // namespace c10::cuda
