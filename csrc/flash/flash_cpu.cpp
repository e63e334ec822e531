// CPU implementation of the flash-attention core (see flash_params.h for the semantics).
//
// Work split
// - Forward: one task per (batch * segment, output head, block of kBlockM query rows). Each task
//   streams key tiles of up to kBlockN columns with an online softmax; the only score storage is one
//   kBlockM x kBlockN tile.
// - Backward: one task per (batch * segment, output head). It walks its query blocks in order; for
//   each block it recomputes P from the saved lse (lse = -inf: the row is fully masked, P = 0) tile by
//   tile, finishes that block's dq, and adds the block's share of dk, dv (and dbias) into fp32
//   accumulators of the head. Where several output heads share a gradient (dq of a query head read by
//   several output heads, dk / dv of a KV head, dbias of a bias head), each head stores its own fp32
//   partial and a final pass sums the partials in head order. No atomics: deterministic.
// - Tasks are handed to the intra-op threads from a shared counter (the forward hands out the query
//   blocks with the most keys first), so causal work balances; the outputs do not depend on which
//   thread ran a task.
//
// Block products run through cpu::gemm_nn (csrc/common/cpu_gemm.h): ATen's BLAS / oneDNN block GEMM
// for float, plain loops for double. fp32 operands that need no conversion and no gather are read in
// place from the inputs (row stride as leading dimension); the others are copied to fp32 tiles.
//
// Tiles that no row needs are not computed: key ranges come from the causal / window masks; with the
// kept predicate and a row-broadcast bias (DMA) a key is kept by some row of a query block only if its
// bias is >= the block's smallest threshold, so the block visits only those keys, gathered into
// contiguous tiles when they are few, else the contiguous tiles that contain one.
//
// Index conventions not spelled out in flash_params.h, chosen to match the CUDA kernels:
// - without gather indices, positions are the row numbers inside the segment (i and j);
// - the bias, row_thr / row_tie and dbias are addressed in segment space: row s * seqlen_q + i,
//   column s * seqlen_k + j (the tie column compares against s * seqlen_k + j as well);
// - dq is written in segment space like the other outputs: row s * seqlen_q + i of query head hq.
//
// ATTNKIT_CPU_NO_AVX2=1 switches to the portable kernels (plain-loop products, scalar exp): what
// CPUs without AVX2 run for exp; the tests use it to cover that path. exp in float is a polynomial
// (relative error ~2e-7), vectorisable, unlike std::exp.
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
#include <type_traits>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/cpu_tasks.h"

