// The PTX primitives of csrc/common/mma.cuh on the CPU emulator (included by mma.cuh when
// ATTNKIT_CUDA_EMU is defined): cp.async with zero fill, commit / wait_group, ldmatrix x4 (.trans), mma.m16n8k16.
//
// cp.async: every thread keeps its own queue of copy groups. In the default "late" mode a copy lands
// only when a cp.async.wait_group that covers its group executes (the latest moment PTX allows), so a
// kernel that reads shared memory before waiting sees the 0xCD garbage; in "early" mode
// (emu::g_cp_async_early = true) it lands when issued, which exposes a copy that overwrites data other
// warps still read. The source is not read when src-size is 0 (zero fill), as on the GPU.
#pragma once
#include <deque>
#include <vector>

#include "emu_cuda.h"

namespace emu {
inline bool g_cp_async_early = [] {
  const char* e = std::getenv("EMU_CP_ASYNC_EARLY");
  return e && e[0] == '1';
}();
struct AsyncCopy {
  void* dst;
  const void* src;  // nullptr: zero fill
};
struct AsyncQueue {
  std::vector<AsyncCopy> open;                 // issued, not yet committed
  std::deque<std::vector<AsyncCopy>> groups;  // committed, oldest first
};
inline thread_local AsyncQueue t_async;
inline void land(const AsyncCopy& c) {
  if (c.src)
    std::memcpy(c.dst, c.src, 16);
  else
    std::memset(c.dst, 0, 16);
}
}  // namespace emu

// CUDA's integer min / max overloads used by device code
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

namespace attnkit {

inline void cp_async_16(void* smem, const void* gmem, bool pred) {
  const emu::AsyncCopy c{smem, pred ? gmem : nullptr};
  if (emu::g_cp_async_early)
    emu::land(c);
  else
    emu::t_async.open.push_back(c);
}
inline void cp_async_commit() {
  emu::t_async.groups.push_back(std::move(emu::t_async.open));
  emu::t_async.open.clear();
}
// wait_group N: all but the N most recent committed groups are complete (uncommitted copies are not
// waited for).
template <int N>
inline void cp_async_wait() {
  auto& q = emu::t_async;
  while (q.groups.size() > size_t(N)) {
    for (const auto& c : q.groups.front()) emu::land(c);
    q.groups.pop_front();
  }
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { emu::ldmatrix_x4(r, smem, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) { emu::ldmatrix_x4(r, smem, true); }
template <typename T>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_m16n8k16<T>(c, a, {b0, b1});
}

}  // namespace attnkit
