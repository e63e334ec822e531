// Runs attnkit's lightning attention CUDA kernels (csrc/lightning/) on the CPU through emu_cuda.h and
// checks them against a float64 recurrence written from the pass semantics of lightning_params.h.
// Build and run: tests/cuda_emu/run.sh. Exit status 0 when every case passes.
#define ATTNKIT_CUDA_EMU 1
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

#include "lightning/lightning_launch.cu"
// the pass instantiations (each its own translation unit under nvcc)
#include "lightning/inst/lightning_pass_bf16_bt32.cu"
#include "lightning/inst/lightning_pass_bf16_bt64.cu"
#include "lightning/inst/lightning_pass_f16_bt32.cu"
#include "lightning/inst/lightning_pass_f16_bt64.cu"
#include "lightning/inst/lightning_pass_f32_bt32.cu"
#include "lightning/inst/lightning_pass_f32_bt64.cu"

using namespace attnkit::lightning;

namespace {

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(gen); }
};

template <typename T>
T cvt(double x) {
  if constexpr (std::is_same_v<T, float>)
    return float(x);
  else if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(float(x));
  else
    return __float2bfloat16_rn(float(x));
}
template <typename T>
double val(T x) {
  if constexpr (std::is_same_v<T, float>)
    return x;
  else if constexpr (std::is_same_v<T, __half>)
    return __half2float(x);
  else
    return __bfloat162float(x);
}

// A [B, rows, H, D] tensor with padded strides (row stride and head stride larger than needed, and
// an optional odd element offset that defeats 16-byte vector loads).
template <typename T>
struct Seq {
  int B, rows, H, D;
  int64_t hs, rs, bs, off;
  std::vector<T> data;
  Seq(int B_, int rows_, int H_, int D_, bool odd, Rng& rng, double sd)
      : B(B_), rows(rows_), H(H_), D(D_) {
    hs = D + 8;
    rs = hs * H + 16;
    bs = rs * rows + 8;
    off = odd ? 1 : 0;
    if (odd) {  // odd strides too
      hs += 1;
      rs = hs * H + 3;
      bs = rs * rows + 5;
    }
    // up to the last element, no slack (an access past it is an AddressSanitizer finding)
    data.resize(B && rows ? size_t(off + (B - 1) * bs + (rows - 1) * rs + (H - 1) * hs + D) : size_t(off));
    for (auto& x : data) x = cvt<T>(sd * rng.normal());
  }
  T& at(int b, int r, int h, int d) { return data[size_t(off + b * bs + r * rs + h * hs + d)]; }
  SeqTensor view() const { return {data.data() + off, bs, rs, hs}; }
};

struct Case {
  std::string name;
  int dtype;  // 0 f16, 1 bf16, 2 f32
  int block_t;
  int N, H, L, dk, dv;
  std::vector<int> lens;  // varlen when non-empty (then N = lens.size())
  int splits = 1;
  int bv = 0;  // 0: the planner's choice
  bool reverse = false, init = false, deriv = false, odd = false, out = true, final_state = true;
  bool positive = false;
  bool init_t = false;  // init stored transposed ([N][H][dv][dk], as the dq pass reads S0^T)  // |q|, |k|, |v|: states grow without cancellation (fp16 range tests)
  int init_shift = 0, final_shift = 0;
  double out_scale = 1.0, v_scale = 1.0;
};

int g_fail = 0;

// max() that keeps NaN (std::max(x, NaN) would drop it).
double nmax(double a, double b) { return (std::isnan(a) || std::isnan(b)) ? NAN : (a > b ? a : b); }

void report(const std::string& what, double err, double ref_max, double rtol) {
  const double bound = rtol * std::max(1.0, ref_max);
  const bool ok = err <= bound && std::isfinite(err);
  std::printf("  %-14s max err %.3e  (|ref| %.3e, bound %.3e)  %s\n", what.c_str(), err, ref_max, bound, ok ? "ok" : "FAIL");
  if (!ok) ++g_fail;
}