namespace attnkit::flash {
namespace {

constexpr int kBlockM = 64;   // query rows per forward task and per backward step
constexpr int kBlockN = 128;  // key columns per tile

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

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define ATTNKIT_CPU_AVX2 1
#define ATTNKIT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define ATTNKIT_CPU_AVX2 0
#endif

// The fast kernels (BLAS products, AVX2 exp) unless ATTNKIT_CPU_NO_AVX2 is set.
bool fast_kernels() {
  static const bool fast = std::getenv("ATTNKIT_CPU_NO_AVX2") == nullptr;
  return fast;
}

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

// s[c] = exp(s[c] - shift) in place for c < n (-inf entries give 0); returns the sum.
template <typename A>
inline A exp_row_impl(A* __restrict s, int n, A shift) {
  for (int c = 0; c < n; ++c) s[c] = exp_any(s[c] - shift);
  A sum = A(0);
  for (int c = 0; c < n; ++c) sum += s[c];
  return sum;
}

double exp_row(double* s, int n, double shift) {
  return exp_row_impl(s, n, shift);
}

#if ATTNKIT_CPU_AVX2
// exp_poly on 8 lanes (GCC / clang vector extensions), rounding by the 1.5 * 2^23 trick: the
// rounded n sits in the low mantissa bits of x / ln 2 + 1.5 * 2^23.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // vf8 only passes between inlined helpers of this file
#endif
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
ATTNKIT_TARGET_AVX2 inline vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
ATTNKIT_TARGET_AVX2 inline void store8(float* p, vf8 v) {
  std::memcpy(p, &v, sizeof(v));
}
ATTNKIT_TARGET_AVX2 inline vf8 exp8(vf8 x) {
  const vf8 lo = vf8{} - 87.0f, hi = vf8{} + 88.0f, magic = vf8{} + 12582912.0f;
  vf8 xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vf8 t = xc * 1.44269504088896341f + magic;
  const vf8 n = t - magic;
  const vf8 f = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  vf8 e = vf8{} + 1.0f / 5040.0f;
  e = e * f + 1.0f / 720.0f;
  e = e * f + 1.0f / 120.0f;
  e = e * f + 1.0f / 24.0f;
  e = e * f + 1.0f / 6.0f;
  e = e * f + 0.5f;
  e = e * f + 1.0f;
  e = e * f + 1.0f;
  const vi8 ni = reinterpret_cast<vi8>(t) - reinterpret_cast<vi8>(magic);
  const vf8 sc = reinterpret_cast<vf8>((ni + 127) << 23);
  const vf8 r = e * sc;
  return x < lo ? vf8{} : r;
}
ATTNKIT_TARGET_AVX2 float exp_row_avx2(float* s, int n, float shift) {
  vf8 acc = vf8{};
  int c = 0;
  for (; c + 8 <= n; c += 8) {
    const vf8 e = exp8(load8(s + c) - shift);
    store8(s + c, e);
    acc += e;
  }
  float sum = 0.f;
  for (int u = 0; u < 8; ++u) sum += acc[u];
  for (; c < n; ++c) {
    s[c] = exp_poly(s[c] - shift);
    sum += s[c];
  }
  return sum;
}
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && fast_kernels();
  return has;
}
#endif

float exp_row(float* s, int n, float shift) {
#if ATTNKIT_CPU_AVX2
  if (cpu_has_avx2()) return exp_row_avx2(s, n, shift);
#endif
  return exp_row_impl(s, n, shift);
}

// Largest of s[0, n) (-inf when n == 0); NaN-free inputs.
template <typename A>
inline A row_max_impl(const A* s, int n) {
  A m = -std::numeric_limits<A>::infinity();
  for (int c = 0; c < n; ++c) m = std::max(m, s[c]);
  return m;
}
double row_max(const double* s, int n) {
  return row_max_impl(s, n);
}
#if ATTNKIT_CPU_AVX2
ATTNKIT_TARGET_AVX2 float row_max_avx2(const float* s, int n) {
  vf8 m = vf8{} - std::numeric_limits<float>::infinity();
  int c = 0;
  for (; c + 8 <= n; c += 8) {
    const vf8 x = load8(s + c);
    m = x > m ? x : m;
  }
  float r = -std::numeric_limits<float>::infinity();
  for (int u = 0; u < 8; ++u) r = std::max(r, m[u]);
  for (; c < n; ++c) r = std::max(r, s[c]);
  return r;
}
#endif
float row_max(const float* s, int n) {
#if ATTNKIT_CPU_AVX2
  if (cpu_has_avx2()) return row_max_avx2(s, n);
#endif
  return row_max_impl(s, n);
}

// One row of the kept-predicate scores (see finish_scores): srow[c] = srow[c] * scale + tb[c] where
// (tb[c] > thr or (tb[c] == thr and tj[c] <= tie)) and tj[c] <= lim, else -inf.
template <typename A>
inline void kept_row_impl(A* srow, const float* tb, const int32_t* tj, int n, float thr, int32_t tie, int32_t lim,
                          A scale) {
  for (int c = 0; c < n; ++c) {
    const bool kept = (tb[c] > thr) | ((tb[c] == thr) & (tj[c] <= tie));
    const bool vis = kept & (tj[c] <= lim);
    srow[c] = vis ? srow[c] * scale + static_cast<A>(tb[c]) : -std::numeric_limits<A>::infinity();
  }
}
void kept_row(double* srow, const float* tb, const int32_t* tj, int n, float thr, int32_t tie, int32_t lim,
              double scale) {
  kept_row_impl(srow, tb, tj, n, thr, tie, lim, scale);
}
#if ATTNKIT_CPU_AVX2
ATTNKIT_TARGET_AVX2 void kept_row_avx2(float* srow, const float* tb, const int32_t* tj, int n, float thr, int32_t tie,
                                       int32_t lim, float scale) {
  const vf8 thrv = vf8{} + thr, ninf = vf8{} - std::numeric_limits<float>::infinity();
  const vi8 tiev = vi8{} + tie, limv = vi8{} + lim;
  int c = 0;
  for (; c + 8 <= n; c += 8) {
    const vf8 b = load8(tb + c);
    vi8 j;
    std::memcpy(&j, tj + c, sizeof(j));
    const vi8 vis = ((b > thrv) | ((b == thrv) & (j <= tiev))) & (j <= limv);
    const vf8 x = load8(srow + c) * scale + b;
    store8(srow + c, vis ? x : ninf);
  }
  kept_row_impl(srow + c, tb + c, tj + c, n - c, thr, tie, lim, scale);
}
#endif
void kept_row(float* srow, const float* tb, const int32_t* tj, int n, float thr, int32_t tie, int32_t lim,
              float scale) {
#if ATTNKIT_CPU_AVX2
  if (cpu_has_avx2()) return kept_row_avx2(srow, tb, tj, n, thr, tie, lim, scale);
#endif
  kept_row_impl(srow, tb, tj, n, thr, tie, lim, scale);
}

// Everything one (batch, segment, output head) needs, with the base pointers resolved.
template <typename T>
struct HeadCtx {
  const FlashParams* p;
  int b, s, h, hq, hkv;
  int64_t row0, col0;  // segment-space offsets: s * seqlen_q, s * seqlen_k
  int64_t shift;       // bottom-right alignment of the causal / window masks
  int64_t rows;        // valid query rows: q_count of (b, h) with compact gathers, else seqlen_q
  bool compact;        // compact query gathers: ascending positions, keys not gathered
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
    compact = params.q_count != nullptr;
    rows = compact ? std::min<int64_t>(params.seqlen_q, params.q_count[int64_t(b) * params.h_out + h])
                   : int64_t(params.seqlen_q);
  }

