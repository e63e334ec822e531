// A small CUDA emulator for testing attnkit's kernels on a machine without a GPU.
//
// It runs a kernel grid block by block; inside a block every CUDA thread is a std::thread, so
// __syncthreads() (a block barrier), __syncwarp() and warp-collective operations (ldmatrix, mma.sync,
// shuffles: data exchanged through per-warp buffers between two warp barriers) behave as on the GPU.
// The warp-level operations follow the PTX ISA's fragment layouts for ldmatrix.m8n8.x4(.trans) and
// mma.m16n8k16 (f16/bf16 inputs, f32 accumulators). __half / __nv_bfloat16 round to nearest even.
// Only what attnkit's kernels use is provided. Shared memory starts filled with a garbage pattern,
// so reading it before writing shows up in the results.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <utility>
#include <vector>

// AddressSanitizer's manual poisoning (no-ops in builds without it).
#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#ifdef EMU_ASAN
extern "C" void __asan_poison_memory_region(void const volatile*, size_t);
extern "C" void __asan_unpoison_memory_region(void const volatile*, size_t);
#define EMU_POISON(p, n) __asan_poison_memory_region((p), (n))
#define EMU_UNPOISON(p, n) __asan_unpoison_memory_region((p), (n))
#else
#define EMU_POISON(p, n) ((void)(p), (void)(n))
#define EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

// ---- CUDA language / runtime surface ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one at a time, so one instance per kernel is a block's
#define __align__(x) alignas(x)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
using cudaStream_t = void*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor,
  cudaDevAttrMultiProcessorCount
};

namespace emu {
// An H100-like device.
inline int g_max_optin = 227 * 1024, g_smem_per_sm = 228 * 1024, g_sms = 132;
inline size_t g_last_smem = 0;  // dynamic shared memory of the last launch
// When set, blocks use this buffer as their dynamic shared memory (kernels that declare
// `extern __shared__` arrays: the test defines the array and points this at it).
inline char* g_smem_buffer = nullptr;
inline size_t g_smem_buffer_size = 0;

// Schedules (environment, read once; tests/cuda_emu/sanitize.sh sets them):
//   EMU_SCHEDULE=warps      the warps of a block run one at a time, in warp order: each runs ahead to
//                           its next block barrier (or its end) before the next warp starts, so a
//                           missing __syncthreads lets a warp read shared memory another warp has not
//                           written yet (0xCD garbage) or has already overwritten;
//   EMU_SCHEDULE=warps-rev  the same in reverse warp order;
//   otherwise               every thread runs freely (the OS schedules them).
//   EMU_BLOCK_ORDER=rev     blocks run from the last to the first (a result that depends on which
//                           block ran first changes).
// Global write check: buffers registered with emu::watch() are compared before and after every block;
// a byte changed by two different blocks of one launch is a cross-block race (atomics must not write
// to watched buffers). Any finding prints a report and exits the process with status 66.
enum class Schedule { kFree, kWarps, kWarpsRev };
inline Schedule schedule_from_env() {
  const char* e = std::getenv("EMU_SCHEDULE");
  if (!e) return Schedule::kFree;
  const std::string s(e);
  return s == "warps" ? Schedule::kWarps : s == "warps-rev" ? Schedule::kWarpsRev : Schedule::kFree;
}
inline Schedule g_schedule = schedule_from_env();
inline bool g_block_rev = [] {
  const char* e = std::getenv("EMU_BLOCK_ORDER");
  return e && std::string(e) == "rev";
}();
inline uint64_t g_launch_serial = 0;  // launches so far, for reports

[[noreturn]] inline void finding(const std::string& what) {
  std::fprintf(stderr, "EMU SANITIZER: %s\n", what.c_str());
  std::fflush(stderr);
  std::fflush(stdout);
  std::_Exit(66);
}

struct Watched {
  unsigned char* p;
  size_t n;
  std::string name;
  std::vector<unsigned char> before;
  std::vector<int64_t> owner;  // per byte: linear index of the block that changed it in this launch, or -1
};
inline std::vector<Watched> g_watched;
inline void watch(void* p, size_t n, std::string name) {
  if (n) g_watched.push_back({static_cast<unsigned char*>(p), n, std::move(name), {}, {}});
}
inline void unwatch_all() { g_watched.clear(); }
}  // namespace emu

