// CPU implementation of the flash-attention core (see flash_params.h for the semantics).
//
// Work split
// - Forward: one task per (batch * segment, output head, block of kBlockM query rows). Each task
//   streams key blocks of kBlockN columns with an online softmax; the only score storage is one
//   kBlockM x kBlockN tile.
// - Backward, deterministic by ownership (no two tasks write the same element):
//     pass 0: delta = rowsum(dout * o) per (batch, output head, row), kept in an internal buffer;
//     pass 1: dq, one task per (batch * segment, query head, query block), summing over the output
//             heads of that query head in a fixed order;
//     pass 2: dk, dv (and dbias), one task per (batch * segment, KV head, key block), summing over
//             the output heads of that KV head and over query blocks in a fixed order.
//   P is recomputed from the saved lse (lse = -inf: the row is fully masked, P = 0).
//
// Index conventions not spelled out in flash_params.h, chosen to match the CUDA kernels:
// - without gather indices, positions are the row numbers inside the segment (i and j);
// - the bias, row_thr / row_tie and dbias are addressed in segment space: row s * seqlen_q + i,
//   column s * seqlen_k + j (the tie column compares against s * seqlen_k + j as well);
// - dq is written in segment space like the other outputs: row s * seqlen_q + i of query head hq.
//
// Inner loops: the tile kernels below run over a fixed kBlockN-wide row of scores, or over the
// contiguous head dim in fixed 32-wide chunks, so the accumulators stay in vector registers; the
// float versions have an AVX2 + FMA variant picked at run time (the extension itself is built for
// baseline x86-64). exp in float is a polynomial (relative error ~2e-7), vectorisable, unlike
// std::exp.
#include "flash/flash_cpu.h"
#include "flash/flash_validate.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

