// Runs the flash core's CUDA kernels (csrc/flash: forward, delta, backward, dq epilogue, through the
// real dispatch flash_fwd / flash_bwd of flash_launch.cu) on the CPU emulator (emu_cuda.h, with the
// PTX primitives of common/mma.cuh from emu_mma_prims.h), and compares them with the CPU core
// (flash_cpu.cpp): the oracle is the CPU core in float64 on the same rounded inputs; the emulated
// kernels must satisfy |emu - ref64| <= 2 |cpu(same dtype) - ref64| + atol (FlashAttention's rule).
// Build and run: tests/cuda_emu/run_flash.sh [filter [fp16|bf16]]. Exit status 0 when every case passes.
#define ATTNKIT_CUDA_EMU 1
#include "emu_cuda.h"
#include "emu_mma_prims.h"

// Blocks run one at a time: the kernels' `extern __shared__` array is this one buffer.
#undef __shared__
#define __shared__
#undef __align__
#define __align__(x) __attribute__((aligned(x)))  // accepted between decl-specifiers, unlike alignas
namespace attnkit::flash {
constexpr size_t kEmuSmemBytes = 232 * 1024;
alignas(16) unsigned char smem_raw[kEmuSmemBytes];
}  // namespace attnkit::flash

#include "flash/flash_launch.cu"
#include "flash/flash_fwd_kernel.cuh"
#include "flash/flash_bwd_kernel.cuh"
#include "flash/inst/flash_bwd_hdim128_bf16.cu"
#include "flash/inst/flash_bwd_hdim128_fp16.cu"
#include "flash/inst/flash_bwd_hdim256_bf16.cu"
#include "flash/inst/flash_bwd_hdim256_fp16.cu"
#include "flash/inst/flash_bwd_hdim32_bf16.cu"
#include "flash/inst/flash_bwd_hdim32_fp16.cu"
#include "flash/inst/flash_bwd_hdim64_bf16.cu"
#include "flash/inst/flash_bwd_hdim64_fp16.cu"
#include "flash/inst/flash_bwd_hdim96_bf16.cu"
#include "flash/inst/flash_bwd_hdim96_fp16.cu"
#include "flash/inst/flash_fwd_hdim128_bf16.cu"
#include "flash/inst/flash_fwd_hdim128_fp16.cu"
#include "flash/inst/flash_fwd_hdim256_bf16.cu"
#include "flash/inst/flash_fwd_hdim256_fp16.cu"
#include "flash/inst/flash_fwd_hdim32_bf16.cu"
#include "flash/inst/flash_fwd_hdim32_fp16.cu"
#include "flash/inst/flash_fwd_hdim64_bf16.cu"
#include "flash/inst/flash_fwd_hdim64_fp16.cu"
#include "flash/inst/flash_fwd_hdim96_bf16.cu"
#include "flash/inst/flash_fwd_hdim96_fp16.cu"
#include "flash/flash_cpu.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <string>

using namespace attnkit::flash;

namespace {

// ---- tensors: 16-bit or double storage, strides in elements ----
struct Buf {
  int esize = 2;
  std::vector<unsigned char> bytes;
  void alloc(size_t n, int es) {
    esize = es;
    bytes.assign(n * es, 0);  // exactly the tensor: AddressSanitizer sees any access past it
  }
  void* ptr() { return bytes.data(); }
  size_t n() const { return bytes.size() / esize; }
};

double get(const Buf& b, size_t i, ElemType t) {
  const unsigned char* p = b.bytes.data() + i * b.esize;
  if (t == ElemType::kFloat64) {
    double d;
    std::memcpy(&d, p, 8);
    return d;
  }
  uint16_t u;
  std::memcpy(&u, p, 2);
  return t == ElemType::kFloat16 ? emu::half_bits_to_float<__half>(u) : emu::half_bits_to_float<__nv_bfloat16>(u);
}
void set(Buf& b, size_t i, ElemType t, double v) {
  unsigned char* p = b.bytes.data() + i * b.esize;
  if (t == ElemType::kFloat64) {
    std::memcpy(p, &v, 8);
  } else {
    const uint16_t u = t == ElemType::kFloat16 ? __float2half_rn(float(v)).bits : __float2bfloat16_rn(float(v)).bits;
    std::memcpy(p, &u, 2);
  }
}

struct Layout {  // [B, R, H, D] with padded head / row pitch
  int B, R, H, D;
  int64_t hs, rs, bs;
  Layout(int B_, int R_, int H_, int D_, int pad) : B(B_), R(R_), H(H_), D(D_) {
    hs = D + pad;
    rs = H * hs + pad;
    bs = R * rs + pad;
  }
  // up to the last element, no slack (an access past it is an AddressSanitizer finding)
  size_t size() const { return B && R && H && D ? at(B - 1, R - 1, H - 1, D - 1) + 1 : 0; }
  size_t at(int b, int r, int h, int d) const { return size_t(b * bs + r * rs + h * hs + d); }
};

struct Case {
  std::string name;
  int B = 1, S = 1, Lq, Lk, hq = 1, hkv = 1, D;
  bool causal = false;
  int window = -1;
  int window_right = -1;
  int bias = 0;  // 0 none, 1 row-broadcast, 2 per-row
  int bias_head_group = 1;
  bool dbias = false;
  bool kept = false;
  bool list = false;
  bool gather = false, self_mask = false, same_index = true;
  // compact query gathers (FlashParams::q_count): per (b, h) a random count of ascending positions
  // out of N = Lk query rows, keys not gathered; the list tails hold wild values that must not be read
  bool compact = false;
  int N = 0;  // physical rows of q / k with gathers
};

struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t s) : g(s) {}
  double normal() { return std::normal_distribution<double>(0, 1)(g); }
  int uniform(int n) { return int(std::uniform_int_distribution<int>(0, n - 1)(g)); }
};