  int64_t qrow(int64_t i) const { return qidx ? int64_t(qidx[i]) : row0 + i; }
  int64_t krow(int64_t j) const { return kidx ? int64_t(kidx[j]) : col0 + j; }
  int64_t qpos(int64_t i) const { return qidx ? int64_t(qidx[i]) : i; }
  int64_t kpos(int64_t j) const { return kidx ? int64_t(kidx[j]) : j; }

  // Keys [lo, hi) that rows [i0, i1) may see; a superset, refined per element by visible().
  void key_range(int64_t i0, int64_t i1, int64_t& lo, int64_t& hi) const {
    lo = 0;
    hi = p->seqlen_k;
    // compact gathers ascend: the block's last row has the largest position
    if (compact && p->causal && i1 > i0) hi = std::min<int64_t>(hi, qpos(i1 - 1) + 1);
    if (compact && p->window_left >= 0 && i1 > i0) lo = std::max<int64_t>(lo, qpos(i0) - p->window_left);
    if (qidx || kidx) return;
    if (p->causal) hi = std::min<int64_t>(hi, i1 - 1 + shift + 1);
    if (p->window_left >= 0) lo = std::max<int64_t>(lo, i0 + shift - p->window_left);
    if (p->window_right >= 0) hi = std::min<int64_t>(hi, i1 - 1 + shift + p->window_right + 1);
  }
  // Query rows [lo, hi) that may see some key of [j0, j1).
  void query_range(int64_t j0, int64_t j1, int64_t& lo, int64_t& hi) const {
    lo = 0;
    hi = p->seqlen_q;
    if (qidx || kidx) return;
    if (p->causal) lo = std::max<int64_t>(lo, j0 - shift);
    if (p->window_left >= 0) hi = std::min<int64_t>(hi, j1 - 1 - shift + p->window_left + 1);
    if (p->window_right >= 0) lo = std::max<int64_t>(lo, j0 - shift - p->window_right);
  }
};

// Loads rows [0, m) of one head into dst[m][D] (acc type); row_of(r) gives the source row.
template <typename T, typename A, typename RowFn>
inline void load_rows(A* dst, const T* base, int64_t row_stride, int m, int D, RowFn row_of) {
  for (int r = 0; r < m; ++r) {
    const T* src = base + row_of(r) * row_stride;
    A* d = dst + int64_t(r) * D;
    for (int x = 0; x < D; ++x) d[x] = static_cast<A>(src[x]);
  }
}

// A tile of n key columns: j0 + c, or cols[c] when the tile is gathered.
struct KeyTile {
  int64_t j0;
  int n;
  const int* cols;
  int64_t col(int c) const { return cols ? int64_t(cols[c]) : j0 + c; }
};

// GEMM operands of a key tile's K and V rows: read in place when the inputs already have the
// accumulation type and the tile's rows are evenly spaced in memory, else converted into Kb / Vb.
template <typename A>
struct KVOperands {
  const A* K;
  const A* V;
  int64_t ldk, ldv;
};
template <typename T, typename A>
KVOperands<A> kv_operands(const HeadCtx<T>& ctx, const KeyTile& tile, int D, A* Kb, A* Vb) {
  const FlashParams& p = *ctx.p;
  if constexpr (std::is_same_v<T, A>) {
    if (!tile.cols && !ctx.kidx) {
      const int64_t r0 = ctx.krow(tile.j0);
      return {reinterpret_cast<const A*>(ctx.k) + r0 * p.k_row_stride,
              reinterpret_cast<const A*>(ctx.v) + r0 * p.v_row_stride, p.k_row_stride, p.v_row_stride};
    }
  }
  auto kr = [&](int c) { return ctx.krow(tile.col(c)); };
  load_rows(Kb, ctx.k, p.k_row_stride, tile.n, D, kr);
  load_rows(Vb, ctx.v, p.v_row_stride, tile.n, D, kr);
  return {Kb, Vb, D, D};
}