template <class F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int bytes) {
  return bytes <= emu::g_max_optin ? cudaSuccess : cudaErrorInvalidValue;
}
namespace emu {
inline cudaError_t g_last_error = cudaSuccess;  // sticky launch error, read by cudaGetLastError
}  // namespace emu
inline cudaError_t cudaGetLastError() { return std::exchange(emu::g_last_error, cudaSuccess); }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu::g_max_optin
       : a == cudaDevAttrMaxSharedMemoryPerMultiprocessor ? emu::g_smem_per_sm
                                                         : emu::g_sms;
  return cudaSuccess;
}

// ---- 16-bit floats ----
// Like CUDA's types they convert from float with round-to-nearest-even (T(x) in kernel code).
struct __half {
  uint16_t bits;
  __half() = default;
  __half(float x);
};
struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float x);
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return float(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  __nv_bfloat16 b;
  if (std::isnan(x)) {
    b.bits = 0x7fc0;
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    b.bits = uint16_t(u >> 16);
  }
  return b;
}
inline __half::__half(float x) : bits(__float2half_rn(x).bits) {}
inline __nv_bfloat16::__nv_bfloat16(float x) : bits(__float2bfloat16_rn(x).bits) {}
struct __half2 {
  __half x, y;  // x in the low 16 bits
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

namespace emu {

struct Idx {
  unsigned x, y, z;
};

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<std::array<uint64_t, 32 * 8>> xch;  // per warp: 8 exchange slots per lane
  // dynamic shared memory: a heap block of exactly the launch's size, so AddressSanitizer reports
  // any access past it
  struct Free {
    void operator()(char* p) const { ::operator delete[](p, std::align_val_t(128)); }
  };
  std::unique_ptr<char[], Free> smem;
  char* smem_aligned = nullptr;

  // serialized warps (EMU_SCHEDULE=warps / warps-rev): the warp order[pos] runs; the others wait.
  bool serial = false;
  std::mutex m;
  std::unique_ptr<std::condition_variable[]> cv;  // per warp: only the warp whose turn it is wakes
  std::vector<int> order, parked, exited;  // parked: lanes at the block barrier or finished
  size_t pos = 0;
  uint64_t phase = 0;

  // the next warp that still has lanes to run (all at the barrier: release it)
  void advance() {
    const size_t nw = order.size();
    while (pos < nw && parked[order[pos]] == 32) ++pos;
    if (pos < nw) return;
    bool any = false;
    for (size_t w = 0; w < nw; ++w) {
      parked[w] = exited[w];
      any |= exited[w] < 32;
    }
    if (!any) return;
    ++phase;
    pos = 0;
    while (pos < nw && parked[order[pos]] == 32) ++pos;
  }
  void start(int w) {
    std::unique_lock<std::mutex> lk(m);
    cv[w].wait(lk, [&] { return pos < order.size() && order[pos] == w; });
  }
  void wake() {
    if (pos < order.size()) cv[order[pos]].notify_all();
  }
  void barrier(int w) {
    std::unique_lock<std::mutex> lk(m);
    ++parked[w];
    const uint64_t ph = phase;
    advance();
    wake();
    cv[w].wait(lk, [&] { return phase != ph && pos < order.size() && order[pos] == w; });
  }
  void finish(int w) {
    std::unique_lock<std::mutex> lk(m);
    ++parked[w];
    ++exited[w];
    advance();
    wake();
  }
};

inline thread_local Idx t_thread{0, 0, 0};
inline thread_local Idx t_block{0, 0, 0};
inline thread_local int t_linear = 0;
inline thread_local Block* t_blk = nullptr;
inline Idx g_block_dim{1, 1, 1}, g_grid_dim{1, 1, 1};

// Divergent warp collectives (__match_any_sync inside a branch) key their exchange on (block serial,
// number of barriers this thread has passed): equal for the lanes of a warp between two barriers.
inline std::atomic<uint64_t> g_block_serial{0};
inline thread_local uint64_t t_block_serial = 0;
inline thread_local uint64_t t_sync_epoch = 0;

inline char* dynamic_smem() { return t_blk->smem_aligned; }
inline int lane() { return t_linear & 31; }
inline int warp() { return t_linear >> 5; }
inline void warp_sync() {
  ++t_sync_epoch;
  t_blk->warp_bar[warp()]->arrive_and_wait();
}
inline uint64_t* xch(int w, int l) { return &t_blk->xch[w][l * 8]; }

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row (l % 8) of
// matrix (l / 8); register i gets matrix i's elements (row l/4, cols 2(l%4), 2(l%4)+1), or with
// .trans the elements (rows 2(l%4), 2(l%4)+1, col l/4), low element in the low half.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  const int w = warp(), l = lane();
  xch(w, l)[0] = reinterpret_cast<uint64_t>(p);
  warp_sync();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = reinterpret_cast<const uint16_t*>(xch(w, i * 8 + (l >> 2))[0]);
      lo = row[2 * (l & 3)];
      hi = row[2 * (l & 3) + 1];
    } else {
      const uint16_t* r0 = reinterpret_cast<const uint16_t*>(xch(w, i * 8 + 2 * (l & 3))[0]);
      const uint16_t* r1 = reinterpret_cast<const uint16_t*>(xch(w, i * 8 + 2 * (l & 3) + 1)[0]);
      lo = r0[l >> 2];
      hi = r1[l >> 2];
    }
    r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  warp_sync();
}