// Inputs shared by every run of one case (values already rounded to the case's dtype).
struct Inputs {
  Case c;
  ElemType t;
  int hout, qg, kvg, Nq, Nk;
  Layout lq, lk, lo, ldq, ldk;
  std::vector<double> q, k, v, dout;  // in layouts lq, lk, lk, lo
  std::vector<float> bias;            // [B][nbh][rows][Lk]
  int nbh = 0, bias_rows = 0;
  std::vector<float> thr;
  std::vector<int> tie;  // [B][hkv][Lq]
  std::vector<int> qidx, kidx;  // [B][hout][S][L]
  std::vector<int> qcount;      // [B][hout] (compact)
  std::vector<int> flist, fcount, blist, bcount;
  int fmax = 0, bmax = 0, fouter = 0, bouter = 0;
  Inputs(const Case& c_, ElemType t_)
      : c(c_), t(t_), hout(std::max(c_.hq, c_.hkv)), qg(hout / c_.hq), kvg(hout / c_.hkv),
        Nq(c_.gather || c_.compact ? c_.N : c_.S * c_.Lq), Nk(c_.gather ? c_.N : c_.S * c_.Lk),
        lq(c_.B, Nq, c_.hq, c_.D, 8), lk(c_.B, Nk, c_.hkv, c_.D, 16), lo(c_.B, c_.S * c_.Lq, hout, c_.D, 8),
        ldq(c_.B, c_.S * c_.Lq, c_.hq, c_.D, 0), ldk(c_.B, c_.S * c_.Lk, c_.hkv, c_.D, 8) {}
};

// Host visibility (flash_params.h), for building tile lists and checking empty rows. No gathers.
bool visible(const Inputs& in, int b, int h, int i, int j) {
  const Case& c = in.c;
  const int shift = c.Lk - c.Lq;
  if (c.causal && j > i + shift) return false;
  if (c.window >= 0 && j < i + shift - c.window) return false;
  if (c.window_right >= 0 && j > i + shift + c.window_right) return false;
  if (c.kept) {
    float bv = 0.f;
    if (c.bias == 1) bv = in.bias[(size_t(b) * in.nbh + h / c.bias_head_group) * c.Lk + j];
    const size_t o = (size_t(b) * c.hkv + h / in.kvg) * c.Lq + i;
    if (!(bv > in.thr[o] || (bv == in.thr[o] && j <= in.tie[o]))) return false;
  }
  return true;
}

