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
// Inner products: q.k and dout.v are computed against a transposed copy of the key / value tile so
// that the innermost loop runs over contiguous keys (vectorisable without reassociating a
// reduction); the products P.V, dS.K, P^T.dout and dS^T.q run over the contiguous head dim.
#include "flash/flash_cpu.h"
#include "flash/flash_validate.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// S[r][c] (row stride kBlockN) = score of query row i0 + r and key j0 + c, or -inf when the key is
// not visible. When nograd is given, nograd[r][c] = 1 marks scores replaced by self_score (their
// gradient does not reach q, k or the bias).
template <typename T, typename A>
void compute_scores(const HeadCtx<T>& ctx, const A* Q, const A* Kt, int64_t i0, int m, int64_t j0, int n, A* S,
                    uint8_t* nograd) {
  const FlashParams& p = *ctx.p;
  const int D = p.head_dim;
  const A scale = static_cast<A>(p.scale);
  const A neg_inf = -std::numeric_limits<A>::infinity();
  const bool check_causal = p.causal;
  const bool check_window = p.window_left >= 0;
  for (int r = 0; r < m; ++r) {
    A* srow = S + int64_t(r) * kBlockN;
    for (int c = 0; c < n; ++c) srow[c] = A(0);
    const A* qr = Q + int64_t(r) * D;
    for (int x = 0; x < D; ++x) {
      const A a = qr[x];
      const A* kt = Kt + int64_t(x) * kBlockN;
      for (int c = 0; c < n; ++c) srow[c] += a * kt[c];
    }
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
        compute_scores(ctx, Q.data(), Kt.data(), i0, m, j0, n, S.data(), static_cast<uint8_t*>(nullptr));
        for (int r = 0; r < m; ++r) {
          A* srow = S.data() + int64_t(r) * kBlockN;
          A bmax = neg_inf;
          for (int c = 0; c < n; ++c) bmax = std::max(bmax, srow[c]);
          const A mnew = std::max(mx[r], bmax);
          if (mnew == neg_inf) continue;  // nothing visible yet
          A* orow = O.data() + int64_t(r) * D;
          if (mnew != mx[r]) {
            const A corr = std::exp(mx[r] - mnew);  // 0 when mx was -inf
            l[r] *= corr;
            for (int x = 0; x < D; ++x) orow[x] *= corr;
            mx[r] = mnew;
          }
          A lsum = A(0);
          for (int c = 0; c < n; ++c) {
            if (srow[c] == neg_inf) continue;
            const A pc = std::exp(srow[c] - mnew);
            lsum += pc;
            const A* vr = V.data() + int64_t(c) * D;
            for (int x = 0; x < D; ++x) orow[x] += pc * vr[x];
          }
          l[r] += lsum;
        }
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

// dP[r][c] = dO[r] . V[c] (V given transposed), then dS = P * (dP - delta). Self-scored entries get
// dS = 0 (their score is a constant).
template <typename A>
void compute_ds(const A* dO, const A* Vt, const A* delta, int m, int n, int D, const A* PS, A* dS,
                const uint8_t* nograd, A* dp /* scratch [kBlockN] */) {
  for (int r = 0; r < m; ++r) {
    for (int c = 0; c < n; ++c) dp[c] = A(0);
    const A* dor = dO + int64_t(r) * D;
    for (int x = 0; x < D; ++x) {
      const A a = dor[x];
      const A* vt = Vt + int64_t(x) * kBlockN;
      for (int c = 0; c < n; ++c) dp[c] += a * vt[c];
    }
    const A* prow = PS + int64_t(r) * kBlockN;
    A* dsrow = dS + int64_t(r) * kBlockN;
    const uint8_t* ng = nograd + int64_t(r) * kBlockN;
    for (int c = 0; c < n; ++c) dsrow[c] = ng[c] ? A(0) : prow[c] * (dp[c] - delta[r]);
  }
}

// S -> P = exp(S - lse) in place; lse = -inf rows and masked entries give 0.
template <typename A>
void scores_to_probs(A* S, const A* lse, int m, int n) {
  const A neg_inf = -std::numeric_limits<A>::infinity();
  for (int r = 0; r < m; ++r) {
    A* srow = S + int64_t(r) * kBlockN;
    if (lse[r] == neg_inf) {
      for (int c = 0; c < n; ++c) srow[c] = A(0);
      continue;
    }
    for (int c = 0; c < n; ++c) srow[c] = srow[c] == neg_inf ? A(0) : std::exp(srow[c] - lse[r]);
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
          dS(int64_t(kBlockM) * kBlockN), lse(kBlockM), dl(kBlockM), dp(kBlockN);
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
            compute_scores(ctx, Q.data(), Kt.data(), i0, m, j0, n, S.data(), ng.data());
            scores_to_probs(S.data(), lse.data(), m, n);
            compute_ds(dO.data(), Vt.data(), dl.data(), m, n, D, S.data(), dS.data(), ng.data(), dp.data());
            for (int r = 0; r < m; ++r) {
              A* dqr = dQ.data() + int64_t(r) * D;
              const A* dsr = dS.data() + int64_t(r) * kBlockN;
              for (int c = 0; c < n; ++c) {
                const A w = dsr[c] * scale;
                if (w == A(0)) continue;
                const A* kr2 = K.data() + int64_t(c) * D;
                for (int x = 0; x < D; ++x) dqr[x] += w * kr2[x];
              }
            }
          }
        }
        T* dqb = static_cast<T*>(p.dq) + int64_t(b) * p.dq_batch_stride + int64_t(hq) * p.dq_head_stride;
        const int64_t row0 = int64_t(s) * p.seqlen_q;
        for (int r = 0; r < m; ++r) {
          T* dst = dqb + (row0 + i0 + r) * p.dq_row_stride;
          const A* src = dQ.data() + int64_t(r) * D;
          for (int x = 0; x < D; ++x) dst[x] = static_cast<T>(src[x]);
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
          dS(int64_t(kBlockM) * kBlockN), lse(kBlockM), dl(kBlockM), dp(kBlockN), colsum(int64_t(std::max(nbh, 1)) * kBlockN);
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
            compute_scores(ctx, Q.data(), Kt.data(), i0, m, j0, n, S.data(), ng.data());
            scores_to_probs(S.data(), lse.data(), m, n);
            compute_ds(dO.data(), Vt.data(), dl.data(), m, n, D, S.data(), dS.data(), ng.data(), dp.data());
            for (int c = 0; c < n; ++c) {
              A* dvr = dV.data() + int64_t(c) * D;
              A* dkr = dK.data() + int64_t(c) * D;
              for (int r = 0; r < m; ++r) {
                const A pv = S[int64_t(r) * kBlockN + c];
                const A w = dS[int64_t(r) * kBlockN + c] * scale;
                if (pv != A(0)) {
                  const A* dor = dO.data() + int64_t(r) * D;
                  for (int x = 0; x < D; ++x) dvr[x] += pv * dor[x];
                }
                if (w != A(0)) {
                  const A* qr = Q.data() + int64_t(r) * D;
                  for (int x = 0; x < D; ++x) dkr[x] += w * qr[x];
                }
              }
            }
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
            dk_dst[x] = static_cast<T>(dks[x]);
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