template <typename T>
void run_case(const Case& cs) {
  std::printf("%s\n", cs.name.c_str());
  Rng rng(std::hash<std::string>{}(cs.name));
  const bool varlen = !cs.lens.empty();
  const int N = varlen ? int(cs.lens.size()) : cs.N, H = cs.H, dk = cs.dk, dv = cs.dv;
  std::vector<int64_t> cu(1, 0);
  for (int l : cs.lens) cu.push_back(cu.back() + l);
  const int B = varlen ? 1 : N;
  const int L = varlen ? int(cu.back()) : cs.L;
  Seq<T> q(B, L, H, dk, cs.odd, rng, 0.5), k(B, L, H, dk, cs.odd, rng, 0.5), v(B, L, H, dv, cs.odd, rng, 1.0);
  Seq<T> o(B, L, H, dv, cs.odd, rng, 0.0), dout(B, L, H, dv, cs.odd, rng, 1.0);
  for (auto& x : o.data) x = cvt<T>(-777.0);  // rows a kernel forgets stay visibly wrong
  if (cs.positive)
    for (auto* t : {&q.data, &k.data, &v.data})
      for (auto& x : *t) x = cvt<T>(std::abs(val(x)));
  std::vector<float> slopes(H), init(size_t(N) * H * dk * dv), dfinal(init.size()), fin(init.size(), -777.f);
  for (int h = 0; h < H; ++h) slopes[h] = float(std::pow(2.0, -8.0 * (h + 1) / H) * (h % 2 ? 0.3 : 3.0));
  for (auto& x : init) x = float(rng.normal());
  for (auto& x : dfinal) x = float(rng.normal());

  PassParams p{};
  p.num_seqs = N;
  p.num_heads = H;
  p.seqlen = L;
  p.cu_seqlens = varlen ? cu.data() : nullptr;
  p.dk = dk;
  p.dv = dv;
  p.reverse = cs.reverse;
  p.init_shift = cs.init_shift;
  p.final_shift = cs.final_shift;
  p.out_scale = cs.out_scale;
  p.v_scale = cs.v_scale;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  if (cs.out) {
    p.o = o.data.data() + o.off;
    p.o_batch_stride = o.bs;
    p.o_row_stride = o.rs;
    p.o_head_stride = o.hs;
  }
  p.slopes = slopes.data();
  const int64_t ss = int64_t(dk) * dv;
  if (cs.init) p.init = cs.init_t ? StateTensor{init.data(), H * ss, ss, 1, dk} : StateTensor{init.data(), H * ss, ss, dv, 1};
  if (cs.final_state) p.final_state = {fin.data(), H * ss, ss, dv, 1};
  p.deriv = cs.deriv;
  if (cs.deriv) {
    p.dout = dout.view();
    p.dfinal = {dfinal.data(), H * ss, ss, dv, 1};
  }
  p.dtype = cs.dtype == 0 ? ElemType::kFloat16 : cs.dtype == 1 ? ElemType::kBFloat16 : ElemType::kFloat32;
  const int st = plan_pass_cuda(p, cs.block_t, cs.splits, L);
  if (st != kPlanOk) {
    std::printf("  plan failed (%d)\n", st);
    ++g_fail;
    return;
  }
  if (cs.bv) {
    p.bv = cs.bv;
    p.num_slabs = (dv + cs.bv - 1) / cs.bv;
  }
  std::vector<float> seg_state, seg_tstate, dlp;
  if (p.num_segments > 1) {
    seg_state.assign(size_t(N) * H * p.num_segments * ss, -777.f);
    p.seg_state = seg_state.data();
    if (cs.deriv) {
      seg_tstate.assign(seg_state.size(), -777.f);
      p.seg_tstate = seg_tstate.data();
    }
  }
  if (cs.deriv) {
    dlp.assign(size_t(N) * H * p.num_slabs * p.num_segments, 0.f);
    p.dlambda_partial = dlp.data();
  }
  std::printf("  plan: block_t %d, bv %d, slabs %d, segments %d, smem %zu\n", p.block_t, p.bv, p.num_slabs,
              p.num_segments, pass_smem_bytes(p));
  // every output byte is written by one block (emu_cuda.h reports one written by two)
  if (cs.out) emu::watch(o.data.data(), o.data.size() * sizeof(T), "o");
  if (cs.final_state) emu::watch(fin.data(), fin.size() * 4, "final_state");
  emu::watch(seg_state.data(), seg_state.size() * 4, "seg_state");
  emu::watch(seg_tstate.data(), seg_tstate.size() * 4, "seg_tstate");
  emu::watch(dlp.data(), dlp.size() * 4, "dlambda_partial");
  const cudaError_t launched = run_pass_cuda(p, nullptr);
  emu::unwatch_all();
  if (launched != cudaSuccess) {
    std::printf("  launch failed\n");
    ++g_fail;
    return;
  }
  std::vector<float> dslopes(H, -777.f);
  if (cs.deriv) reduce_dslopes_cuda(p, dslopes.data(), nullptr);

  // Reference: the recurrence of lightning_params.h in double.
  double err_o = 0, max_o = 0, err_f = 0, max_f = 0, err_d = 0, max_d = 0;
  for (int h = 0; h < H; ++h) {
    const double lam = std::exp(-double(slopes[h]));
    double dl = 0;
    for (int n = 0; n < N; ++n) {
      const int b = varlen ? 0 : n;
      const int64_t start = varlen ? cu[n] : 0, len = varlen ? cu[n + 1] - cu[n] : L;
      std::vector<double> S(ss, 0.0), Tm(ss, 0.0), Sprev(ss);
      if (cs.init)
        for (int d = 0; d < dk; ++d)
          for (int e = 0; e < dv; ++e) {
            const int64_t at = (n * H + h) * ss + (cs.init_t ? int64_t(e) * dk + d : int64_t(d) * dv + e);
            S[int64_t(d) * dv + e] = init[at] * std::pow(lam, -cs.init_shift);
          }
      for (int64_t tau = 0; tau < len; ++tau) {
        const int row = int(start + (cs.reverse ? len - 1 - tau : tau));
        Sprev = S;
        for (int d = 0; d < dk; ++d)
          for (int e = 0; e < dv; ++e) {
            const int64_t x = int64_t(d) * dv + e;
            Tm[x] = lam * Tm[x] + Sprev[x];
            S[x] = lam * S[x] + val(k.at(b, row, h, d)) * cs.v_scale * val(v.at(b, row, h, e));
          }
        for (int e = 0; e < dv; ++e) {
          double acc = 0, acct = 0;
          for (int d = 0; d < dk; ++d) {
            acc += val(q.at(b, row, h, d)) * S[int64_t(d) * dv + e];
            acct += val(q.at(b, row, h, d)) * Tm[int64_t(d) * dv + e];
          }
          acc *= cs.out_scale;
          if (cs.out) {
            err_o = nmax(err_o, std::abs(acc - val(o.at(b, row, h, e))));
            max_o = std::max(max_o, std::abs(acc));
          }
          if (cs.deriv) dl += val(dout.at(b, row, h, e)) * cs.out_scale * acct;
        }
      }
      if (cs.final_state)
        for (int64_t x = 0; x < ss; ++x) {
          const double f = S[x] * std::pow(lam, cs.final_shift);
          err_f = nmax(err_f, std::abs(f - fin[(n * H + h) * ss + x]));
          max_f = std::max(max_f, std::abs(f));
        }
      if (cs.deriv)
        for (int64_t x = 0; x < ss; ++x) dl += dfinal[(n * H + h) * ss + x] * Tm[x];
    }
    if (cs.deriv) {  // relative per head: heads' d slopes differ by orders of magnitude
      const double ds = -lam * dl;
      err_d = nmax(err_d, std::abs(ds - dslopes[h]) / std::max(1.0, std::abs(ds)));
      max_d = 1.0;
    }
  }
  // Rows outside every sequence must stay untouched (varlen with a short last offset is not tested).
  const double rtol = cs.dtype == 2 ? 2e-5 : cs.dtype == 0 ? 4e-3 : 3e-2;
  if (cs.out) report("o", err_o, max_o, rtol);
  if (cs.final_state) report("final_state", err_f, max_f, rtol);
  if (cs.deriv) report("dslopes", err_d, max_d, rtol);
}