Inputs make_inputs(const Case& c, ElemType t, uint64_t seed) {
  Inputs in(c, t);
  Rng rng(seed);
  auto fill = [&](std::vector<double>& x, const Layout& l, double sd) {
    x.assign(l.size(), 0.0);
    for (int b = 0; b < l.B; ++b)
      for (int r = 0; r < l.R; ++r)
        for (int h = 0; h < l.H; ++h)
          for (int d = 0; d < l.D; ++d) {
            const float v = float(sd * rng.normal());
            x[l.at(b, r, h, d)] = t == ElemType::kFloat16 ? __half2float(__float2half_rn(v))
                                                          : __bfloat162float(__float2bfloat16_rn(v));
          }
  };
  fill(in.q, in.lq, 1.0);
  fill(in.k, in.lk, 1.0);
  fill(in.v, in.lk, 1.0);
  fill(in.dout, in.lo, 1.0);
  if (c.bias) {
    in.nbh = in.hout / c.bias_head_group;
    in.bias_rows = c.bias == 2 ? c.Lq : 1;
    in.bias.resize(size_t(c.B) * in.nbh * in.bias_rows * c.Lk);
    for (size_t i = 0; i < in.bias.size(); ++i) {
      float v = float(std::round(4.0 * rng.normal()) / 4.0);  // quantized: ties for the kept predicate
      const int j = int(i % c.Lk);
      if (c.kept && j >= 64 && j < 128 && (i / c.Lk) % 2 == 0) v -= 20.f;  // a block nobody keeps
      in.bias[i] = v;
    }
  }
  if (c.kept) {
    in.thr.resize(size_t(c.B) * c.hkv * c.Lq);
    in.tie.resize(in.thr.size());
    for (size_t o = 0; o < in.thr.size(); ++o) {
      const int i = int(o % c.Lq);
      const int b = int(o / (size_t(c.hkv) * c.Lq));
      const int hk = int((o / c.Lq) % c.hkv);
      const int h = hk * in.kvg;
      const int j = rng.uniform(c.Lk);
      in.thr[o] = c.bias == 1 ? in.bias[(size_t(b) * in.nbh + h / c.bias_head_group) * c.Lk + j] : 0.f;
      in.tie[o] = rng.uniform(c.Lk);
      if (i % 17 == 5) in.thr[o] = INFINITY;  // a row with no key
    }
  }
  if (c.gather) {
    auto make = [&](std::vector<int>& idx, int L) {
      idx.resize(size_t(c.B) * in.hout * c.S * L);
      for (size_t base = 0; base < idx.size(); base += L) {
        std::vector<int> all(c.N);
        for (int r = 0; r < c.N; ++r) all[r] = r;
        std::shuffle(all.begin(), all.end(), rng.g);
        std::sort(all.begin(), all.begin() + L);
        std::copy(all.begin(), all.begin() + L, idx.begin() + base);
      }
    };
    make(in.qidx, c.Lq);
    if (c.same_index)
      in.kidx = in.qidx;
    else
      make(in.kidx, c.Lk);
  }
  if (c.compact) {
    in.qidx.assign(size_t(c.B) * in.hout * c.Lq, -1000000);
    in.qcount.resize(size_t(c.B) * in.hout);
    for (size_t bh = 0; bh < in.qcount.size(); ++bh) {
      // one empty list, one full list, the rest random
      const int n = bh == 0 ? 0 : bh == 1 ? c.Lq : rng.uniform(c.Lq + 1);
      in.qcount[bh] = n;
      std::vector<int> all(c.N);
      for (int r = 0; r < c.N; ++r) all[r] = r;
      std::shuffle(all.begin(), all.end(), rng.g);
      std::sort(all.begin(), all.begin() + n);
      std::copy(all.begin(), all.begin() + n, in.qidx.begin() + bh * c.Lq);
    }
  }
  if (c.list) {
    const int nq = (c.Lq + 63) / 64, nk = (c.Lk + 63) / 64;
    in.fouter = nq;
    in.fmax = nk;
    in.bouter = nk;
    in.bmax = nq;
    in.flist.assign(size_t(c.B) * c.hkv * nq * nk, -1);
    in.fcount.assign(size_t(c.B) * c.hkv * nq, 0);
    in.blist.assign(size_t(c.B) * c.hkv * nk * nq, -1);
    in.bcount.assign(size_t(c.B) * c.hkv * nk, 0);
    for (int b = 0; b < c.B; ++b)
      for (int hk = 0; hk < c.hkv; ++hk) {
        std::vector<char> any(size_t(nq) * nk, 0);
        for (int g = 0; g < in.kvg; ++g)
          for (int i = 0; i < c.Lq; ++i)
            for (int j = 0; j < c.Lk; ++j)
              if (visible(in, b, hk * in.kvg + g, i, j)) any[(i / 64) * nk + j / 64] = 1;
        for (int mb = 0; mb < nq; ++mb)
          for (int nb = 0; nb < nk; ++nb)
            if (any[mb * nk + nb]) {
              const size_t fo = (size_t(b) * c.hkv + hk) * nq + mb;
              in.flist[fo * nk + in.fcount[fo]++] = nb;
            }
        for (int nb = 0; nb < nk; ++nb)
          for (int mb = 0; mb < nq; ++mb)
            if (any[mb * nk + nb]) {
              const size_t bo = (size_t(b) * c.hkv + hk) * nk + nb;
              in.blist[bo * nq + in.bcount[bo]++] = mb;
            }
      }
  }
  return in;
}

// One run's buffers in a given element type.
struct Run {
  ElemType t;
  Buf q, k, v, o, dout, dq, dk, dv;
  std::vector<float> lse, delta, dqa, dbias;
  FlashParams p{};
};

void to_buf(Buf& b, const std::vector<double>& x, ElemType t) {
  b.alloc(x.size(), t == ElemType::kFloat64 ? 8 : 2);
  for (size_t i = 0; i < x.size(); ++i) set(b, i, t, x[i]);
}

