// Lightning attention on the CPU: the same chunk pass as the CUDA kernels (lightning_params.h), with
// the same chunking, sequence splitting (state-only phase, scan, main phase) and derivative mode.
// Accumulates in fp32 (fp64 for fp64 inputs). Parallel over (sequence, head, segment). The chunk
// products (intra-chunk scores, q S, the state update) are block GEMMs.
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/cpu_tasks.h"
#include "lightning/lightning_api.h"

namespace attnkit::lightning {
namespace {

template <typename A, typename T>
inline A to_acc(T x) {
  return static_cast<A>(static_cast<float>(x));
}
template <>
inline double to_acc<double, double>(double x) {
  return x;
}

template <typename T, typename A>
inline T from_acc(A x) {
  return static_cast<T>(x);
}

// Bounds of sequence n: batch entry, first row, length.
struct SeqBounds {
  int64_t b, start, len;
};
inline SeqBounds seq_bounds(const PassParams& p, int n) {
  if (p.cu_seqlens) return {0, p.cu_seqlens[n], p.cu_seqlens[n + 1] - p.cu_seqlens[n]};
  return {n, 0, p.seqlen};
}

template <typename A>
inline A& st(const StateTensor& s, int n, int h, int r, int c) {
  return static_cast<A*>(s.ptr)[n * s.n_stride + h * s.h_stride + r * s.r_stride + c * s.c_stride];
}

// Workspace slot [n][h][slot] of a [N][H][num_segments][dk][dv] buffer.
template <typename A>
inline A* ws_slot(void* ws, const PassParams& p, int n, int h, int slot) {
  return static_cast<A*>(ws) + ((int64_t(n) * p.num_heads + h) * p.num_segments + slot) * int64_t(p.dk) * p.dv;
}

// One (sequence, head, segment) of a pass. state_only: the segment's local state from zero.
template <typename T, typename A>
void run_unit(const PassParams& p, int n, int h, int seg, bool state_only) {
  const SeqBounds sb = seq_bounds(p, n);
  const SegmentPlan sp = lightning_segments(sb.len, p.block_t, p.num_segments);
  if (seg >= sp.nseg) return;
  if (state_only && seg == sp.nseg - 1) return;  // nobody needs the last segment's local state
  const int BT = p.block_t, dk = p.dk, dv = p.dv;
  const bool deriv = p.deriv;
  const A slope = static_cast<const A*>(p.slopes)[h];
  // lambda^m for integer m >= 0, as exp(-slope * m): no division, no negative powers.
  std::vector<A> pw(BT + 2);
  for (int m = 0; m < BT + 2; ++m) pw[m] = std::exp(-slope * A(m));

  std::vector<A> S(size_t(dk) * dv, A(0)), Tst(deriv ? size_t(dk) * dv : 0, A(0));
  int pshift = 0;
  if (!state_only) {
    if (seg == 0) {
      if (p.init.ptr) {
        for (int d = 0; d < dk; ++d)
          for (int e = 0; e < dv; ++e) S[size_t(d) * dv + e] = st<A>(p.init, n, h, d, e);
        pshift = p.init_shift;
      }
    } else {
      const A* s_in = ws_slot<A>(p.seg_state, p, n, h, seg - 1);
      std::copy(s_in, s_in + size_t(dk) * dv, S.begin());
      if (deriv) {
        const A* t_in = ws_slot<A>(p.seg_tstate, p, n, h, seg - 1);
        std::copy(t_in, t_in + size_t(dk) * dv, Tst.begin());
      }
    }
  }

  // Chunk products as block GEMMs (cpu::gemm): rows are chunk positions. Fp32/fp64 inputs read in
  // order and with v_scale = 1 are used in place (row stride as the leading dimension); otherwise the
  // chunk's rows are first converted into Qb / Kb / Vb.
  // Dm[i][j] = lambda^(i-j) for j <= i, else 0; Dd[i][j] = (i-j) lambda^(i-j-1) for j < i, else 0.
  std::vector<A> Dm(size_t(BT) * BT, A(0)), Dd(deriv ? size_t(BT) * BT : 0, A(0));
  for (int i = 0; i < BT; ++i)
    for (int j = 0; j <= i; ++j) {
      Dm[size_t(i) * BT + j] = pw[i - j];
      if (deriv && j < i) Dd[size_t(i) * BT + j] = A(i - j) * pw[i - j - 1];
    }
  constexpr bool kSameType = std::is_same_v<T, A>;
  const bool direct = kSameType && !p.reverse;
  const bool direct_v = direct && p.v_scale == 1.0;
  const bool direct_o = direct && p.o != nullptr;  // out_scale is folded into W and the q S weights
  std::vector<A> Qb(direct ? 0 : size_t(BT) * dk), Kb(direct ? 0 : size_t(BT) * dk), Vb(direct_v ? 0 : size_t(BT) * dv);
  std::vector<A> P(size_t(BT) * BT), W(size_t(BT) * BT), Kw(size_t(BT) * dk), QS(size_t(BT) * dv),
      QT(deriv ? size_t(BT) * dv : 0), Y(size_t(BT) * dv);
  std::vector<int64_t> rows(BT);
  const A out_scale = A(p.out_scale);
  double dl = 0;  // d lambda partial: a long sum, kept in fp64
  const int64_t c_begin = seg * sp.chunks_per_seg;
  const int64_t c_end = std::min(c_begin + sp.chunks_per_seg, sp.nchunks);
  auto row_ptr = [&](const SeqTensor& t, int64_t row) {
    return static_cast<const T*>(t.ptr) + sb.b * t.batch_stride + row * t.row_stride + h * t.head_stride;
  };
  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t t0 = c * BT;
    const int nr = int(std::min<int64_t>(BT, sb.len - t0));
    for (int i = 0; i < nr; ++i) {
      const int64_t tau = t0 + i;
      rows[i] = sb.start + (p.reverse ? sb.len - 1 - tau : tau);
    }
    const A *Qp, *Kp, *Vp;
    int64_t ldq, ldk, ldv;
    if (direct) {
      Qp = state_only ? nullptr : reinterpret_cast<const A*>(row_ptr(p.q, rows[0]));
      Kp = reinterpret_cast<const A*>(row_ptr(p.k, rows[0]));
      ldq = p.q.row_stride;
      ldk = p.k.row_stride;
    } else {
      for (int i = 0; i < nr; ++i) {
        const T* kr = row_ptr(p.k, rows[i]);
        for (int d = 0; d < dk; ++d) Kb[size_t(i) * dk + d] = to_acc<A>(kr[d]);
        if (!state_only) {
          const T* qr = row_ptr(p.q, rows[i]);
          for (int d = 0; d < dk; ++d) Qb[size_t(i) * dk + d] = to_acc<A>(qr[d]);
        }
      }
      Qp = Qb.data();
      Kp = Kb.data();
      ldq = ldk = dk;
    }
    if (direct_v) {
      Vp = reinterpret_cast<const A*>(row_ptr(p.v, rows[0]));
      ldv = p.v.row_stride;
    } else {
      const A vs = A(p.v_scale);
      for (int i = 0; i < nr; ++i) {
        const T* vr = row_ptr(p.v, rows[i]);
        for (int e = 0; e < dv; ++e) Vb[size_t(i) * dv + e] = vs * to_acc<A>(vr[e]);
      }
      Vp = Vb.data();
      ldv = dv;
    }
    if (!state_only) {
      cpu::gemm(false, true, nr, nr, dk, Qp, ldq, Kp, ldk, P.data(), BT, false);     // q_i . k_j
      cpu::gemm_nn(nr, dv, dk, Qp, ldq, S.data(), dv, QS.data(), dv, false);          // q_i S
      if (deriv) cpu::gemm_nn(nr, dv, dk, Qp, ldq, Tst.data(), dv, QT.data(), dv, false);  // q_i T
      if (p.o) {
        // o_i = out_scale (lambda^(i+1-pshift) q_i S + sum_{j<=i} lambda^(i-j) (q_i.k_j) v_j)
        A* Yp = Y.data();
        int64_t ldy = dv;
        if (direct_o) {
          Yp = reinterpret_cast<A*>(static_cast<T*>(p.o) + sb.b * p.o_batch_stride + rows[0] * p.o_row_stride +
                                    h * p.o_head_stride);
          ldy = p.o_row_stride;
        }
        for (int i = 0; i < nr; ++i) {
          A* wr = &W[size_t(i) * BT];
          const A* pr = &P[size_t(i) * BT];
          const A* dr = &Dm[size_t(i) * BT];
          for (int j = 0; j < nr; ++j) wr[j] = out_scale * dr[j] * pr[j];
          const A a_inter = out_scale * pw[i + 1 - pshift];
          A* yr = Yp + i * ldy;
          const A* qsr = &QS[size_t(i) * dv];
          for (int e = 0; e < dv; ++e) yr[e] = a_inter * qsr[e];
        }
        cpu::gemm_nn(nr, dv, nr, W.data(), BT, Vp, ldv, Yp, ldy, true);
        if (!direct_o)
          for (int i = 0; i < nr; ++i) {
            T* orow = static_cast<T*>(p.o) + sb.b * p.o_batch_stride + rows[i] * p.o_row_stride + h * p.o_head_stride;
            const A* yr = &Y[size_t(i) * dv];
            for (int e = 0; e < dv; ++e) orow[e] = from_acc<T, A>(yr[e]);
          }
      }
      if (deriv) {
        // y_i = d(o_i)/d(lambda) / out_scale:
        //   lambda^(i+1) q_i T + (i+1) lambda^i q_i S + sum_{j<i} (i-j) lambda^(i-j-1) (q_i.k_j) v_j
        for (int i = 0; i < nr; ++i) {
          A* wr = &W[size_t(i) * BT];
          const A* pr = &P[size_t(i) * BT];
          const A* dr = &Dd[size_t(i) * BT];
          for (int j = 0; j < nr; ++j) wr[j] = dr[j] * pr[j];
          const A a_t = pw[i + 1], a_s = A(i + 1) * pw[i];
          for (int e = 0; e < dv; ++e) Y[size_t(i) * dv + e] = a_t * QT[size_t(i) * dv + e] + a_s * QS[size_t(i) * dv + e];
        }
        cpu::gemm_nn(nr, dv, nr, W.data(), BT, Vp, ldv, Y.data(), dv, true);
        for (int i = 0; i < nr; ++i) {
          const T* dr = row_ptr(p.dout, rows[i]);
          const A* yr = &Y[size_t(i) * dv];
          double acc = 0;
          for (int e = 0; e < dv; ++e) acc += double(to_acc<A>(dr[e]) * yr[e]);
          dl += double(out_scale) * acc;
        }
      }
    }
    // State update (T first: it reads the old S). Kw holds the rows of k, weighted.
    if (deriv) {
      //   T <- lambda^nr T + nr lambda^(nr-1) S + sum_{j < nr-1} (nr-1-j) lambda^(nr-2-j) k_j^T v_j
      const A a_t = pw[nr], a_s = A(nr) * pw[nr - 1];
      for (size_t x = 0; x < Tst.size(); ++x) Tst[x] = a_t * Tst[x] + a_s * S[x];
      for (int j = 0; j < nr; ++j) {
        const A w = j + 1 < nr ? A(nr - 1 - j) * pw[nr - 2 - j] : A(0);
        const A* kr = Kp + j * ldk;
        A* wr = &Kw[size_t(j) * dk];
        for (int d = 0; d < dk; ++d) wr[d] = w * kr[d];
      }
      cpu::gemm(true, false, dk, dv, nr, Kw.data(), dk, Vp, ldv, Tst.data(), dv, true);
    }
    //   S <- lambda^(nr - pshift) S + sum_j lambda^(nr-1-j) k_j^T v_j
    const A a_s = pw[nr - pshift];
    for (auto& x : S) x *= a_s;
    for (int j = 0; j < nr; ++j) {
      const A w = pw[nr - 1 - j];
      const A* kr = Kp + j * ldk;
      A* wr = &Kw[size_t(j) * dk];
      for (int d = 0; d < dk; ++d) wr[d] = w * kr[d];
    }
    cpu::gemm(true, false, dk, dv, nr, Kw.data(), dk, Vp, ldv, S.data(), dv, true);
    pshift = 0;
  }

