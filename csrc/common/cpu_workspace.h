// Per-thread scratch tensors for the CPU ops' internal buffers (never for outputs or saved tensors).
//
// libtorch's CPU allocator is plain malloc. A buffer of a few MiB freed at the end of one call goes
// back to the kernel (mmap threshold / heap trim), and the next call touches fresh pages: thousands
// of page faults per training step, which also serialise the intra-op threads on the kernel's page
// tables. A slot here keeps its storage between calls on the same thread instead.
//
// Rules for callers:
// - each buffer of one call takes its own slot number (slots alias across calls, never within one);
// - the slots of a thread are shared by every op: only an op's entry point takes them, never the
//   flash core or another helper it calls;
// - a view is dead once the op returns: it must not be returned, saved or captured;
// - the contents are not initialised.
// Buffers over kMaxCachedBytes are allocated afresh and not kept, so a long sequence does not pin
// its peak scratch memory for the life of the thread.
#pragma once
#include <torch/all.h>

#include <array>
#include <cstdint>

namespace attnkit::cpu {

inline constexpr int kWorkspaceSlots = 8;
inline constexpr int64_t kMaxCachedBytes = int64_t(64) << 20;

inline at::Tensor workspace(int slot, at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK(slot >= 0 && slot < kWorkspaceSlots, "cpu::workspace: slot ", slot, " out of range");
  const auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t bytes = numel * int64_t(c10::elementSize(dtype));
  if (bytes > kMaxCachedBytes) return at::empty(sizes, opts);
  thread_local std::array<at::Tensor, kWorkspaceSlots> slots;
  at::Tensor& buf = slots[slot];
  if (!buf.defined() || buf.numel() < bytes) buf = at::empty({bytes}, opts.dtype(at::kByte));
  return buf.narrow(0, 0, bytes).view(dtype).view(sizes);
}

}  // namespace attnkit::cpu