template <typename T>
inline float half_bits_to_float(uint16_t b) {
  T x;
  x.bits = b;
  if constexpr (std::is_same_v<T, __half>)
    return __half2float(x);
  else
    return __bfloat162float(x);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: with g = lane / 4, t = lane % 4,
//   A: a0,a1 (g, 2t..2t+1), a2,a3 (g+8, 2t..), a4,a5 (g, 2t+8..), a6,a7 (g+8, 2t+8..)
//   B: b0,b1 (rows 2t..2t+1, col g), b2,b3 (rows 2t+8..2t+9, col g)
//   C: c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
template <typename T>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int w = warp(), l = lane();
  uint64_t* mine = xch(w, l);
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  warp_sync();
  float A[16][16], B[16][8];
  for (int ln = 0; ln < 32; ++ln) {
    const uint64_t* x = xch(w, ln);
    const int g = ln >> 2, t = ln & 3;
    auto el = [&](int reg, int half) { return half_bits_to_float<T>(uint16_t(uint32_t(x[reg]) >> (16 * half))); };
    A[g][2 * t] = el(0, 0);
    A[g][2 * t + 1] = el(0, 1);
    A[g + 8][2 * t] = el(1, 0);
    A[g + 8][2 * t + 1] = el(1, 1);
    A[g][2 * t + 8] = el(2, 0);
    A[g][2 * t + 9] = el(2, 1);
    A[g + 8][2 * t + 8] = el(3, 0);
    A[g + 8][2 * t + 9] = el(3, 1);
    B[2 * t][g] = el(4, 0);
    B[2 * t + 1][g] = el(4, 1);
    B[2 * t + 8][g] = el(5, 0);
    B[2 * t + 9][g] = el(5, 1);
  }
  warp_sync();
  const int g = l >> 2, t = l & 3;
  for (int x = 0; x < 4; ++x) {
    const int row = g + (x >> 1) * 8, col = 2 * t + (x & 1);
    float s = c[x];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    c[x] = s;
  }
}

inline float warp_sum(float v) {
  const int w = warp(), l = lane();
  std::memcpy(xch(w, l), &v, 4);
  warp_sync();
  float s = 0.f;
  for (int ln = 0; ln < 32; ++ln) {
    float x;
    std::memcpy(&x, xch(w, ln), 4);
    s += x;
  }
  warp_sync();
  return s;
}

inline float warp_max(float v) {
  const int w = warp(), l = lane();
  std::memcpy(xch(w, l), &v, 4);
  warp_sync();
  float m = v;
  for (int ln = 0; ln < 32; ++ln) {
    float x;
    std::memcpy(&x, xch(w, ln), 4);
    m = std::max(m, x);
  }
  warp_sync();
  return m;
}

// __shfl_xor_sync(full mask, v, m): lane l receives lane (l ^ m)'s value.
inline float shfl_xor(float v, int m) {
  const int w = warp(), l = lane();
  std::memcpy(xch(w, l), &v, 4);
  warp_sync();
  float x;
  std::memcpy(&x, xch(w, l ^ m), 4);
  warp_sync();
  return x;
}

inline void watch_before() {
  for (auto& w : g_watched) w.before.assign(w.p, w.p + w.n);
}
inline void watch_after(int64_t block, const Idx& b) {
  for (auto& w : g_watched) {
    for (size_t i = 0; i < w.n; ++i) {
      if (w.p[i] == w.before[i]) continue;
      if (w.owner[i] >= 0 && w.owner[i] != block) {
        const Idx d = g_grid_dim;
        const int64_t o = w.owner[i];
        char msg[512];
        std::snprintf(msg, sizeof msg,
                      "global race in launch %llu: blocks (%lld,%lld,%lld) and (%u,%u,%u) both wrote byte %zu of %s",
                      (unsigned long long)g_launch_serial, (long long)(o % d.x), (long long)(o / d.x % d.y),
                      (long long)(o / (int64_t(d.x) * d.y)), b.x, b.y, b.z, i, w.name.c_str());
        finding(msg);
      }
      w.owner[i] = block;
    }
  }
}