// Calls fn(tile) for the key tiles that query rows [i0, i0 + m) of ctx must visit, in ascending key
// order. cols is scratch for gathered tiles.
template <typename T, typename Fn>
void for_each_key_tile(const HeadCtx<T>& ctx, int64_t i0, int m, std::vector<int>& cols, Fn&& fn) {
  const FlashParams& p = *ctx.p;
  int64_t jlo, jhi;
  ctx.key_range(i0, i0 + m, jlo, jhi);
  if (jhi <= jlo) return;
  // Kept predicate over a row-broadcast bias: row r keeps key j only if bias[j] >= thr[r] (strictly
  // greater, or equal and inside the tie), so keys below the smallest threshold of the block are
  // kept by none of its rows. A NaN threshold keeps nothing and is skipped by std::min.
  if (ctx.thr && ctx.bias && p.bias_row_stride == 0 && !ctx.kidx) {
    float tmin = std::numeric_limits<float>::infinity();
    for (int r = 0; r < m; ++r) tmin = std::min(tmin, ctx.thr[ctx.row0 + i0 + r]);
    const float* brow = ctx.bias + ctx.col0;
    cols.clear();
    for (int64_t j = jlo; j < jhi; ++j)
      if (brow[j] >= tmin) cols.push_back(int(j));
    const int64_t cnt = int64_t(cols.size());
    if (cnt == 0) return;
    if (cnt * 4 <= (jhi - jlo) * 3) {  // few enough to be worth gathering
      for (int64_t off = 0; off < cnt; off += kBlockN)
        fn(KeyTile{0, int(std::min<int64_t>(kBlockN, cnt - off)), cols.data() + off});
      return;
    }
    size_t u = 0;  // contiguous tiles that hold at least one candidate
    for (int64_t j0 = jlo; j0 < jhi; j0 += kBlockN) {
      const int n = int(std::min<int64_t>(kBlockN, jhi - j0));
      while (u < cols.size() && cols[u] < j0) ++u;
      if (u < cols.size() && cols[u] < j0 + n) fn(KeyTile{j0, n, nullptr});
    }
    return;
  }
  for (int64_t j0 = jlo; j0 < jhi; j0 += kBlockN) fn(KeyTile{j0, int(std::min<int64_t>(kBlockN, jhi - j0)), nullptr});
}