namespace attnkit::flash {
namespace {

constexpr int kBlockM = 64;  // query rows per task
constexpr int kBlockN = 64;  // key columns per tile

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// x86-64 with GCC or clang: the float tile kernels get an AVX2 + FMA version (explicit 8-wide
// vectors), chosen at run time; elsewhere, and on CPUs without AVX2, plain loops that the compiler
// auto-vectorises for the baseline ISA.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define ATTNKIT_CPU_AVX2 1
#define ATTNKIT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define ATTNKIT_CPU_AVX2 0
#endif

// exp(x) for float: 2^n * e^f with n = round(x / ln 2), f = x - n ln 2 (two-part ln 2), e^f by its
// degree-7 Taylor polynomial (|f| <= 0.35: truncation ~6e-9). x < -87 (including -inf) gives 0.
inline float exp_poly(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float f = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float e = 1.0f / 5040.0f;
  e = e * f + 1.0f / 720.0f;
  e = e * f + 1.0f / 120.0f;
  e = e * f + 1.0f / 24.0f;
  e = e * f + 1.0f / 6.0f;
  e = e * f + 0.5f;
  e = e * f + 1.0f;
  e = e * f + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : e * scale;
}
inline double exp_any(double x) {
  return std::exp(x);
}
inline float exp_any(float x) {
  return exp_poly(x);
}

// S[r][0, kBlockN) = Q[r] . Kt[:, c] for r < m (all kBlockN columns; the caller reads the first n).
template <typename A>
inline void tile_scores_impl(A* __restrict S, const A* __restrict Q, int m, int D, const A* __restrict Kt) {
  for (int r = 0; r < m; ++r) {
    A acc[kBlockN] = {};
    const A* qr = Q + int64_t(r) * D;
    for (int x = 0; x < D; ++x) {
      const A a = qr[x];
      const A* kt = Kt + int64_t(x) * kBlockN;
      for (int c = 0; c < kBlockN; ++c) acc[c] += a * kt[c];
    }
    A* srow = S + int64_t(r) * kBlockN;
    for (int c = 0; c < kBlockN; ++c) srow[c] = acc[c];
  }
}

// C[i][0, D) += sum_{k < nk} W[i * wi + k * wk] * B[k][0, D)  for i < ni (row strides ldc, ldb).
// With (wi, wk) = (kBlockN, 1) this is C += W B; with (1, kBlockN) it is C += W^T B.
template <typename A>
inline void tile_acc_impl(A* __restrict C, int64_t ldc, const A* __restrict W, int64_t wi, int64_t wk, int ni, int nk,
                          const A* __restrict B, int64_t ldb, int D) {
  constexpr int kW = 32;
  for (int i = 0; i < ni; ++i) {
    A* crow = C + i * ldc;
    const A* wrow = W + i * wi;
    int x0 = 0;
    for (; x0 + kW <= D; x0 += kW) {
      A acc[kW];
      for (int x = 0; x < kW; ++x) acc[x] = crow[x0 + x];
      for (int k = 0; k < nk; ++k) {
        const A a = wrow[k * wk];
        if (a == A(0)) continue;
        const A* b = B + k * ldb + x0;
        for (int x = 0; x < kW; ++x) acc[x] += a * b[x];
      }
      for (int x = 0; x < kW; ++x) crow[x0 + x] = acc[x];
    }
    if (x0 < D) {
      for (int k = 0; k < nk; ++k) {
        const A a = wrow[k * wk];
        if (a == A(0)) continue;
        const A* b = B + k * ldb;
        for (int x = x0; x < D; ++x) crow[x] += a * b[x];
      }
    }
  }
}

// s[c] = exp(s[c] - shift) in place for c < n (-inf entries give 0); returns the sum.
template <typename A>
inline A exp_row_impl(A* __restrict s, int n, A shift) {
  for (int c = 0; c < n; ++c) s[c] = exp_any(s[c] - shift);
  A sum = A(0);
  for (int c = 0; c < n; ++c) sum += s[c];
  return sum;
}

// Double versions: plain loops (used by the fp64 path, which is for testing).
void tile_scores(double* S, const double* Q, int m, int D, const double* Kt) {
  tile_scores_impl(S, Q, m, D, Kt);
}
void tile_acc(double* C, int64_t ldc, const double* W, int64_t wi, int64_t wk, int ni, int nk, const double* B,
              int64_t ldb, int D) {
  tile_acc_impl(C, ldc, W, wi, wk, ni, nk, B, ldb, D);
}
double exp_row(double* s, int n, double shift) {
  return exp_row_impl(s, n, shift);
}

#if ATTNKIT_CPU_AVX2
// Float kernels for AVX2 + FMA with explicit 8-wide vectors (GCC / clang vector extensions), so the
// accumulators stay in registers: 8 vectors hold one 64-wide score row, 4 vectors a 32-wide chunk
// of the head dim.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vf8 only passes between inlined helpers of this file
#endif
typedef float vf8 __attribute__((vector_size(32)));
inline vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, vf8 v) {
  std::memcpy(p, &v, sizeof(v));
}
static_assert(kBlockN % 8 == 0, "tile kernels assume kBlockN is a multiple of 8");

ATTNKIT_TARGET_AVX2 void tile_scores_avx2(float* S, const float* Q, int m, int D, const float* Kt) {
  constexpr int kV = kBlockN / 8;
  for (int r = 0; r < m; ++r) {
    vf8 acc[kV];
    for (int u = 0; u < kV; ++u) acc[u] = vf8{};
    const float* qr = Q + int64_t(r) * D;
    for (int x = 0; x < D; ++x) {
      const vf8 a = vf8{} + qr[x];
      const float* kt = Kt + int64_t(x) * kBlockN;
      for (int u = 0; u < kV; ++u) acc[u] += a * load8(kt + 8 * u);
    }
    float* srow = S + int64_t(r) * kBlockN;
    for (int u = 0; u < kV; ++u) store8(srow + 8 * u, acc[u]);
  }
}

ATTNKIT_TARGET_AVX2 void tile_acc_avx2(float* C, int64_t ldc, const float* W, int64_t wi, int64_t wk, int ni,
                                       int nk, const float* B, int64_t ldb, int D) {
  for (int i = 0; i < ni; ++i) {
    float* crow = C + i * ldc;
    const float* wrow = W + i * wi;
    int x0 = 0;
    for (; x0 + 32 <= D; x0 += 32) {
      vf8 c0 = load8(crow + x0), c1 = load8(crow + x0 + 8), c2 = load8(crow + x0 + 16), c3 = load8(crow + x0 + 24);
      for (int k = 0; k < nk; ++k) {
        const float a = wrow[k * wk];
        if (a == 0.f) continue;
        const vf8 av = vf8{} + a;
        const float* b = B + k * ldb + x0;
        c0 += av * load8(b);
        c1 += av * load8(b + 8);
        c2 += av * load8(b + 16);
        c3 += av * load8(b + 24);
      }
      store8(crow + x0, c0);
      store8(crow + x0 + 8, c1);
      store8(crow + x0 + 16, c2);
      store8(crow + x0 + 24, c3);
    }
    if (x0 < D) {
      for (int k = 0; k < nk; ++k) {
        const float a = wrow[k * wk];
        if (a == 0.f) continue;
        const float* b = B + k * ldb;
        for (int x = x0; x < D; ++x) crow[x] += a * b[x];
      }
    }
  }
}

ATTNKIT_TARGET_AVX2 float exp_row_avx2(float* s, int n, float shift) {
  return exp_row_impl(s, n, shift);
}

// ATTNKIT_CPU_NO_AVX2=1 forces the plain loops (lets the tests cover that path on any machine).
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("ATTNKIT_CPU_NO_AVX2") == nullptr;
  return has;
}
#endif  // ATTNKIT_CPU_AVX2