template <class... KArgs, class... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  const int nthreads = int(block.x * block.y * block.z);
  const int nwarps = (nthreads + 31) / 32;
  g_block_dim = {block.x, block.y, block.z};
  g_grid_dim = {grid.x, grid.y, grid.z};
  g_last_smem = smem;
  ++g_launch_serial;
  if (nthreads % 32 != 0 || nthreads > 1024) return g_last_error = cudaErrorInvalidValue;
  if (g_smem_buffer && smem > g_smem_buffer_size) return g_last_error = cudaErrorInvalidValue;
  for (auto& w : g_watched) w.owner.assign(w.n, -1);
  const int64_t nblocks = int64_t(grid.x) * grid.y * grid.z;
  for (int64_t s = 0; s < nblocks; ++s) {
    const int64_t lin = g_block_rev ? nblocks - 1 - s : s;
    const unsigned bx = unsigned(lin % grid.x), by = unsigned(lin / grid.x % grid.y),
                   bz = unsigned(lin / (int64_t(grid.x) * grid.y));
    Block blk;
    const uint64_t serial = ++g_block_serial;
    blk.bar = std::make_unique<std::barrier<>>(nthreads);
    for (int w = 0; w < nwarps; ++w) blk.warp_bar.push_back(std::make_unique<std::barrier<>>(32));
    blk.xch.resize(nwarps);
    if (g_smem_buffer) {
      // the harness's buffer stands for the kernels' `extern __shared__` array: only the launch's
      // size is addressable
      EMU_UNPOISON(g_smem_buffer, g_smem_buffer_size);
      std::memset(g_smem_buffer, 0xCD, g_smem_buffer_size);
      EMU_POISON(g_smem_buffer + smem, g_smem_buffer_size - smem);
      blk.smem_aligned = g_smem_buffer;
    } else {
      blk.smem.reset(static_cast<char*>(::operator new[](std::max<size_t>(smem, 1), std::align_val_t(128))));
      std::memset(blk.smem.get(), 0xCD, smem);
      blk.smem_aligned = blk.smem.get();
    }
    if (g_schedule != Schedule::kFree) {
      blk.serial = true;
      blk.cv = std::make_unique<std::condition_variable[]>(nwarps);
      blk.parked.assign(nwarps, 0);
      blk.exited.assign(nwarps, 0);
      for (int w = 0; w < nwarps; ++w) blk.order.push_back(g_schedule == Schedule::kWarps ? w : nwarps - 1 - w);
    }
    watch_before();
    std::vector<std::thread> threads;
    threads.reserve(nthreads);
    for (int t = 0; t < nthreads; ++t) {
      threads.emplace_back([&, t] {
        t_linear = t;
        t_thread = {unsigned(t) % block.x, (unsigned(t) / block.x) % block.y, unsigned(t) / (block.x * block.y)};
        t_block = {bx, by, bz};
        t_blk = &blk;
        t_block_serial = serial;
        t_sync_epoch = 0;
        if (blk.serial) blk.start(t >> 5);
        kernel(args...);
        if (blk.serial) blk.finish(t >> 5);
      });
    }
    for (auto& th : threads) th.join();
    watch_after(lin, Idx{bx, by, bz});
  }
  if (g_smem_buffer) EMU_UNPOISON(g_smem_buffer, g_smem_buffer_size);
  return cudaSuccess;
}

}  // namespace emu

#define threadIdx (::emu::t_thread)
#define blockIdx (::emu::t_block)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
inline void __syncthreads() {
  ++emu::t_sync_epoch;
  if (emu::t_blk->serial)
    emu::t_blk->barrier(emu::warp());
  else
    emu::t_blk->bar->arrive_and_wait();
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
inline float __expf(float x) { return std::exp(x); }
inline float exp2f(float x) { return std::exp2(x); }
inline float log2f(float x) { return std::log2(x); }
inline float ceilf(float x) { return std::ceil(x); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float fabsf(float x) { return std::fabs(x); }
using std::exp;
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) { return emu::shfl_xor(v, lane_mask); }
// Blocks run one at a time, so atomics only race between the threads of one block.
inline float atomicAdd(float* addr, float v) { return std::atomic_ref<float>(*addr).fetch_add(v); }