void setup(Run& r, const Inputs& in, ElemType t, bool fwd_list) {
  const Case& c = in.c;
  r.t = t;
  const int es = t == ElemType::kFloat64 ? 8 : 2;
  to_buf(r.q, in.q, t);
  to_buf(r.k, in.k, t);
  to_buf(r.v, in.v, t);
  to_buf(r.dout, in.dout, t);
  r.o.alloc(in.lo.size(), es);
  std::fill(r.o.bytes.begin(), r.o.bytes.end(), 0xEE);  // unwritten elements show up
  r.dq.alloc(in.ldq.size(), es);
  r.dk.alloc(in.ldk.size(), es);
  r.dv.alloc(in.ldk.size(), es);
  std::fill(r.dq.bytes.begin(), r.dq.bytes.end(), 0xEE);
  std::fill(r.dk.bytes.begin(), r.dk.bytes.end(), 0xEE);
  std::fill(r.dv.bytes.begin(), r.dv.bytes.end(), 0xEE);
  const int64_t rows = int64_t(c.S) * c.Lq;
  r.lse.assign(size_t(c.B) * in.hout * rows, 12345.f);
  r.delta.assign(r.lse.size(), 777.f);
  FlashParams& p = r.p;
  p = FlashParams{};
  p.batch = c.B;
  p.num_segments = c.S;
  p.seqlen_q = c.Lq;
  p.seqlen_k = c.Lk;
  p.h_q = c.hq;
  p.h_kv = c.hkv;
  p.h_out = in.hout;
  p.head_dim = c.D;
  p.q_group = in.qg;
  p.kv_group = in.kvg;
  p.q = r.q.ptr();
  p.k = r.k.ptr();
  p.v = r.v.ptr();
  p.q_batch_stride = in.lq.bs, p.q_row_stride = in.lq.rs, p.q_head_stride = in.lq.hs;
  p.k_batch_stride = in.lk.bs, p.k_row_stride = in.lk.rs, p.k_head_stride = in.lk.hs;
  p.v_batch_stride = in.lk.bs, p.v_row_stride = in.lk.rs, p.v_head_stride = in.lk.hs;
  p.o = r.o.ptr();
  p.o_batch_stride = in.lo.bs, p.o_row_stride = in.lo.rs, p.o_head_stride = in.lo.hs;
  p.lse = r.lse.data();
  p.lse_batch_stride = in.hout * rows;
  p.lse_head_stride = rows;
  p.scale = float(1.0 / std::sqrt(double(c.D)));
  p.scale_log2 = p.scale * 1.4426950408889634f;
  p.causal = c.causal;
  p.window_left = c.window;
  p.window_right = c.window_right;
  if (c.bias) {
    p.bias = in.bias.data();
    p.bias_row_stride = c.bias == 2 ? c.Lk : 0;
    p.bias_head_stride = int64_t(in.bias_rows) * c.Lk;
    p.bias_batch_stride = int64_t(in.nbh) * p.bias_head_stride;
    p.bias_head_group = c.bias_head_group;
  }
  if (c.kept) {
    p.row_thr = in.thr.data();
    p.row_tie = in.tie.data();
    p.thr_head_stride = c.Lq;
    p.thr_batch_stride = int64_t(c.hkv) * c.Lq;
  }
  if (c.list) {
    p.active_list = fwd_list ? in.flist.data() : in.blist.data();
    p.active_count = fwd_list ? in.fcount.data() : in.bcount.data();
    p.active_max = fwd_list ? in.fmax : in.bmax;
    p.num_outer_blocks = fwd_list ? in.fouter : in.bouter;
  }
  if (c.gather) {
    p.q_index = in.qidx.data();
    p.k_index = in.kidx.data();
    p.q_index_head_stride = int64_t(c.S) * c.Lq;
    p.q_index_batch_stride = in.hout * p.q_index_head_stride;
    p.k_index_head_stride = int64_t(c.S) * c.Lk;
    p.k_index_batch_stride = in.hout * p.k_index_head_stride;
  }
  if (c.compact) {
    p.q_index = in.qidx.data();
    p.q_index_head_stride = c.Lq;
    p.q_index_batch_stride = int64_t(in.hout) * c.Lq;
    p.q_count = in.qcount.data();
  }
  p.self_mask = c.self_mask;
  p.self_score = -5e4f;
  p.dout = r.dout.ptr();
  p.do_batch_stride = in.lo.bs, p.do_row_stride = in.lo.rs, p.do_head_stride = in.lo.hs;
  p.delta = r.delta.data();
  p.dq = r.dq.ptr();
  p.dq_batch_stride = in.ldq.bs, p.dq_row_stride = in.ldq.rs, p.dq_head_stride = in.ldq.hs;
  p.dk = r.dk.ptr();
  p.dk_batch_stride = in.ldk.bs, p.dk_row_stride = in.ldk.rs, p.dk_head_stride = in.ldk.hs;
  p.dv = r.dv.ptr();
  p.dv_batch_stride = in.ldk.bs, p.dv_row_stride = in.ldk.rs, p.dv_head_stride = in.ldk.hs;
  if (c.dbias) {
    const int64_t rows_b = c.bias == 2 ? c.Lq : 1;
    const int heads = c.bias == 2 ? in.hout : in.nbh;
    r.dbias.assign(size_t(c.B) * heads * rows_b * c.Lk, 0.f);
    p.dbias = r.dbias.data();
    p.dbias_row_stride = c.bias == 2 ? c.Lk : 0;
    p.dbias_head_stride = rows_b * c.Lk;
    p.dbias_batch_stride = heads * p.dbias_head_stride;
  }
  p.dtype = t;
}

void set_dq_accum(Run& r, const Inputs& in, bool split) {
  FlashParams& p = r.p;
  const int64_t slice = int64_t(in.c.B) * in.c.S * in.c.Lq * in.c.hq * in.c.D;
  p.dq_splits = split ? std::max(1, ((in.c.Lk + 63) / 64) * in.qg) : 0;
  p.dqa_split_stride = slice;
  r.dqa.assign(size_t(slice) * std::max(1, p.dq_splits), 0.f);
  p.dq_accum = r.dqa.data();
  p.dqa_head_stride = in.c.D;
  p.dqa_row_stride = int64_t(in.c.hq) * in.c.D;
  p.dqa_batch_stride = int64_t(in.c.S) * in.c.Lq * p.dqa_row_stride;
}

// ---- comparison ----
int g_failures = 0;

struct Cmp {
  std::string what;
  double worst = 0;  // max over elements of |e - r| / (2 |l - r| + atol)
  size_t n = 0, bad = 0, nan = 0;
  std::string first_bad;
  void add(double e, double r, double l, double atol, const std::string& where) {
    ++n;
    double ratio;
    if (std::isnan(e)) {
      ++nan;
      ratio = INFINITY;
    } else if (std::isinf(r) || std::isinf(e)) {
      ratio = e == r ? 0 : INFINITY;
    } else {
      ratio = std::fabs(e - r) / (2 * std::fabs(l - r) + atol);
    }
    worst = std::max(worst, ratio);
    if (ratio > 1) {
      if (bad == 0) {
        char buf[256];
        std::snprintf(buf, sizeof buf, "%s emu=%.6g ref=%.6g cpu=%.6g", where.c_str(), e, r, l);
        first_bad = buf;
      }
      ++bad;
    }
  }
  bool report(const std::string& cname) {
    const bool ok = bad == 0 && nan == 0;
    if (!ok) {
      std::printf("  FAIL %s %s: %zu / %zu bad (%zu NaN), worst ratio %.3g; first %s\n", cname.c_str(), what.c_str(),
                  bad, n, nan, worst, first_bad.c_str());
    }
    return ok;
  }
};