  if (state_only) {
    std::copy(S.begin(), S.end(), ws_slot<A>(p.seg_state, p, n, h, seg));
    if (deriv) std::copy(Tst.begin(), Tst.end(), ws_slot<A>(p.seg_tstate, p, n, h, seg));
    return;
  }
  if (seg == sp.nseg - 1) {
    if (p.final_state.ptr) {
      const A a = pw[p.final_shift - pshift];
      for (int d = 0; d < dk; ++d)
        for (int e = 0; e < dv; ++e) st<A>(p.final_state, n, h, d, e) = a * S[size_t(d) * dv + e];
    }
    if (deriv && p.dfinal.ptr) {
      double acc = 0;
      for (int d = 0; d < dk; ++d)
        for (int e = 0; e < dv; ++e) acc += double(st<A>(p.dfinal, n, h, d, e) * Tst[size_t(d) * dv + e]);
      dl += acc;
    }
  }
  if (deriv) {
    static_cast<A*>(p.dlambda_partial)[(int64_t(n) * p.num_heads + h) * p.num_segments + seg] = A(dl);
  }
}

// Entering states of segments 1.. of sequence n, head h, from the local states (in place).
template <typename A>
void run_scan(const PassParams& p, int n, int h) {
  const SeqBounds sb = seq_bounds(p, n);
  const SegmentPlan sp = lightning_segments(sb.len, p.block_t, p.num_segments);
  if (sp.nseg <= 1) return;
  const A slope = static_cast<const A*>(p.slopes)[h];
  const int64_t seg_rows = sp.chunks_per_seg * p.block_t;
  for (int d = 0; d < p.dk; ++d)
    for (int e = 0; e < p.dv; ++e) {
      const size_t x = size_t(d) * p.dv + e;
      A S = p.init.ptr ? st<A>(p.init, n, h, d, e) : A(0);
      A Tv = 0;
      int ps = p.init.ptr ? p.init_shift : 0;
      for (int s = 0; s + 1 < sp.nseg; ++s) {
        const A len = A(std::min<int64_t>(seg_rows, sb.len - s * seg_rows));
        A* Sl = ws_slot<A>(p.seg_state, p, n, h, s);
        if (p.deriv) {
          A* Tl = ws_slot<A>(p.seg_tstate, p, n, h, s);
          Tv = std::exp(-slope * len) * Tv + len * std::exp(-slope * (len - 1)) * S + Tl[x];
          Tl[x] = Tv;
        }
        S = std::exp(-slope * (len - A(ps))) * S + Sl[x];
        Sl[x] = S;
        ps = 0;
      }
    }
}

template <typename T, typename A>
void run_pass_typed(const PassParams& p) {
  const int64_t NH = int64_t(p.num_seqs) * p.num_heads;
  const int64_t nseg = p.num_segments;
  if (nseg > 1) {
    cpu::run_tasks(NH * nseg, [&](int64_t u) {
      run_unit<T, A>(p, int(u / nseg / p.num_heads), int(u / nseg % p.num_heads), int(u % nseg), true);
    });
    at::parallel_for(0, NH, 1, [&](int64_t b, int64_t e) {
      for (int64_t u = b; u < e; ++u) run_scan<A>(p, int(u / p.num_heads), int(u % p.num_heads));
    });
  }
  cpu::run_tasks(NH * nseg, [&](int64_t u) {
    run_unit<T, A>(p, int(u / nseg / p.num_heads), int(u / nseg % p.num_heads), int(u % nseg), false);
  });
}

void cpu_plan(PassParams& p, int64_t requested_block, int64_t requested_splits, int64_t total_rows) {
  p.block_t = requested_block > 0 ? int(requested_block) : kDefaultBlockT;
  p.bv = p.dv;
  p.num_slabs = 1;
  if (requested_splits > 0) {
    p.num_segments = int(requested_splits);
    return;
  }
  // Split sequences only when (sequence, head) pairs cannot keep the threads busy.
  const int64_t units = std::max<int64_t>(1, int64_t(p.num_seqs) * p.num_heads);
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t chunks = (total_rows / std::max(1, p.num_seqs) + p.block_t - 1) / p.block_t;
  int64_t nseg = 1;
  if (units < threads) nseg = std::min<int64_t>((threads + units - 1) / units, std::max<int64_t>(1, chunks / 4));
  p.num_segments = int(std::max<int64_t>(1, nseg));
}

void cpu_run(const PassParams& p) {
  switch (p.dtype) {
    case ElemType::kFloat16:
      return run_pass_typed<at::Half, float>(p);
    case ElemType::kBFloat16:
      return run_pass_typed<at::BFloat16, float>(p);
    case ElemType::kFloat32:
      return run_pass_typed<float, float>(p);
    case ElemType::kFloat64:
      return run_pass_typed<double, double>(p);
  }
}

template <typename A>
void reduce_typed(const PassParams& p, A* dslopes) {
  for (int h = 0; h < p.num_heads; ++h) {
    double acc = 0;
    for (int n = 0; n < p.num_seqs; ++n)
      for (int s = 0; s < p.num_slabs * p.num_segments; ++s)
        acc += double(static_cast<const A*>(p.dlambda_partial)[(int64_t(n) * p.num_heads + h) * p.num_slabs * p.num_segments + s]);
    const double lam = std::exp(-double(static_cast<const A*>(p.slopes)[h]));
    dslopes[h] = A(-lam * acc);
  }
}

void cpu_reduce_dslopes(const PassParams& p, void* dslopes) {
  if (p.dtype == ElemType::kFloat64) return reduce_typed<double>(p, static_cast<double*>(dslopes));
  reduce_typed<float>(p, static_cast<float*>(dslopes));
}

template <typename T, typename A>
void decode_typed(const DecodeParams& p) {
  at::parallel_for(0, int64_t(p.batch) * p.num_heads, 1, [&](int64_t b0, int64_t b1) {
    std::vector<A> o(p.dv);
    for (int64_t u = b0; u < b1; ++u) {
      const int64_t b = u / p.num_heads, h = u % p.num_heads;
      const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
      const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
      const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
      const int64_t off = u * int64_t(p.dk) * p.dv;
      const A* s_in = static_cast<const A*>(p.state_in) + off;
      A* s_out = static_cast<A*>(p.state_out) + off;
      const A lam = std::exp(-static_cast<const A*>(p.slopes)[h]);
      std::fill(o.begin(), o.end(), A(0));
      for (int d = 0; d < p.dk; ++d) {
        const A kd = to_acc<A>(k[d]), qd = to_acc<A>(q[d]);
        for (int e = 0; e < p.dv; ++e) {
          const A s = lam * s_in[int64_t(d) * p.dv + e] + kd * to_acc<A>(v[e]);
          s_out[int64_t(d) * p.dv + e] = s;
          o[e] += qd * s;
        }
      }
      T* orow = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
      for (int e = 0; e < p.dv; ++e) orow[e] = from_acc<T, A>(A(p.scale) * o[e]);
    }
  });
}

void cpu_decode(const DecodeParams& p) {
  switch (p.dtype) {
    case ElemType::kFloat16:
      return decode_typed<at::Half, float>(p);
    case ElemType::kBFloat16:
      return decode_typed<at::BFloat16, float>(p);
    case ElemType::kFloat32:
      return decode_typed<float, float>(p);
    case ElemType::kFloat64:
      return decode_typed<double, double>(p);
  }
}

const Backend& cpu_backend() {
  static const Backend be{"CPU", &cpu_plan, &cpu_run, &cpu_reduce_dslopes, &cpu_decode};
  return be;
}

}  // namespace
}  // namespace attnkit::lightning