void run_decode_case(int dtype, int B, int H, int dk, int dv, bool in_place) {
  std::printf("decode dtype %d B %d H %d dk %d dv %d in_place %d\n", dtype, B, H, dk, dv, int(in_place));
  auto go = [&](auto tag) {
    using T = decltype(tag);
    Rng rng(1234 + dk * 7 + dv);
    Seq<T> q(B, 1, H, dk, false, rng, 1.0), k(B, 1, H, dk, false, rng, 1.0), v(B, 1, H, dv, false, rng, 1.0);
    Seq<T> o(B, 1, H, dv, false, rng, 0.0);
    std::vector<float> slopes(H), s_in(size_t(B) * H * dk * dv), s_out(s_in.size(), -777.f);
    for (int h = 0; h < H; ++h) slopes[h] = 0.1f * float(h + 1);
    for (auto& x : s_in) x = float(rng.normal());
    const std::vector<float> s0 = s_in;
    DecodeParams p{};
    p.batch = B;
    p.num_heads = H;
    p.dk = dk;
    p.dv = dv;
    p.q = q.data.data();
    p.k = k.data.data();
    p.v = v.data.data();
    p.q_batch_stride = q.bs;
    p.q_head_stride = q.hs;
    p.k_batch_stride = k.bs;
    p.k_head_stride = k.hs;
    p.v_batch_stride = v.bs;
    p.v_head_stride = v.hs;
    p.o = o.data.data();
    p.o_batch_stride = o.bs;
    p.o_head_stride = o.hs;
    p.state_in = s_in.data();
    p.state_out = in_place ? s_in.data() : s_out.data();
    p.slopes = slopes.data();
    p.scale = 0.75;
    p.dtype = dtype == 0 ? ElemType::kFloat16 : dtype == 1 ? ElemType::kBFloat16 : ElemType::kFloat32;
    emu::watch(o.data.data(), o.data.size() * sizeof(T), "o");
    emu::watch(in_place ? s_in.data() : s_out.data(), s_out.size() * 4, "state_out");
    decode_cuda(p, nullptr);
    emu::unwatch_all();
    const std::vector<float>& res = in_place ? s_in : s_out;
    double err_o = 0, max_o = 0, err_s = 0, max_s = 0;
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        const double lam = std::exp(-double(slopes[h]));
        const size_t base = (size_t(b) * H + h) * dk * dv;
        for (int e = 0; e < dv; ++e) {
          double acc = 0;
          for (int d = 0; d < dk; ++d) {
            const double s = lam * s0[base + size_t(d) * dv + e] + val(k.at(b, 0, h, d)) * val(v.at(b, 0, h, e));
            err_s = nmax(err_s, std::abs(s - res[base + size_t(d) * dv + e]));
            max_s = std::max(max_s, std::abs(s));
            acc += val(q.at(b, 0, h, d)) * s;
          }
          acc *= 0.75;
          err_o = nmax(err_o, std::abs(acc - val(o.at(b, 0, h, e))));
          max_o = std::max(max_o, std::abs(acc));
        }
      }
    const double rtol = dtype == 2 ? 2e-5 : dtype == 0 ? 2e-3 : 1e-2;
    report("o", err_o, max_o, rtol);
    report("state", err_s, max_s, 2e-5);
  };
  if (dtype == 0) go(__half{});
  if (dtype == 1) go(__nv_bfloat16{});
  if (dtype == 2) go(float{});
}

}  // namespace

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  std::vector<Case> cases;
  auto add = [&](Case c) {
    if (only.empty() || c.name.find(only) != std::string::npos) cases.push_back(c);
  };
  const char* dn[3] = {"f16", "bf16", "f32"};
  for (int dt = 0; dt < 3; ++dt)
    for (int bt : {32, 64}) {
      const std::string pre = std::string(dn[dt]) + "/bt" + std::to_string(bt) + "/";
      Case c{};
      c.dtype = dt;
      c.block_t = bt;
      c.name = pre + "fwd N2 H2 L77 dk64 dv64 init";
      c.N = 2, c.H = 2, c.L = 77, c.dk = 64, c.dv = 64, c.init = true, c.out_scale = 0.5;
      add(c);
      c = Case{};
      c.dtype = dt, c.block_t = bt;
      c.name = pre + "fwd N1 H1 L1 dk16 dv16";
      c.N = 1, c.H = 1, c.L = 1, c.dk = 16, c.dv = 16;
      add(c);
      c = Case{};
      c.dtype = dt, c.block_t = bt;
      c.name = pre + "fwd odd dims dk40 dv24 L100 splits3 odd-strides";
      c.N = 1, c.H = 2, c.L = 100, c.dk = 40, c.dv = 24, c.splits = 3, c.init = true, c.odd = true;
      add(c);
      c.name = pre + "fwd transposed init dk40 dv24 L100 splits2";
      c.splits = 2, c.odd = false, c.init_t = true;
      add(c);
      c = Case{};
      c.dtype = dt, c.block_t = bt;
      c.name = pre + "fwd dv80 (two slabs) bv16 forced dk48";
      c.N = 1, c.H = 1, c.L = 70, c.dk = 48, c.dv = 80, c.bv = 16, c.init = true;
      add(c);
      c = Case{};
      c.dtype = dt, c.block_t = bt;
      c.name = pre + "varlen lens 0 1 77 0 40 splits2 init";
      c.H = 2, c.dk = 32, c.dv = 32, c.lens = {0, 1, 77, 0, 40}, c.splits = 2, c.init = true;
      add(c);
      c = Case{};
      c.dtype = dt, c.block_t = bt;
      c.name = pre + "reverse shift1 vscale L90 splits3 (dv pass shape)";
      c.N = 2, c.H = 1, c.L = 90, c.dk = 32, c.dv = 48, c.reverse = true, c.init = true, c.init_shift = 1,
      c.final_shift = 1, c.v_scale = 0.7, c.splits = 3;
      add(c);
      c.name = pre + "reverse shift1 vscale L90 splits1";
      c.splits = 1;
      add(c);
      c = Case{};
      c.dtype = dt, c.block_t = bt;
      c.name = pre + "reverse varlen shift1 no-final";
      c.H = 1, c.dk = 16, c.dv = 32, c.lens = {5, 0, 70}, c.reverse = true, c.init = true, c.init_shift = 1,
      c.final_state = false, c.splits = 2;
      add(c);
      c = Case{};
      c.dtype = dt, c.block_t = bt;
      c.name = pre + "deriv L100 splits1";
      c.N = 2, c.H = 2, c.L = 100, c.dk = 32, c.dv = 48, c.init = true, c.deriv = true, c.out = false,
      c.final_state = false, c.out_scale = 0.5;
      add(c);
      c = Case{};
      c.dtype = dt, c.block_t = bt;
      c.name = pre + "deriv varlen splits3";
      c.H = 2, c.dk = 16, c.dv = 32, c.lens = {3, 0, 150}, c.init = true, c.deriv = true, c.out = false,
      c.final_state = false, c.splits = 3;
      add(c);
    }
  for (bool deriv : {false, true}) {  // fp16 states beyond 65504 (scaled before rounding)
    Case c{};
    c.dtype = 0, c.block_t = 64;
    c.name = std::string("f16/bt64/large states ") + (deriv ? "deriv" : "fwd");
    c.N = 1, c.H = 2, c.L = 700, c.dk = 32, c.dv = 32, c.positive = true, c.v_scale = 500.0, c.out_scale = 1e-3,
    c.deriv = deriv, c.out = !deriv, c.final_state = !deriv, c.splits = 2;
    add(c);
  }
  {
    Case c{};
    c.dtype = 1, c.block_t = 64;
    c.name = "bf16/bt64/fwd dk256 dv256 L65 planner";
    c.N = 1, c.H = 1, c.L = 65, c.dk = 256, c.dv = 256, c.init = true;
    add(c);
    c.name = "f32/bt32/fwd dk256 dv128 L40 planner";
    c.dtype = 2, c.block_t = 32, c.dv = 128, c.L = 40;
    add(c);
    c = Case{};
    c.dtype = 0, c.block_t = 64;
    c.name = "f16/bt64/deriv dk256 dv64 planner";
    c.N = 1, c.H = 1, c.L = 70, c.dk = 256, c.dv = 64, c.init = true, c.deriv = true, c.out = false,
    c.final_state = false;
    add(c);
  }
  for (const Case& c : cases) {
    if (c.dtype == 0) run_case<__half>(c);
    if (c.dtype == 1) run_case<__nv_bfloat16>(c);
    if (c.dtype == 2) run_case<float>(c);
  }
  if (only.empty() || std::string("decode").find(only) != std::string::npos) {
    for (int dt = 0; dt < 3; ++dt) {
      run_decode_case(dt, 2, 3, 64, 128, true);
      run_decode_case(dt, 1, 2, 40, 36, false);
      run_decode_case(dt, 1, 1, 16, 130, false);
      run_decode_case(dt, 1, 2, 256, 64, true);
    }
  }
  std::printf("%s: %d failure(s)\n", g_fail ? "FAILED" : "PASSED", g_fail);
  return g_fail ? 1 : 0;
}