double tensor_max(const Buf& b, const Layout& l, ElemType t) {
  double m = 0;
  for (int bb = 0; bb < l.B; ++bb)
    for (int r = 0; r < l.R; ++r)
      for (int h = 0; h < l.H; ++h)
        for (int d = 0; d < l.D; ++d) m = std::max(m, std::fabs(get(b, l.at(bb, r, h, d), t)));
  return m;
}

bool cmp_tensor(const char* what, const std::string& cname, const Buf& e, const Buf& r, const Buf& l,
                const Layout& lay, ElemType t, double rel) {
  Cmp c{what};
  const double atol = rel * std::max(1.0, tensor_max(r, lay, ElemType::kFloat64));
  for (int b = 0; b < lay.B; ++b)
    for (int row = 0; row < lay.R; ++row)
      for (int h = 0; h < lay.H; ++h)
        for (int d = 0; d < lay.D; ++d) {
          const size_t i = lay.at(b, row, h, d);
          c.add(get(e, i, t), get(r, i, ElemType::kFloat64), get(l, i, t), atol,
                "b" + std::to_string(b) + " row" + std::to_string(row) + " h" + std::to_string(h) + " d" +
                    std::to_string(d));
        }
  return c.report(cname);
}

bool cmp_floats(const char* what, const std::string& cname, const std::vector<float>& e, const std::vector<float>& r,
                const std::vector<float>& l, double rel) {
  Cmp c{what};
  double m = 1;
  for (float x : r)
    if (std::isfinite(x)) m = std::max(m, double(std::fabs(x)));
  for (size_t i = 0; i < e.size(); ++i) c.add(e[i], r[i], l[i], rel * m, "index " + std::to_string(i));
  return c.report(cname);
}

double secs_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Compact gathers: zero the rows past each head's count (o / dq in layout l, and lse when given).
void blank_rows(const Inputs& in, Buf& x, std::vector<float>& lse, const Layout& l, ElemType t) {
  const Case& c = in.c;
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < l.H; ++h)
      for (int i = in.qcount[size_t(b) * in.hout + h]; i < c.Lq; ++i) {
        for (int d = 0; d < c.D; ++d) set(x, l.at(b, i, h, d), t, 0.0);
        if (!lse.empty()) lse[(size_t(b) * in.hout + h) * c.Lq + i] = 0.f;
      }
}

