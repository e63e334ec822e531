// Per-thread scratch tensors for the CPU ops' internal buffers (never for outputs or saved tensors).
//
// libtorch's CPU allocator is plain malloc. A buffer of a few MiB freed at the end of one call goes
// back to the kernel (mmap threshold / heap trim), and the next call touches fresh pages: thousands
// of page faults per training step. A slot here keeps its storage between calls on the same thread
// instead.
//
// Rules for callers:
// - each buffer of one call takes its own slot number (slots alias across calls, never within one);
// - the slots of a thread are shared by every op: only an op's entry point takes them, never the
//   flash core or another helper it calls;
// - a view is dead once the op returns: it must not be returned, saved or captured;
// - the contents are not initialised.
// A thread keeps at most kMaxCachedBytes over all its slots: a buffer that would take it past that is
// allocated afresh and not kept, so a long sequence does not pin its peak scratch memory for the
// life of the thread.
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
  thread_local std::array<at::Tensor, kWorkspaceSlots> slots;
  thread_local int64_t cached = 0;  // bytes held over all slots
  at::Tensor& buf = slots[slot];
  const int64_t held = buf.defined() ? buf.numel() : 0;
  if (!buf.defined() || held < bytes) {
    if (cached - held + bytes > kMaxCachedBytes) return at::empty(sizes, opts);
    buf = at::empty({bytes}, opts.dtype(at::kByte));
    cached += bytes - held;
  }
  return buf.narrow(0, 0, bytes).view(dtype).view(sizes);
}

}  // namespace attnkit::cpu