TORCH_LIBRARY_IMPL(attnkit, CPU, m) {
  using namespace attnkit::lightning;
  m.impl("lightning_fwd", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slopes,
                             double scale, const std::optional<at::Tensor>& initial_state,
                             const std::optional<at::Tensor>& cu_seqlens, int64_t block_size, int64_t num_splits) {
    return lightning_fwd(cpu_backend(), q, k, v, slopes, scale, initial_state, cu_seqlens, block_size, num_splits);
  });
  m.impl("lightning_bwd",
         [](const at::Tensor& dout, const std::optional<at::Tensor>& dfinal_state, const at::Tensor& q,
            const at::Tensor& k, const at::Tensor& v, const at::Tensor& slopes, double scale,
            const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& cu_seqlens,
            int64_t block_size, int64_t num_splits, bool compute_dslopes) {
           return lightning_bwd(cpu_backend(), dout, dfinal_state, q, k, v, slopes, scale, initial_state, cu_seqlens,
                                block_size, num_splits, compute_dslopes);
         });
  m.impl("lightning_decode_", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& state,
                                 const at::Tensor& slopes, double scale) {
    return lightning_decode_(cpu_backend(), q, k, v, state, slopes, scale);
  });
  m.impl("lightning_decode", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& state,
                                const at::Tensor& slopes, double scale) {
    return lightning_decode(cpu_backend(), q, k, v, state, slopes, scale);
  });
}