bool run_case(const Case& c, ElemType t) {
  const std::string cname = c.name + (t == ElemType::kFloat16 ? " fp16" : " bf16");
  const auto t0 = std::chrono::steady_clock::now();
  const Inputs in = make_inputs(c, t, 1234 + std::hash<std::string>{}(c.name) % 1000);
  const double rel = t == ElemType::kFloat16 ? 2e-3 : 1.6e-2;
  bool ok = true;

  // forward: oracle (float64 CPU core), CPU core in dtype, emulated kernels
  Run ref, cpu, emu;
  setup(ref, in, ElemType::kFloat64, true);
  setup(cpu, in, t, true);
  setup(emu, in, t, true);
  flash_fwd_cpu(ref.p);
  flash_fwd_cpu(cpu.p);
  // every output byte is written by one block (emu_cuda.h reports one written by two)
  emu::watch(emu.o.ptr(), emu.o.bytes.size(), "o");
  emu::watch(emu.lse.data(), emu.lse.size() * 4, "lse");
  flash_fwd(emu.p, nullptr);
  emu::unwatch_all();
  if (c.compact) {
    // rows past a head's count are not written: compare copies with those rows zeroed
    Buf eo = emu.o, ro = ref.o, co = cpu.o;
    std::vector<float> el = emu.lse, rl = ref.lse, cl = cpu.lse;
    blank_rows(in, eo, el, in.lo, t);
    blank_rows(in, ro, rl, in.lo, ElemType::kFloat64);
    blank_rows(in, co, cl, in.lo, t);
    ok &= cmp_tensor("o", cname, eo, ro, co, in.lo, t, rel);
    ok &= cmp_floats("lse", cname, el, rl, cl, 1e-4);
  } else {
    ok &= cmp_tensor("o", cname, emu.o, ref.o, cpu.o, in.lo, t, rel);
    ok &= cmp_floats("lse", cname, emu.lse, ref.lse, cpu.lse, 1e-4);
  }

  if (c.list || c.gather) {
    // split-KV forward over tile lists (kept predicate, bias) or gathered segments: 3 splits of each
    // query block's list or range, combined; a separate run so the backward below uses the unsplit o
    Run sp;
    setup(sp, in, t, true);
    const size_t rows = size_t(c.B) * in.hout * c.S * c.Lq;
    std::vector<float> o_accum(3 * rows * c.D, NAN), lse_accum(3 * rows, NAN);
    sp.p.num_splits = 3;
    sp.p.o_accum = o_accum.data();
    sp.p.lse_accum = lse_accum.data();
    emu::watch(sp.o.ptr(), sp.o.bytes.size(), "o");
    emu::watch(sp.lse.data(), sp.lse.size() * 4, "lse");
    emu::watch(o_accum.data(), o_accum.size() * 4, "o_accum");
    emu::watch(lse_accum.data(), lse_accum.size() * 4, "lse_accum");
    flash_fwd(sp.p, nullptr);
    emu::unwatch_all();
    ok &= cmp_tensor("o", cname + " [3 key splits]", sp.o, ref.o, cpu.o, in.lo, t, rel);
    ok &= cmp_floats("lse", cname + " [3 key splits]", sp.lse, ref.lse, cpu.lse, 1e-4);
  }

  // backward from each one's own forward; atomic dq, then the deterministic split dq
  for (Run* r : {&ref, &cpu, &emu}) {
    if (c.list) {
      r->p.active_list = in.blist.data();
      r->p.active_count = in.bcount.data();
      r->p.active_max = in.bmax;
      r->p.num_outer_blocks = in.bouter;
    }
    set_dq_accum(*r, in, false);
  }
  flash_bwd_cpu(ref.p);
  flash_bwd_cpu(cpu.p);
  for (int split = 0; split < 2; ++split) {
    set_dq_accum(emu, in, split == 1);
    if (c.dbias) std::fill(emu.dbias.begin(), emu.dbias.end(), 0.f);
    std::fill(emu.dq.bytes.begin(), emu.dq.bytes.end(), 0xEE);
    std::fill(emu.dk.bytes.begin(), emu.dk.bytes.end(), 0xEE);
    std::fill(emu.dv.bytes.begin(), emu.dv.bytes.end(), 0xEE);
    emu::watch(emu.dq.ptr(), emu.dq.bytes.size(), "dq");
    emu::watch(emu.dk.ptr(), emu.dk.bytes.size(), "dk");
    emu::watch(emu.dv.ptr(), emu.dv.bytes.size(), "dv");
    emu::watch(emu.delta.data(), emu.delta.size() * 4, "delta");
    if (split) emu::watch(emu.dqa.data(), emu.dqa.size() * 4, "dq slices");  // fp32 atomics otherwise
    if (c.dbias) emu::watch(emu.dbias.data(), emu.dbias.size() * 4, "dbias");
    flash_bwd(emu.p, nullptr);
    emu::unwatch_all();
    const std::string n = cname + (split ? " [split dq]" : " [atomic dq]");
    if (c.compact) {
      Buf edq = emu.dq, rdq = ref.dq, cdq = cpu.dq;
      std::vector<float> none;
      blank_rows(in, edq, none, in.ldq, t);
      blank_rows(in, rdq, none, in.ldq, ElemType::kFloat64);
      blank_rows(in, cdq, none, in.ldq, t);
      ok &= cmp_tensor("dq", n, edq, rdq, cdq, in.ldq, t, rel);
    } else {
      ok &= cmp_tensor("dq", n, emu.dq, ref.dq, cpu.dq, in.ldq, t, rel);
    }
    ok &= cmp_tensor("dk", n, emu.dk, ref.dk, cpu.dk, in.ldk, t, rel);
    ok &= cmp_tensor("dv", n, emu.dv, ref.dv, cpu.dv, in.ldk, t, rel);
    if (c.dbias) ok &= cmp_floats("dbias", n, emu.dbias, ref.dbias, cpu.dbias, rel);
  }
  std::printf("%s %s (%.1fs)\n", ok ? "ok  " : "FAIL", cname.c_str(), secs_since(t0));
  std::fflush(stdout);
  if (!ok) ++g_failures;
  return ok;
}