void tile_scores(float* S, const float* Q, int m, int D, const float* Kt) {
#if ATTNKIT_CPU_AVX2
  if (cpu_has_avx2()) return tile_scores_avx2(S, Q, m, D, Kt);
#endif
  tile_scores_impl(S, Q, m, D, Kt);
}
void tile_acc(float* C, int64_t ldc, const float* W, int64_t wi, int64_t wk, int ni, int nk, const float* B,
              int64_t ldb, int D) {
#if ATTNKIT_CPU_AVX2
  if (cpu_has_avx2()) return tile_acc_avx2(C, ldc, W, wi, wk, ni, nk, B, ldb, D);
#endif
  tile_acc_impl(C, ldc, W, wi, wk, ni, nk, B, ldb, D);
}
float exp_row(float* s, int n, float shift) {
#if ATTNKIT_CPU_AVX2
  if (cpu_has_avx2()) return exp_row_avx2(s, n, shift);
#endif
  return exp_row_impl(s, n, shift);
}

// Everything one (batch, segment, output head) needs, with the base pointers resolved.
template <typename T>
struct HeadCtx {
  const FlashParams* p;
  int b, s, h, hq, hkv;
  int64_t row0, col0;  // segment-space offsets: s * seqlen_q, s * seqlen_k
  int64_t shift;       // bottom-right alignment of the causal / window masks
  const T* q;          // batch and query head applied
  const T* k;
  const T* v;
  const int* qidx;  // this (b, h, s) slice of q_index, or null
  const int* kidx;
  const float* bias;  // batch and bias head applied, or null
  const float* thr;   // batch and KV head applied, or null
  const int* tie;

  HeadCtx(const FlashParams& params, int b_, int s_, int h_) : p(&params), b(b_), s(s_), h(h_) {
    hq = h / params.q_group;
    hkv = h / params.kv_group;
    row0 = int64_t(s) * params.seqlen_q;
    col0 = int64_t(s) * params.seqlen_k;
    const bool indexed = params.q_index != nullptr || params.k_index != nullptr;
    shift = indexed ? 0 : int64_t(params.seqlen_k) - params.seqlen_q;
    q = static_cast<const T*>(params.q) + b * params.q_batch_stride + hq * params.q_head_stride;
    k = static_cast<const T*>(params.k) + b * params.k_batch_stride + hkv * params.k_head_stride;
    v = static_cast<const T*>(params.v) + b * params.v_batch_stride + hkv * params.v_head_stride;
    qidx = params.q_index ? params.q_index + b * params.q_index_batch_stride + h * params.q_index_head_stride + row0
                          : nullptr;
    kidx = params.k_index ? params.k_index + b * params.k_index_batch_stride + h * params.k_index_head_stride + col0
                          : nullptr;
    bias = params.bias ? params.bias + b * params.bias_batch_stride +
                             int64_t(h / params.bias_head_group) * params.bias_head_stride
                       : nullptr;
    thr = params.row_thr ? params.row_thr + b * params.thr_batch_stride + hkv * params.thr_head_stride : nullptr;
    tie = params.row_tie ? params.row_tie + b * params.thr_batch_stride + hkv * params.thr_head_stride : nullptr;
  }

  int64_t qrow(int64_t i) const { return qidx ? int64_t(qidx[i]) : row0 + i; }
  int64_t krow(int64_t j) const { return kidx ? int64_t(kidx[j]) : col0 + j; }
  int64_t qpos(int64_t i) const { return qidx ? int64_t(qidx[i]) : i; }
  int64_t kpos(int64_t j) const { return kidx ? int64_t(kidx[j]) : j; }

  // Keys [lo, hi) that rows [i0, i1) may see; a superset, refined per element by visible().
  void key_range(int64_t i0, int64_t i1, int64_t& lo, int64_t& hi) const {
    lo = 0;
    hi = p->seqlen_k;
    if (qidx || kidx) return;
    if (p->causal) hi = std::min<int64_t>(hi, i1 - 1 + shift + 1);
    if (p->window_left >= 0) lo = std::max<int64_t>(lo, i0 + shift - p->window_left);
  }
  // Query rows [lo, hi) that may see some key of [j0, j1).
  void query_range(int64_t j0, int64_t j1, int64_t& lo, int64_t& hi) const {
    lo = 0;
    hi = p->seqlen_q;
    if (qidx || kidx) return;
    if (p->causal) lo = std::max<int64_t>(lo, j0 - shift);
    if (p->window_left >= 0) hi = std::min<int64_t>(hi, j1 - 1 - shift + p->window_left + 1);
  }
};