// Turns the raw products S[r][c] = q_i . k_j (row stride kBlockN) of query rows [i0, i0 + m) and the
// key columns of tile into scores: scale, bias, masks (-inf where the key is not visible), self
// score. When nograd is given, nograd[r][c] = 1 marks scores replaced by self_score (their gradient
// reaches neither q, k nor the bias). Contiguous tiles that no mask touches take a vectorisable path.
template <typename T, typename A>
void finish_scores(const HeadCtx<T>& ctx, int64_t i0, int m, const KeyTile& tile, A* S, uint8_t* nograd) {
  const FlashParams& p = *ctx.p;
  const A scale = static_cast<A>(p.scale);
  const A neg_inf = -std::numeric_limits<A>::infinity();
  const bool indexed = ctx.qidx || ctx.kidx;
  const bool check_causal = p.causal;
  const bool check_window = p.window_left >= 0;
  const bool check_right = p.window_right >= 0;
  const int n = tile.n;
  const int64_t j0 = tile.j0;
  // Without gathers, positions are i and j: the tile needs no causal check when its last key is
  // visible to its first row, and no window check when its first key is visible to its last row.
  // Compact gathers ascend: the same holds with the positions of the first and last rows.
  const int64_t first_pos = ctx.compact ? ctx.qpos(i0) : i0 + ctx.shift;
  const int64_t last_pos = ctx.compact ? ctx.qpos(i0 + m - 1) : i0 + m - 1 + ctx.shift;
  const bool clean = !tile.cols && (!indexed || ctx.compact) && !ctx.thr && !p.self_mask &&
                     (!check_causal || j0 + n - 1 <= first_pos) &&
                     (!check_window || j0 >= last_pos - p.window_left) &&
                     (!check_right || j0 + n - 1 <= first_pos + p.window_right);
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
  if (!indexed && !p.self_mask && !check_window && ctx.thr && p.bias_row_stride == 0 && !nograd) {
    // Kept predicate over a row-broadcast bias (DMA), optionally causal: the tile's bias values and
    // columns are read once, then each row is one branch-free, vectorisable pass.
    float tb[kBlockN];
    int32_t tj[kBlockN];
    const float* brow = ctx.bias + ctx.col0;
    for (int c = 0; c < n; ++c) {
      tj[c] = int32_t(tile.col(c));
      tb[c] = brow[tj[c]];
    }
    for (int r = 0; r < m; ++r) {
      A* srow = S + int64_t(r) * kBlockN;
      const int64_t i = i0 + r;
      const float thr = ctx.thr[ctx.row0 + i];
      const int32_t tie = int32_t(std::min<int64_t>(int64_t(ctx.tie[ctx.row0 + i]) - ctx.col0, INT32_MAX));
      const int32_t lim = check_causal ? int32_t(std::min<int64_t>(i + ctx.shift, INT32_MAX)) : INT32_MAX;
      kept_row(srow, tb, tj, n, thr, tie, lim, scale);
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
      const int64_t j = tile.col(c);
      const int64_t pj = ctx.kpos(j);
      bool vis = true;
      if (check_causal && pj > pi + ctx.shift) vis = false;
      if (check_window && pj < pi + ctx.shift - p.window_left) vis = false;
      if (check_right && pj > pi + ctx.shift + p.window_right) vis = false;
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
template <typename A>
struct FwdScratch {
  std::vector<A> Q, O, K, V, S, mx, l;
  std::vector<int> cols;
  FwdScratch(int D)
      : Q(int64_t(kBlockM) * D),
        O(int64_t(kBlockM) * D),
        K(int64_t(kBlockN) * D),
        V(int64_t(kBlockN) * D),
        S(int64_t(kBlockM) * kBlockN),
        mx(kBlockM),
        l(kBlockM) {}
};

template <typename T>
void fwd_impl(const FlashParams& p) {
  using A = typename AccType<T>::type;
  constexpr bool kInPlace = std::is_same_v<T, A>;  // inputs usable as GEMM operands without a copy
  const bool fast = fast_kernels();
  const int D = p.head_dim;
  const int64_t BS = int64_t(p.batch) * p.num_segments;
  const int64_t nblk = ceil_div(p.seqlen_q, kBlockM);
  const int64_t ntask = BS * p.h_out * nblk;
  const A neg_inf = -std::numeric_limits<A>::infinity();

  cpu::run_tasks(
      ntask, [&] { return FwdScratch<A>(D); },
      [&](FwdScratch<A>& w, int64_t t) {
        const int64_t blk = nblk - 1 - t % nblk;  // the last query blocks see the most keys: first
        const int h = int((t / nblk) % p.h_out);
        const int64_t bs = t / (nblk * p.h_out);
        const HeadCtx<T> ctx(p, int(bs / p.num_segments), int(bs % p.num_segments), h);
        const int64_t i0 = blk * kBlockM;
        const int m = int(std::min<int64_t>(kBlockM, ctx.rows - i0));
        if (m <= 0) return;  // past the compact row count of this head

        const A* Qp = w.Q.data();
        int64_t ldq = D;
        if (kInPlace && !ctx.qidx) {
          Qp = reinterpret_cast<const A*>(ctx.q) + ctx.qrow(i0) * p.q_row_stride;
          ldq = p.q_row_stride;
        } else {
          load_rows(w.Q.data(), ctx.q, p.q_row_stride, m, D, [&](int r) { return ctx.qrow(i0 + r); });
        }
        std::fill(w.O.begin(), w.O.end(), A(0));
        std::fill(w.mx.begin(), w.mx.end(), neg_inf);
        std::fill(w.l.begin(), w.l.end(), A(0));
        A* S = w.S.data();
        A* O = w.O.data();

        for_each_key_tile(ctx, i0, m, w.cols, [&](const KeyTile& tile) {
          const int n = tile.n;
          const auto [Kp, Vp, ldk, ldv] = kv_operands(ctx, tile, D, w.K.data(), w.V.data());
          cpu::gemm(false, true, m, n, D, Qp, ldq, Kp, ldk, S, kBlockN, false, fast);  // S = Q K^T
          finish_scores(ctx, i0, m, tile, S, static_cast<uint8_t*>(nullptr));
          for (int r = 0; r < m; ++r) {
            A* srow = S + int64_t(r) * kBlockN;
            const A bmax = row_max(srow, n);
            const A mnew = std::max(w.mx[r], bmax);
            if (mnew == neg_inf) {  // nothing visible yet: this row contributes nothing
              std::fill(srow, srow + n, A(0));
              continue;
            }
            if (mnew != w.mx[r]) {
              const A corr = std::exp(w.mx[r] - mnew);  // 0 when mx was -inf
              w.l[r] *= corr;
              A* orow = O + int64_t(r) * D;
              for (int x = 0; x < D; ++x) orow[x] *= corr;
              w.mx[r] = mnew;
            }
            w.l[r] += exp_row(srow, n, mnew);  // S row now holds the unnormalised probabilities
          }
          cpu::gemm_nn(m, D, n, S, kBlockN, Vp, ldv, O, D, true, fast);  // O += P V
        });

        T* obase = static_cast<T*>(p.o) + ctx.b * p.o_batch_stride + int64_t(h) * p.o_head_stride;
        float* lbase = p.lse + ctx.b * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + ctx.row0;
        for (int r = 0; r < m; ++r) {
          T* orow = obase + (ctx.row0 + i0 + r) * p.o_row_stride;
          if (!(w.l[r] > A(0))) {
            for (int x = 0; x < D; ++x) orow[x] = static_cast<T>(0);
            lbase[i0 + r] = -std::numeric_limits<float>::infinity();
          } else {
            const A inv = A(1) / w.l[r];
            const A* acc = O + int64_t(r) * D;
            for (int x = 0; x < D; ++x) orow[x] = static_cast<T>(acc[x] * inv);
            lbase[i0 + r] = static_cast<float>(w.mx[r] + std::log(w.l[r]));
          }
        }
      });
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------
template <typename A>
struct BwdScratch {
  std::vector<A> Q, dO, K, V, S, dP, dS, dQ, lse, dl, dK, dV, tK, tV, colsum;
  std::vector<uint8_t> ng;
  std::vector<int> cols;
  BwdScratch(int D, int64_t lk, bool colsums)
      : Q(int64_t(kBlockM) * D),
        dO(int64_t(kBlockM) * D),
        K(int64_t(kBlockN) * D),
        V(int64_t(kBlockN) * D),
        S(int64_t(kBlockM) * kBlockN),
        dP(int64_t(kBlockM) * kBlockN),
        dS(int64_t(kBlockM) * kBlockN),
        dQ(int64_t(kBlockM) * D),
        lse(kBlockM),
        dl(kBlockM),
        dK(lk * D),
        dV(lk * D),
        tK(int64_t(kBlockN) * D),
        tV(int64_t(kBlockN) * D),
        colsum(colsums ? lk : 0),
        ng(int64_t(kBlockM) * kBlockN) {}
};

template <typename T>
void bwd_impl(const FlashParams& p) {
  using A = typename AccType<T>::type;
  constexpr bool kInPlace = std::is_same_v<T, A>;
  const bool fast = fast_kernels();
  const int D = p.head_dim;
  const int64_t BS = int64_t(p.batch) * p.num_segments;
  const int64_t rows_q = int64_t(p.num_segments) * p.seqlen_q;  // segment-space rows per batch
  const int64_t rows_k = int64_t(p.num_segments) * p.seqlen_k;
  const int64_t lk = p.seqlen_k;
  const A scale = static_cast<A>(p.scale);
  const A neg_inf = -std::numeric_limits<A>::infinity();
  if (p.dbias) {
    TORCH_CHECK(p.bias != nullptr, "flash_bwd_cpu: dbias needs bias");
    TORCH_CHECK(p.bias_head_group >= 1 && p.kv_group % p.bias_head_group == 0,
                "flash_bwd_cpu: the output heads of a bias head must lie in one KV head's group "
                "(bias_head_group must divide kv_group)");
  }
  const bool bias_rowwise = p.bias && p.bias_row_stride != 0;
  const bool colsums = p.dbias && !bias_rowwise;
  // fp32 partials per output head where output heads share a gradient; summed after the tasks.
  const bool q_shared = p.q_group > 1, kv_shared = p.kv_group > 1;
  const int64_t HO = p.h_out;
  std::vector<A> dq_part(q_shared ? size_t(p.batch) * HO * rows_q * D : 0);
  std::vector<A> dk_part(kv_shared ? size_t(p.batch) * HO * rows_k * D : 0);
  std::vector<A> dv_part(kv_shared ? size_t(p.batch) * HO * rows_k * D : 0);
  std::vector<A> db_part(colsums ? size_t(p.batch) * HO * rows_k : 0);
  const int64_t nblk = ceil_div(p.seqlen_q, kBlockM);

  cpu::run_tasks(
      BS * HO, [&] { return BwdScratch<A>(D, lk, colsums); },
      [&](BwdScratch<A>& w, int64_t t) {
        const int h = int(t % HO);
        const int64_t bs = t / HO;
        const int b = int(bs / p.num_segments), s = int(bs % p.num_segments);
        const HeadCtx<T> ctx(p, b, s, h);
        const int64_t row0 = ctx.row0, col0 = ctx.col0;
        std::fill(w.dK.begin(), w.dK.end(), A(0));
        std::fill(w.dV.begin(), w.dV.end(), A(0));
        std::fill(w.colsum.begin(), w.colsum.end(), A(0));
        float* dbb = p.dbias ? p.dbias + int64_t(b) * p.dbias_batch_stride : nullptr;
        float* dbh = nullptr;  // per-row dbias of this head (bias_head_group == 1)
        if (dbb && bias_rowwise) {
          dbh = dbb + int64_t(h) * p.dbias_head_stride;
          for (int64_t i = 0; i < p.seqlen_q; ++i) {
            float* dst = dbh + (row0 + i) * p.dbias_row_stride + col0;
            std::fill(dst, dst + lk, 0.f);
          }
        }
        const T* ob = static_cast<const T*>(p.o) + int64_t(b) * p.o_batch_stride + int64_t(h) * p.o_head_stride;
        const T* db = static_cast<const T*>(p.dout) + int64_t(b) * p.do_batch_stride + int64_t(h) * p.do_head_stride;
        const float* lb = p.lse + int64_t(b) * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + row0;
        A* S = w.S.data();
        A* dP = w.dP.data();
        A* dS = w.dS.data();

        const int64_t nblk_h = ctx.compact ? ceil_div(ctx.rows, kBlockM) : nblk;
        for (int64_t blk = 0; blk < nblk_h; ++blk) {
          const int64_t i0 = blk * kBlockM;
          const int m = int(std::min<int64_t>(kBlockM, ctx.rows - i0));
          const A* Qp = w.Q.data();
          int64_t ldq = D;
          if (kInPlace && !ctx.qidx) {
            Qp = reinterpret_cast<const A*>(ctx.q) + ctx.qrow(i0) * p.q_row_stride;
            ldq = p.q_row_stride;
          } else {
            load_rows(w.Q.data(), ctx.q, p.q_row_stride, m, D, [&](int r) { return ctx.qrow(i0 + r); });
          }
          const A* dOp = w.dO.data();
          int64_t lddo = D;
          if (kInPlace) {
            dOp = reinterpret_cast<const A*>(db) + (row0 + i0) * p.do_row_stride;
            lddo = p.do_row_stride;
          } else {
            load_rows(w.dO.data(), db, p.do_row_stride, m, D, [&](int r) { return row0 + i0 + r; });
          }
          for (int r = 0; r < m; ++r) {  // delta = dout . o
            const T* orow = ob + (row0 + i0 + r) * p.o_row_stride;
            const A* drow = dOp + r * lddo;
            A acc = A(0);
            for (int x = 0; x < D; ++x) acc += static_cast<A>(orow[x]) * drow[x];
            w.dl[r] = acc;
            w.lse[r] = static_cast<A>(lb[i0 + r]);
          }
          std::fill(w.dQ.begin(), w.dQ.end(), A(0));

          for_each_key_tile(ctx, i0, m, w.cols, [&](const KeyTile& tile) {
            const int n = tile.n;
            const auto [Kp, Vp, ldk, ldv] = kv_operands(ctx, tile, D, w.K.data(), w.V.data());
            cpu::gemm(false, true, m, n, D, Qp, ldq, Kp, ldk, S, kBlockN, false, fast);  // S = Q K^T
            finish_scores(ctx, i0, m, tile, S, p.self_mask ? w.ng.data() : nullptr);
            cpu::gemm(false, true, m, n, D, dOp, lddo, Vp, ldv, dP, kBlockN, false, fast);  // dP = dO V^T
            for (int r = 0; r < m; ++r) {
              A* srow = S + int64_t(r) * kBlockN;
              A* dsrow = dS + int64_t(r) * kBlockN;
              if (w.lse[r] == neg_inf) {
                std::fill(srow, srow + n, A(0));
                std::fill(dsrow, dsrow + n, A(0));
                continue;
              }
              exp_row(srow, n, w.lse[r]);  // P
              const A* dprow = dP + int64_t(r) * kBlockN;
              const A dl = w.dl[r];
              for (int c = 0; c < n; ++c) dsrow[c] = srow[c] * (dprow[c] - dl);
              if (p.self_mask) {
                const uint8_t* ng = w.ng.data() + int64_t(r) * kBlockN;
                for (int c = 0; c < n; ++c)
                  if (ng[c]) dsrow[c] = A(0);
              }
            }
            cpu::gemm_nn(m, D, n, dS, kBlockN, Kp, ldk, w.dQ.data(), D, true, fast);  // dQ += dS K
            if (!tile.cols) {
              A* dV = w.dV.data() + tile.j0 * D;
              A* dK = w.dK.data() + tile.j0 * D;
              cpu::gemm(true, false, n, D, m, S, kBlockN, dOp, lddo, dV, D, true, fast);  // dV += P^T dO
              cpu::gemm(true, false, n, D, m, dS, kBlockN, Qp, ldq, dK, D, true, fast);   // dK += dS^T Q
            } else {
              cpu::gemm(true, false, n, D, m, S, kBlockN, dOp, lddo, w.tV.data(), D, false, fast);
              cpu::gemm(true, false, n, D, m, dS, kBlockN, Qp, ldq, w.tK.data(), D, false, fast);
              for (int c = 0; c < n; ++c) {
                A* dV = w.dV.data() + tile.col(c) * D;
                A* dK = w.dK.data() + tile.col(c) * D;
                const A* sv = w.tV.data() + int64_t(c) * D;
                const A* sk = w.tK.data() + int64_t(c) * D;
                for (int x = 0; x < D; ++x) {
                  dV[x] += sv[x];
                  dK[x] += sk[x];
                }
              }
            }
            if (dbh) {
              for (int r = 0; r < m; ++r) {
                float* dst = dbh + (row0 + i0 + r) * p.dbias_row_stride + col0;
                const A* dsr = dS + int64_t(r) * kBlockN;
                for (int c = 0; c < n; ++c) dst[tile.col(c)] = static_cast<float>(dsr[c]);
              }
            } else if (colsums) {
              A* cs = w.dP.data();  // dP is free again: column sums of dS in its first row
              std::fill(cs, cs + n, A(0));
              for (int r = 0; r < m; ++r) {
                const A* dsr = dS + int64_t(r) * kBlockN;
                for (int c = 0; c < n; ++c) cs[c] += dsr[c];
              }
              for (int c = 0; c < n; ++c) w.colsum[tile.col(c)] += cs[c];
            }
          });

          if (q_shared) {
            A* dst = dq_part.data() + ((int64_t(b) * HO + h) * rows_q + row0 + i0) * D;
            std::copy(w.dQ.begin(), w.dQ.begin() + int64_t(m) * D, dst);
          } else {
            T* dqb = static_cast<T*>(p.dq) + int64_t(b) * p.dq_batch_stride + int64_t(ctx.hq) * p.dq_head_stride;
            for (int r = 0; r < m; ++r) {
              T* dst = dqb + (row0 + i0 + r) * p.dq_row_stride;
              const A* src = w.dQ.data() + int64_t(r) * D;
              for (int x = 0; x < D; ++x) dst[x] = static_cast<T>(src[x] * scale);
            }
          }
        }

        if (kv_shared) {
          const int64_t off = ((int64_t(b) * HO + h) * rows_k + col0) * D;
          std::copy(w.dK.begin(), w.dK.end(), dk_part.begin() + off);
          std::copy(w.dV.begin(), w.dV.end(), dv_part.begin() + off);
        } else {
          T* dkb = static_cast<T*>(p.dk) + int64_t(b) * p.dk_batch_stride + int64_t(ctx.hkv) * p.dk_head_stride;
          T* dvb = static_cast<T*>(p.dv) + int64_t(b) * p.dv_batch_stride + int64_t(ctx.hkv) * p.dv_head_stride;
          for (int64_t j = 0; j < lk; ++j) {
            T* dk_dst = dkb + (col0 + j) * p.dk_row_stride;
            T* dv_dst = dvb + (col0 + j) * p.dv_row_stride;
            const A* dks = w.dK.data() + j * D;
            const A* dvs = w.dV.data() + j * D;
            for (int x = 0; x < D; ++x) {
              dk_dst[x] = static_cast<T>(dks[x] * scale);
              dv_dst[x] = static_cast<T>(dvs[x]);
            }
          }
        }
        if (colsums) std::copy(w.colsum.begin(), w.colsum.end(), db_part.begin() + (int64_t(b) * HO + h) * rows_k + col0);
      });

  // ---- sums of the per-output-head partials, in head order ----
  if (q_shared) {
    const int G = p.q_group;
    at::parallel_for(0, int64_t(p.batch) * p.h_q, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / p.h_q, hq = u % p.h_q;
        T* dqb = static_cast<T*>(p.dq) + b * p.dq_batch_stride + hq * p.dq_head_stride;
        for (int64_t i = 0; i < rows_q; ++i) {
          T* dst = dqb + i * p.dq_row_stride;
          for (int x = 0; x < D; ++x) {
            A acc = A(0);
            for (int g = 0; g < G; ++g) acc += dq_part[((b * HO + hq * G + g) * rows_q + i) * D + x];
            dst[x] = static_cast<T>(acc * scale);
          }
        }
      }
    });
  }
  if (kv_shared) {
    const int G = p.kv_group;
    at::parallel_for(0, int64_t(p.batch) * p.h_kv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / p.h_kv, hk = u % p.h_kv;
        T* dkb = static_cast<T*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride;
        T* dvb = static_cast<T*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride;
        for (int64_t j = 0; j < rows_k; ++j) {
          T* dk_dst = dkb + j * p.dk_row_stride;
          T* dv_dst = dvb + j * p.dv_row_stride;
          for (int x = 0; x < D; ++x) {
            A ak = A(0), av = A(0);
            for (int g = 0; g < G; ++g) {
              const size_t idx = ((b * HO + hk * G + g) * rows_k + j) * D + x;
              ak += dk_part[idx];
              av += dv_part[idx];
            }
            dk_dst[x] = static_cast<T>(ak * scale);
            dv_dst[x] = static_cast<T>(av);
          }
        }
      }
    });
  }
  if (colsums) {
    const int bhg = p.bias_head_group;
    const int64_t nbias = HO / bhg;
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t bh = 0; bh < nbias; ++bh) {
        float* dst = p.dbias + b * p.dbias_batch_stride + bh * p.dbias_head_stride;
        for (int64_t j = 0; j < rows_k; ++j) {
          A acc = A(0);
          for (int u = 0; u < bhg; ++u) acc += db_part[(b * HO + bh * bhg + u) * rows_k + j];
          dst[j] = static_cast<float>(acc);
        }
      }
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