std::vector<Case> cases() {
  std::vector<Case> v;
  auto add = [&](Case c) { v.push_back(c); };
  {
    Case c{"d32 basic B2", 2, 1, 70, 70, 2, 2, 32};
    add(c);
  }
  {
    Case c{"d64 gqa causal Lq>Lk", 1, 1, 100, 40, 4, 2, 64};
    c.causal = true;
    add(c);
  }
  {
    Case c{"d96 reverse-gqa causal Lq<Lk", 1, 1, 40, 100, 1, 2, 96};
    c.causal = true;
    add(c);
  }
  {
    Case c{"d128 L1", 1, 1, 1, 1, 1, 1, 128};
    add(c);
  }
  {
    Case c{"d128 Lq1 causal", 1, 1, 1, 77, 2, 1, 128};
    c.causal = true;
    add(c);
  }
  {
    Case c{"d64 causal window", 1, 1, 130, 130, 1, 1, 64};
    c.causal = true;
    c.window = 20;
    add(c);
  }
  {
    Case c{"d32 window noncausal Lq<Lk", 1, 1, 50, 140, 1, 1, 32};
    c.window = 30;
    add(c);
  }
  {
    Case c{"d64 gqa bias dbias", 1, 1, 70, 90, 4, 2, 64};
    c.bias = 1;
    c.dbias = true;
    add(c);
  }
  {
    Case c{"d32 gqa bias-head-group2 dbias causal", 1, 1, 70, 90, 4, 1, 32};
    c.bias = 1;
    c.bias_head_group = 2;
    c.dbias = true;
    c.causal = true;
    add(c);
  }
  {
    Case c{"d32 per-row bias dbias", 1, 1, 70, 90, 2, 2, 32};
    c.bias = 2;
    c.dbias = true;
    add(c);
  }
  {
    Case c{"d64 kept+bias+lists gqa", 1, 1, 130, 150, 2, 1, 64};
    c.bias = 1;
    c.bias_head_group = 2;
    c.kept = true;
    c.list = true;
    c.dbias = true;
    add(c);
  }
  {
    Case c{"d32 causal lists", 1, 1, 150, 150, 1, 1, 32};
    c.causal = true;
    c.window = 40;
    c.list = true;
    add(c);
  }
  {
    Case c{"d64 gather self_mask causal S2", 1, 2, 40, 40, 2, 2, 64};
    c.gather = true;
    c.self_mask = true;
    c.causal = true;
    c.N = 100;
    add(c);
  }
  {
    Case c{"d32 gather q!=k causal S3", 2, 3, 20, 30, 1, 1, 32};
    c.gather = true;
    c.same_index = false;
    c.causal = true;
    c.N = 70;
    add(c);
  }
  {  // the smallest shape that refills the forward's K/V stages (three key blocks) and the backward's
     // Q / dO tiles (two query blocks): sanitize.sh's quick set
    Case c{"d32 Lq80 Lk150", 1, 1, 80, 150, 1, 1, 32};
    add(c);
  }
  {  // three key blocks: the forward's K/V stages are refilled while other warps may still read them
    Case c{"d32 gqa causal B2 L150", 2, 1, 150, 150, 2, 1, 32};
    c.causal = true;
    add(c);
  }
  {
    Case c{"d64 window both sides Lq<Lk", 1, 1, 150, 260, 2, 1, 64};
    c.window = 20;
    c.window_right = 70;
    add(c);
  }
  {
    Case c{"d32 window 0,0 gqa", 2, 1, 130, 130, 4, 2, 32};
    c.window = 0;
    c.window_right = 0;
    add(c);
  }
  {
    Case c{"d64 right window only Lq>Lk", 1, 1, 200, 90, 1, 2, 64};
    c.window_right = 5;
    add(c);
  }
  {
    Case c{"d32 causal window right 3", 1, 1, 140, 140, 1, 1, 32};
    c.causal = true;
    c.window = 30;
    c.window_right = 3;
    add(c);
  }
  {
    Case c{"d80 padded to 96 gqa causal window", 1, 1, 100, 130, 4, 2, 80};
    c.causal = true;
    c.window = 50;
    add(c);
  }
  {
    Case c{"d192 padded to 256 reverse-gqa", 1, 1, 70, 90, 1, 2, 192};
    add(c);
  }
  {
    Case c{"d40 padded to 64 bias dbias", 1, 1, 70, 70, 2, 2, 40};
    c.bias = 1;
    c.dbias = true;
    add(c);
  }
  {
    // Mixture-of-Head: lists of up to Lq of N = Lk tokens per head, GQA, several blocks per list
    Case c{"d64 compact gqa causal", 2, 1, 150, 200, 4, 2, 64};
    c.compact = true;
    c.causal = true;
    c.N = 200;
    add(c);
  }
  {
    Case c{"d32 compact gqa4 noncausal", 1, 1, 90, 90, 4, 1, 32};
    c.compact = true;
    c.N = 90;
    add(c);
  }
  {
    Case c{"d128 compact causal window", 1, 1, 130, 130, 2, 2, 128};
    c.compact = true;
    c.causal = true;
    c.window = 50;
    c.N = 130;
    add(c);
  }
  {
    Case c{"d256 gqa causal", 1, 1, 70, 70, 2, 1, 256};
    c.causal = true;
    add(c);
  }
  return v;
}

// ---- split-KV forward (FlashParams::num_splits > 1) on a KV cache (seqused_k per batch row) ----
struct SplitCase {
  std::string name;
  int B, Lq, Lk, hq, hkv, D;  // Lk: cache rows
  int splits;
  std::vector<int> used;  // seqused_k per batch row
  bool causal = false;
  int window = -1, window_right = -1;
};

// Oracle: the CPU core (float64, and at the dtype for the rule's eager error) one batch row at a
// time over its used keys, writing into the full-batch outputs of r.
void cpu_per_batch(Run& r, const Inputs& in, const std::vector<int>& used) {
  const FlashParams full = r.p;
  const int es = r.t == ElemType::kFloat64 ? 8 : 2;
  for (int b = 0; b < in.c.B; ++b) {
    FlashParams p = full;
    p.batch = 1;
    p.seqlen_k = used[b];
    p.q = static_cast<const unsigned char*>(full.q) + int64_t(b) * full.q_batch_stride * es;
    p.k = static_cast<const unsigned char*>(full.k) + int64_t(b) * full.k_batch_stride * es;
    p.v = static_cast<const unsigned char*>(full.v) + int64_t(b) * full.v_batch_stride * es;
    p.o = static_cast<unsigned char*>(full.o) + int64_t(b) * full.o_batch_stride * es;
    p.lse = full.lse + int64_t(b) * full.lse_batch_stride;
    flash_fwd_cpu(p);
  }
}

