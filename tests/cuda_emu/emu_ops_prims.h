// Extra CUDA device intrinsics for the op-layer kernels (routing) on the CPU emulator
// (tests/cuda_emu/run_ops_e2e.py): warp votes / matches / integer shuffles exchanged through the
// per-warp buffers of emu_cuda.h, 32/64-bit atomics and a few math functions.
#pragma once
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "emu_cuda.h"

// `__shared__ __align__(16) float a[..]` is `static __attribute__((aligned(16))) float a[..]` (alignas
// may not sit between decl-specifiers).
#undef __align__
#define __align__(x) __attribute__((aligned(x)))

namespace emu {
// All 32 lanes publish a value, then each reads what it needs (the masks used are always full).
template <class F>
inline auto warp_exchange(uint64_t mine, F&& read) {
  const int w = warp(), l = lane();
  xch(w, l)[0] = mine;
  warp_sync();
  auto r = read(w, l);
  warp_sync();
  return r;
}
}  // namespace emu

inline unsigned __ballot_sync(unsigned, bool pred) {
  return emu::warp_exchange(pred ? 1u : 0u, [](int w, int) {
    unsigned m = 0;
    for (int ln = 0; ln < 32; ++ln)
      if (emu::xch(w, ln)[0] & 1u) m |= 1u << ln;
    return m;
  });
}
// Lanes of `mask` whose value equals the caller's. Only the lanes of `mask` call it (it sits in a
// branch), so no warp barrier: each publishes its value with a tag unique to this block and barrier
// interval, then waits for the other lanes of `mask` to publish theirs. The next warp barrier keeps
// the values alive until every caller has read them.
namespace emu {
inline uint32_t g_match_val[32][32];
inline std::atomic<uint64_t> g_match_tag[32][32];
}  // namespace emu
inline unsigned __match_any_sync(unsigned mask, unsigned v) {
  const int w = emu::warp(), l = emu::lane();
  const uint64_t tag = (emu::t_block_serial << 32) | ((emu::t_sync_epoch + 1) & 0xFFFFFFFFu);
  emu::g_match_val[w][l] = v;
  emu::g_match_tag[w][l].store(tag, std::memory_order_release);
  unsigned m = 0;
  for (int ln = 0; ln < 32; ++ln) {
    if (!(mask >> ln & 1u)) continue;
    while (emu::g_match_tag[w][ln].load(std::memory_order_acquire) != tag) std::this_thread::yield();
    if (emu::g_match_val[w][ln] == v) m |= 1u << ln;
  }
  return m;
}
inline int __shfl_up_sync(unsigned, int v, unsigned delta) {
  return emu::warp_exchange(uint64_t(uint32_t(v)), [delta](int w, int l) {
    const int src = l >= int(delta) ? l - int(delta) : l;
    return int(uint32_t(emu::xch(w, src)[0]));
  });
}
inline int __ffs(unsigned x) { return x == 0 ? 0 : std::countr_zero(x) + 1; }
inline int __popc(unsigned x) { return std::popcount(x); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float fmaf(float a, float b, float c) { return std::fma(a, b, c); }
inline long long __double2ll_rn(double x) { return std::llrint(x); }  // default rounding: to nearest even
inline float sqrtf(float x) { return std::sqrt(x); }
using std::isnan;
using std::max;
using std::min;

inline int atomicAdd(int* a, int v) { return std::atomic_ref<int>(*a).fetch_add(v); }
inline unsigned atomicOr(unsigned* a, unsigned v) { return std::atomic_ref<unsigned>(*a).fetch_or(v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*a).fetch_add(v);
}
inline unsigned long long atomicMax(unsigned long long* a, unsigned long long v) {
  std::atomic_ref<unsigned long long> r(*a);
  unsigned long long cur = r.load();
  while (cur < v && !r.compare_exchange_weak(cur, v)) {
  }
  return cur;
}

// Block-wide OR of pred, a barrier like __syncthreads (blocks run one at a time: one flag serves all).
namespace emu {
inline std::atomic<int> g_sync_or{0};
}  // namespace emu
inline int __syncthreads_or(int pred) {
  __syncthreads();  // every thread has read the previous result
  if (emu::t_linear == 0) emu::g_sync_or.store(0);
  __syncthreads();
  if (pred) emu::g_sync_or.store(1);
  __syncthreads();
  const int r = emu::g_sync_or.load();
  __syncthreads();
  return r;
}