// Loads rows [.., m) of one head into dst[m][D] (acc type); row_of(r) gives the source row.
template <typename T, typename A, typename RowFn>
inline void load_rows(A* dst, const T* base, int64_t row_stride, int m, int D, RowFn row_of) {
  for (int r = 0; r < m; ++r) {
    const T* src = base + row_of(r) * row_stride;
    A* d = dst + int64_t(r) * D;
    for (int x = 0; x < D; ++x) d[x] = static_cast<A>(src[x]);
  }
}

// Loads rows transposed: dst[D][kBlockN], column r holds source row row_of(r).
template <typename T, typename A, typename RowFn>
inline void load_rows_t(A* dst, const T* base, int64_t row_stride, int n, int D, RowFn row_of) {
  for (int c = 0; c < n; ++c) {
    const T* src = base + row_of(c) * row_stride;
    for (int x = 0; x < D; ++x) dst[int64_t(x) * kBlockN + c] = static_cast<A>(src[x]);
  }
}

// Turns the raw products S[r][c] = q_i . k_j (from tile_scores) of query rows [i0, i0 + m) and
// keys [j0, j0 + n) into scores: scale, bias, masks (-inf where the key is not visible), self
// score. When nograd is given, nograd[r][c] = 1 marks scores replaced by self_score (their gradient
// reaches neither q, k nor the bias). Tiles that no mask touches take a vectorisable path.
template <typename T, typename A>
void finish_scores(const HeadCtx<T>& ctx, int64_t i0, int m, int64_t j0, int n, A* S, uint8_t* nograd) {
  const FlashParams& p = *ctx.p;
  const A scale = static_cast<A>(p.scale);
  const A neg_inf = -std::numeric_limits<A>::infinity();
  const bool indexed = ctx.qidx || ctx.kidx;
  const bool check_causal = p.causal;
  const bool check_window = p.window_left >= 0;
  // Without gathers, positions are i and j: the tile needs no causal check when its last key is
  // visible to its first row, and no window check when its first key is visible to its last row.
  const bool clean = !indexed && !ctx.thr && !p.self_mask &&
                     (!check_causal || j0 + n - 1 <= i0 + ctx.shift) &&
                     (!check_window || j0 >= i0 + m - 1 + ctx.shift - p.window_left);
  if (clean) {
    for (int r = 0; r < m; ++r) {
      A* srow = S + int64_t(r) * kBlockN;
      if (ctx.bias) {
        const float* brow = ctx.bias + (ctx.row0 + i0 + r) * p.bias_row_stride + ctx.col0 + j0;
        for (int c = 0; c < n; ++c) srow[c] = srow[c] * scale + static_cast<A>(brow[c]);
      } else {
        for (int c = 0; c < n; ++c) srow[c] *= scale;
      }
      if (nograd) std::fill(nograd + int64_t(r) * kBlockN, nograd + int64_t(r) * kBlockN + n, uint8_t(0));
    }
    return;
  }
  for (int r = 0; r < m; ++r) {
    A* srow = S + int64_t(r) * kBlockN;
    const int64_t i = i0 + r;
    const int64_t pi = ctx.qpos(i);
    const float* brow = ctx.bias ? ctx.bias + (ctx.row0 + i) * p.bias_row_stride + ctx.col0 : nullptr;
    const float thr = ctx.thr ? ctx.thr[ctx.row0 + i] : 0.f;
    const int64_t tie = ctx.tie ? int64_t(ctx.tie[ctx.row0 + i]) : 0;
    uint8_t* ng = nograd ? nograd + int64_t(r) * kBlockN : nullptr;
    for (int c = 0; c < n; ++c) {
      const int64_t j = j0 + c;
      const int64_t pj = ctx.kpos(j);
      bool vis = true;
      if (check_causal && pj > pi + ctx.shift) vis = false;
      if (check_window && pj < pi + ctx.shift - p.window_left) vis = false;
      const float bval = brow ? brow[j] : 0.f;
      if (ctx.thr && !(bval > thr || (bval == thr && ctx.col0 + j <= tie))) vis = false;
      bool self = false;
      if (!vis) {
        srow[c] = neg_inf;
      } else if (p.self_mask && pi == pj) {
        srow[c] = static_cast<A>(p.self_score);
        self = true;
      } else {
        srow[c] = srow[c] * scale + static_cast<A>(bval);
      }
      if (ng) ng[c] = self ? 1 : 0;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------
template <typename T>
void fwd_impl(const FlashParams& p) {
  using A = typename AccType<T>::type;
  const int D = p.head_dim;
  const int64_t BS = int64_t(p.batch) * p.num_segments;
  const int64_t nblk = ceil_div(p.seqlen_q, kBlockM);
  const int64_t ntask = BS * p.h_out * nblk;
  if (ntask == 0) return;
  const A neg_inf = -std::numeric_limits<A>::infinity();

  at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
    // Zero-initialised once: columns past n of a partial tile then hold finite stale values.
    std::vector<A> Q(int64_t(kBlockM) * D), O(int64_t(kBlockM) * D), Kt(int64_t(D) * kBlockN),
        V(int64_t(kBlockN) * D), S(int64_t(kBlockM) * kBlockN), mx(kBlockM), l(kBlockM);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % nblk;
      const int h = int((t / nblk) % p.h_out);
      const int64_t bs = t / (nblk * p.h_out);
      const HeadCtx<T> ctx(p, int(bs / p.num_segments), int(bs % p.num_segments), h);
      const int64_t i0 = blk * kBlockM;
      const int m = int(std::min<int64_t>(kBlockM, p.seqlen_q - i0));

      load_rows(Q.data(), ctx.q, p.q_row_stride, m, D, [&](int r) { return ctx.qrow(i0 + r); });
      std::fill(O.begin(), O.end(), A(0));
      std::fill(mx.begin(), mx.end(), neg_inf);
      std::fill(l.begin(), l.end(), A(0));

      int64_t jlo, jhi;
      ctx.key_range(i0, i0 + m, jlo, jhi);
      for (int64_t j0 = jlo - (jlo % kBlockN); j0 < jhi; j0 += kBlockN) {
        const int n = int(std::min<int64_t>(kBlockN, p.seqlen_k - j0));
        load_rows_t(Kt.data(), ctx.k, p.k_row_stride, n, D, [&](int c) { return ctx.krow(j0 + c); });
        load_rows(V.data(), ctx.v, p.v_row_stride, n, D, [&](int c) { return ctx.krow(j0 + c); });
        tile_scores(S.data(), Q.data(), m, D, Kt.data());
        finish_scores(ctx, i0, m, j0, n, S.data(), static_cast<uint8_t*>(nullptr));
        for (int r = 0; r < m; ++r) {
          A* srow = S.data() + int64_t(r) * kBlockN;
          A bmax = neg_inf;
          for (int c = 0; c < n; ++c) bmax = std::max(bmax, srow[c]);
          const A mnew = std::max(mx[r], bmax);
          if (mnew == neg_inf) {  // nothing visible yet: this row contributes nothing
            std::fill(srow, srow + n, A(0));
            continue;
          }
          if (mnew != mx[r]) {
            const A corr = std::exp(mx[r] - mnew);  // 0 when mx was -inf
            l[r] *= corr;
            A* orow = O.data() + int64_t(r) * D;
            for (int x = 0; x < D; ++x) orow[x] *= corr;
            mx[r] = mnew;
          }
          l[r] += exp_row(srow, n, mnew);  // S row now holds the unnormalised probabilities
        }
        tile_acc(O.data(), D, S.data(), kBlockN, 1, m, n, V.data(), D, D);  // O += P V
      }

      T* obase = static_cast<T*>(p.o) + ctx.b * p.o_batch_stride + int64_t(h) * p.o_head_stride;
      float* lbase = p.lse + ctx.b * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + ctx.row0;
      for (int r = 0; r < m; ++r) {
        T* orow = obase + (ctx.row0 + i0 + r) * p.o_row_stride;
        if (!(l[r] > A(0))) {
          for (int x = 0; x < D; ++x) orow[x] = static_cast<T>(0);
          lbase[i0 + r] = -std::numeric_limits<float>::infinity();
        } else {
          const A inv = A(1) / l[r];
          const A* acc = O.data() + int64_t(r) * D;
          for (int x = 0; x < D; ++x) orow[x] = static_cast<T>(acc[x] * inv);
          lbase[i0 + r] = static_cast<float>(mx[r] + std::log(l[r]));
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// One (query block, key tile) step shared by both backward passes. On return S holds
// P = exp(score - lse) (0 where masked or where lse = -inf) and dS = P * (dO . V - delta), with
// dS = 0 on self-scored entries (their score is a constant). dP is scratch of kBlockM x kBlockN.
template <typename T, typename A>
void bwd_tile(const HeadCtx<T>& ctx, int64_t i0, int m, int64_t j0, int n, const A* Q, const A* dO, const A* lse,
              const A* delta, const A* Kt, const A* Vt, A* S, A* dP, A* dS, uint8_t* nograd) {
  const int D = ctx.p->head_dim;
  const A neg_inf = -std::numeric_limits<A>::infinity();
  const bool self_mask = ctx.p->self_mask;
  tile_scores(S, Q, m, D, Kt);
  finish_scores(ctx, i0, m, j0, n, S, self_mask ? nograd : nullptr);
  tile_scores(dP, dO, m, D, Vt);
  for (int r = 0; r < m; ++r) {
    A* srow = S + int64_t(r) * kBlockN;
    A* dsrow = dS + int64_t(r) * kBlockN;
    if (lse[r] == neg_inf) {
      std::fill(srow, srow + n, A(0));
      std::fill(dsrow, dsrow + n, A(0));
      continue;
    }
    exp_row(srow, n, lse[r]);
    const A* dprow = dP + int64_t(r) * kBlockN;
    const A dl = delta[r];
    for (int c = 0; c < n; ++c) dsrow[c] = srow[c] * (dprow[c] - dl);
    if (self_mask) {
      const uint8_t* ng = nograd + int64_t(r) * kBlockN;
      for (int c = 0; c < n; ++c)
        if (ng[c]) dsrow[c] = A(0);
    }
  }
}

template <typename T>
void bwd_impl(const FlashParams& p) {
  using A = typename AccType<T>::type;
  const int D = p.head_dim;
  const int64_t BS = int64_t(p.batch) * p.num_segments;
  const int64_t rows_q = int64_t(p.num_segments) * p.seqlen_q;  // segment-space rows per batch
  const A scale = static_cast<A>(p.scale);
  if (p.dbias) {
    TORCH_CHECK(p.bias != nullptr, "flash_bwd_cpu: dbias needs bias");
    TORCH_CHECK(p.bias_head_group >= 1 && p.kv_group % p.bias_head_group == 0,
                "flash_bwd_cpu: the output heads of a bias head must lie in one KV head's group "
                "(bias_head_group must divide kv_group)");
  }

  // ---- pass 0: delta[b][h][row] = dout . o ----
  std::vector<A> delta(size_t(p.batch) * p.h_out * rows_q);
  {
    const int64_t nrow_tasks = int64_t(p.batch) * p.h_out;
    at::parallel_for(0, nrow_tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / p.h_out;
        const int64_t h = t % p.h_out;
        const T* ob = static_cast<const T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
        const T* db = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
        A* out = delta.data() + t * rows_q;
        for (int64_t i = 0; i < rows_q; ++i) {
          const T* orow = ob + i * p.o_row_stride;
          const T* drow = db + i * p.do_row_stride;
          A acc = A(0);
          for (int x = 0; x < D; ++x) acc += static_cast<A>(orow[x]) * static_cast<A>(drow[x]);
          out[i] = acc;
        }
      }
    });
  }

  // Loads Q, dO, lse and delta of query rows [i0, i0 + m) for output head ctx.h.
  auto load_query_side = [&](const HeadCtx<T>& ctx, int64_t i0, int m, A* Q, A* dO, A* lse, A* dl) {
    load_rows(Q, ctx.q, p.q_row_stride, m, D, [&](int r) { return ctx.qrow(i0 + r); });
    const T* db = static_cast<const T*>(p.dout) + ctx.b * p.do_batch_stride + int64_t(ctx.h) * p.do_head_stride;
    load_rows(dO, db, p.do_row_stride, m, D, [&](int r) { return ctx.row0 + i0 + r; });
    const float* lb = p.lse + ctx.b * p.lse_batch_stride + int64_t(ctx.h) * p.lse_head_stride + ctx.row0 + i0;
    const A* dlb = delta.data() + (int64_t(ctx.b) * p.h_out + ctx.h) * rows_q + ctx.row0 + i0;
    for (int r = 0; r < m; ++r) {
      lse[r] = static_cast<A>(lb[r]);
      dl[r] = dlb[r];
    }
  };

  // ---- pass 1: dq ----
  {
    const int64_t nblk = ceil_div(p.seqlen_q, kBlockM);
    const int64_t ntask = BS * p.h_q * nblk;
    at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> Q(int64_t(kBlockM) * D), dO(int64_t(kBlockM) * D), dQ(int64_t(kBlockM) * D),
          Kt(int64_t(D) * kBlockN), K(int64_t(kBlockN) * D), Vt(int64_t(D) * kBlockN), S(int64_t(kBlockM) * kBlockN),
          dP(int64_t(kBlockM) * kBlockN), dS(int64_t(kBlockM) * kBlockN), lse(kBlockM), dl(kBlockM);
      std::vector<uint8_t> ng(int64_t(kBlockM) * kBlockN);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t blk = t % nblk;
        const int hq = int((t / nblk) % p.h_q);
        const int64_t bs = t / (nblk * p.h_q);
        const int b = int(bs / p.num_segments), s = int(bs % p.num_segments);
        const int64_t i0 = blk * kBlockM;
        const int m = int(std::min<int64_t>(kBlockM, p.seqlen_q - i0));
        std::fill(dQ.begin(), dQ.end(), A(0));
        for (int g = 0; g < p.q_group; ++g) {
          const HeadCtx<T> ctx(p, b, s, hq * p.q_group + g);
          load_query_side(ctx, i0, m, Q.data(), dO.data(), lse.data(), dl.data());
          int64_t jlo, jhi;
          ctx.key_range(i0, i0 + m, jlo, jhi);
          for (int64_t j0 = jlo - (jlo % kBlockN); j0 < jhi; j0 += kBlockN) {
            const int n = int(std::min<int64_t>(kBlockN, p.seqlen_k - j0));
            auto kr = [&](int c) { return ctx.krow(j0 + c); };
            load_rows_t(Kt.data(), ctx.k, p.k_row_stride, n, D, kr);
            load_rows(K.data(), ctx.k, p.k_row_stride, n, D, kr);
            load_rows_t(Vt.data(), ctx.v, p.v_row_stride, n, D, kr);
            bwd_tile(ctx, i0, m, j0, n, Q.data(), dO.data(), lse.data(), dl.data(), Kt.data(), Vt.data(), S.data(),
                     dP.data(), dS.data(), ng.data());
            tile_acc(dQ.data(), D, dS.data(), kBlockN, 1, m, n, K.data(), D, D);  // dQ += dS K
          }
        }
        T* dqb = static_cast<T*>(p.dq) + int64_t(b) * p.dq_batch_stride + int64_t(hq) * p.dq_head_stride;
        const int64_t row0 = int64_t(s) * p.seqlen_q;
        for (int r = 0; r < m; ++r) {
          T* dst = dqb + (row0 + i0 + r) * p.dq_row_stride;
          const A* src = dQ.data() + int64_t(r) * D;
          for (int x = 0; x < D; ++x) dst[x] = static_cast<T>(src[x] * scale);
        }
      }
    });
  }

  // ---- pass 2: dk, dv, dbias ----
  {
    const int64_t nblk = ceil_div(p.seqlen_k, kBlockN);
    const int64_t ntask = BS * p.h_kv * nblk;
    const bool bias_rowwise = p.bias && p.bias_row_stride != 0;
    const int bhg = p.bias ? p.bias_head_group : 1;
    const int nbh = p.dbias ? p.kv_group / bhg : 0;  // bias heads inside one KV head's group
    at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> Q(int64_t(kBlockM) * D), dO(int64_t(kBlockM) * D), Kt(int64_t(D) * kBlockN),
          Vt(int64_t(D) * kBlockN), dK(int64_t(kBlockN) * D), dV(int64_t(kBlockN) * D), S(int64_t(kBlockM) * kBlockN),
          dP(int64_t(kBlockM) * kBlockN), dS(int64_t(kBlockM) * kBlockN), lse(kBlockM), dl(kBlockM),
          colsum(int64_t(std::max(nbh, 1)) * kBlockN);
      std::vector<uint8_t> ng(int64_t(kBlockM) * kBlockN);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t blk = t % nblk;
        const int g = int((t / nblk) % p.h_kv);
        const int64_t bs = t / (nblk * p.h_kv);
        const int b = int(bs / p.num_segments), s = int(bs % p.num_segments);
        const int64_t j0 = blk * kBlockN;
        const int n = int(std::min<int64_t>(kBlockN, p.seqlen_k - j0));
        const int64_t row0 = int64_t(s) * p.seqlen_q, col0 = int64_t(s) * p.seqlen_k;
        std::fill(dK.begin(), dK.end(), A(0));
        std::fill(dV.begin(), dV.end(), A(0));
        std::fill(colsum.begin(), colsum.end(), A(0));
        float* dbb = p.dbias ? p.dbias + int64_t(b) * p.dbias_batch_stride : nullptr;
        if (dbb && bias_rowwise) {  // this task owns rows [row0, row0 + seqlen_q) x cols of the block
          for (int u = 0; u < nbh; ++u) {
            float* base = dbb + int64_t(g * nbh + u) * p.dbias_head_stride + col0 + j0;
            for (int64_t i = 0; i < p.seqlen_q; ++i)
              std::fill(base + (row0 + i) * p.dbias_row_stride, base + (row0 + i) * p.dbias_row_stride + n, 0.f);
          }
        }
        for (int gg = 0; gg < p.kv_group; ++gg) {
          const int h = g * p.kv_group + gg;
          const HeadCtx<T> ctx(p, b, s, h);
          auto kr = [&](int c) { return ctx.krow(j0 + c); };
          load_rows_t(Kt.data(), ctx.k, p.k_row_stride, n, D, kr);
          load_rows_t(Vt.data(), ctx.v, p.v_row_stride, n, D, kr);
          const int u = dbb ? (h / bhg) - g * nbh : 0;
          int64_t ilo, ihi;
          ctx.query_range(j0, j0 + n, ilo, ihi);
          for (int64_t i0 = ilo - (ilo % kBlockM); i0 < ihi; i0 += kBlockM) {
            const int m = int(std::min<int64_t>(kBlockM, p.seqlen_q - i0));
            load_query_side(ctx, i0, m, Q.data(), dO.data(), lse.data(), dl.data());
            bwd_tile(ctx, i0, m, j0, n, Q.data(), dO.data(), lse.data(), dl.data(), Kt.data(), Vt.data(), S.data(),
                     dP.data(), dS.data(), ng.data());
            tile_acc(dV.data(), D, S.data(), 1, kBlockN, n, m, dO.data(), D, D);  // dV += P^T dO
            tile_acc(dK.data(), D, dS.data(), 1, kBlockN, n, m, Q.data(), D, D);  // dK += dS^T Q
            if (dbb) {
              if (bias_rowwise) {
                float* base = dbb + int64_t(h / bhg) * p.dbias_head_stride + col0 + j0;
                for (int r = 0; r < m; ++r) {
                  float* dst = base + (row0 + i0 + r) * p.dbias_row_stride;
                  const A* dsr = dS.data() + int64_t(r) * kBlockN;
                  for (int c = 0; c < n; ++c) dst[c] += static_cast<float>(dsr[c]);
                }
              } else {
                A* cs = colsum.data() + int64_t(u) * kBlockN;
                for (int r = 0; r < m; ++r) {
                  const A* dsr = dS.data() + int64_t(r) * kBlockN;
                  for (int c = 0; c < n; ++c) cs[c] += dsr[c];
                }
              }
            }
          }
        }
        T* dkb = static_cast<T*>(p.dk) + int64_t(b) * p.dk_batch_stride + int64_t(g) * p.dk_head_stride;
        T* dvb = static_cast<T*>(p.dv) + int64_t(b) * p.dv_batch_stride + int64_t(g) * p.dv_head_stride;
        for (int c = 0; c < n; ++c) {
          T* dk_dst = dkb + (col0 + j0 + c) * p.dk_row_stride;
          T* dv_dst = dvb + (col0 + j0 + c) * p.dv_row_stride;
          const A* dks = dK.data() + int64_t(c) * D;
          const A* dvs = dV.data() + int64_t(c) * D;
          for (int x = 0; x < D; ++x) {
            dk_dst[x] = static_cast<T>(dks[x] * scale);
            dv_dst[x] = static_cast<T>(dvs[x]);
          }
        }
        if (dbb && !bias_rowwise) {
          for (int u = 0; u < nbh; ++u) {
            float* dst = dbb + int64_t(g * nbh + u) * p.dbias_head_stride + col0 + j0;
            const A* cs = colsum.data() + int64_t(u) * kBlockN;
            for (int c = 0; c < n; ++c) dst[c] = static_cast<float>(cs[c]);
          }
        }
      }
    });
  }
}

template <typename Fn>
void dispatch_elem(ElemType t, Fn&& fn) {
  switch (t) {
    case ElemType::kFloat16:
      fn(c10::Half{});
      break;
    case ElemType::kBFloat16:
      fn(c10::BFloat16{});
      break;
    case ElemType::kFloat32:
      fn(float{});
      break;
    case ElemType::kFloat64:
      fn(double{});
      break;
    default:
      TORCH_CHECK(false, "flash core (CPU): unknown element type ", int(t));
  }
}

}  // namespace

void flash_fwd_cpu(const FlashParams& params) {
  check_flash_params(params);
  dispatch_elem(params.dtype, [&](auto tag) { fwd_impl<decltype(tag)>(params); });
}

void flash_bwd_cpu(const FlashParams& params) {
  check_flash_params(params);
  dispatch_elem(params.dtype, [&](auto tag) { bwd_impl<decltype(tag)>(params); });
}

}  // namespace attnkit::flash