bool run_split_case(const SplitCase& sc, ElemType t) {
  const std::string cname = sc.name + (t == ElemType::kFloat16 ? " fp16" : " bf16");
  const auto t0 = std::chrono::steady_clock::now();
  Case c{sc.name, sc.B, 1, sc.Lq, sc.Lk, sc.hq, sc.hkv, sc.D};
  c.causal = sc.causal;
  c.window = sc.window;
  c.window_right = sc.window_right;
  const Inputs in = make_inputs(c, t, 4321 + std::hash<std::string>{}(sc.name) % 1000);
  const double rel = t == ElemType::kFloat16 ? 2e-3 : 1.6e-2;
  Run ref, cpu, emu;
  setup(ref, in, ElemType::kFloat64, true);
  setup(cpu, in, t, true);
  setup(emu, in, t, true);
  cpu_per_batch(ref, in, sc.used);
  cpu_per_batch(cpu, in, sc.used);

  std::vector<int> used = sc.used;
  emu.p.seqused_k = used.data();
  // workspaces of exactly their size, NaN-filled: a value read but never written shows
  const size_t rows = size_t(sc.B) * in.hout * sc.Lq;
  std::vector<float> o_accum(size_t(std::max(sc.splits, 1)) * rows * sc.D, NAN);
  std::vector<float> lse_accum(size_t(std::max(sc.splits, 1)) * rows, NAN);
  emu.p.num_splits = sc.splits;
  emu.p.o_accum = o_accum.data();
  emu.p.lse_accum = lse_accum.data();
  emu::watch(emu.o.ptr(), emu.o.bytes.size(), "o");
  emu::watch(emu.lse.data(), emu.lse.size() * 4, "lse");
  if (sc.splits > 1) {
    emu::watch(o_accum.data(), o_accum.size() * 4, "o_accum");
    emu::watch(lse_accum.data(), lse_accum.size() * 4, "lse_accum");
  }
  flash_fwd(emu.p, nullptr);
  emu::unwatch_all();
  bool ok = cmp_tensor("o", cname, emu.o, ref.o, cpu.o, in.lo, t, rel);
  ok &= cmp_floats("lse", cname, emu.lse, ref.lse, cpu.lse, 1e-4);
  // rows without a key: exactly o = 0 and lse = -inf
  size_t empty_rows = 0, bad_empty = 0;
  for (int b = 0; b < sc.B; ++b)
    for (int h = 0; h < in.hout; ++h)
      for (int i = 0; i < sc.Lq; ++i) {
        const size_t li = (size_t(b) * in.hout + h) * sc.Lq + i;
        if (!std::isinf(ref.lse[li])) continue;
        ++empty_rows;
        bool row_ok = emu.lse[li] == -INFINITY;
        for (int d = 0; d < sc.D; ++d) row_ok &= get(emu.o, in.lo.at(b, i, h, d), t) == 0.0;
        if (!row_ok) ++bad_empty;
      }
  if (bad_empty) std::printf("  FAIL %s: %zu of %zu rows without keys are not o = 0, lse = -inf\n", cname.c_str(), bad_empty, empty_rows);
  ok &= bad_empty == 0;
  std::printf("%s %s (%zu rows without keys, %.1fs)\n", ok ? "ok  " : "FAIL", cname.c_str(), empty_rows, secs_since(t0));
  std::fflush(stdout);
  if (!ok) ++g_failures;
  return ok;
}

std::vector<SplitCase> split_cases() {
  std::vector<SplitCase> v;
  // num_splits 1 on the same path: the unsplit kernel with seqused_k, for comparison
  v.push_back({"split1 d64 Lq1 gqa4 seqused", 3, 1, 300, 8, 2, 64, 1, {300, 0, 1}});
  v.push_back({"split2 d64 Lq1 gqa4 seqused", 3, 1, 300, 8, 2, 64, 2, {300, 0, 1}});
  {
    SplitCase c{"split3 d128 Lq4 gqa4 causal seqused", 3, 4, 320, 4, 1, 128, 3, {257, 1, 190}};
    c.causal = true;
    v.push_back(c);
  }
  {
    SplitCase c{"split7 d64 Lq4 gqa4 causal window", 2, 4, 400, 4, 1, 64, 7, {400, 130}};
    c.causal = true;
    c.window = 100;
    v.push_back(c);
  }
  {
    SplitCase c{"split3 d64 Lq4 window both sides", 3, 4, 260, 4, 1, 64, 3, {0, 1, 250}};
    c.window = 50;
    c.window_right = 10;
    v.push_back(c);
  }
  // more splits than the 4 key blocks: most splits are empty
  v.push_back({"split9>tiles d128 Lq1 gqa4", 2, 1, 200, 4, 1, 128, 9, {200, 0}});
  {
    SplitCase c{"split7 d128 Lq1 causal gqa4", 2, 1, 450, 8, 2, 128, 7, {450, 65}};
    c.causal = true;
    v.push_back(c);
  }
  // the largest split count, over 3 key blocks
  v.push_back({"split128 d64 Lq1", 1, 1, 130, 1, 1, 64, 128, {130}});
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  emu::g_smem_buffer = reinterpret_cast<char*>(smem_raw);
  emu::g_smem_buffer_size = kEmuSmemBytes;
  if (const char* e = std::getenv("EMU_CP_ASYNC_EARLY")) emu::g_cp_async_early = e[0] == '1';
  const std::string filter = argc > 1 ? argv[1] : "";
  const std::string dtypes = argc > 2 ? argv[2] : "fp16,bf16";  // e.g. "bf16": that dtype only
  int n = 0;
  for (const Case& c : cases()) {
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    for (ElemType t : {ElemType::kFloat16, ElemType::kBFloat16}) {
      if (dtypes.find(t == ElemType::kFloat16 ? "fp16" : "bf16") == std::string::npos) continue;
      run_case(c, t);
      ++n;
    }
  }
  for (const SplitCase& c : split_cases()) {
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    for (ElemType t : {ElemType::kFloat16, ElemType::kBFloat16}) {
      if (dtypes.find(t == ElemType::kFloat16 ? "fp16" : "bf16") == std::string::npos) continue;
      run_split_case(c, t);
      ++n;
    }
  }
  std::printf("%d runs, %d failed (cp.async %s)\n", n, g_failures, emu::g_cp_async_early ? "early" : "late");
  return g_failures ? 1 : 0;
}
