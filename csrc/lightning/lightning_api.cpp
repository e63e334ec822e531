// Lightning attention ops, device-agnostic part: checks, allocation, and the passes each op runs.
#include "lightning/lightning_api.h"

#include <algorithm>

namespace attnkit::lightning {
namespace {

ElemType elem_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return ElemType::kFloat16;
    case at::kBFloat16:
      return ElemType::kBFloat16;
    case at::kFloat:
      return ElemType::kFloat32;
    default:
      return ElemType::kFloat64;
  }
}

// fp64 inputs (CPU only) keep fp64 state and slopes; every other dtype uses fp32.
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct Problem {
  int64_t B, L, H, dk, dv;
  int64_t N;  // sequences: B, or cu_seqlens.numel() - 1
  std::optional<at::Tensor> cu64;  // int64 copy of cu_seqlens
  at::ScalarType acc;
};

void check_qkv(const Backend& be, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "q must have 4 dimensions [B, L, H, Dk] (got ", q.dim(), ")");
  TORCH_CHECK(k.dim() == 4, "k must have 4 dimensions [B, L, H, Dk] (got ", k.dim(), ")");
  TORCH_CHECK(v.dim() == 4, "v must have 4 dimensions [B, L, H, Dv] (got ", v.dim(), ")");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble,
              "q must be float16, bfloat16, float32 or float64 (got ", dt, ")");
  TORCH_CHECK(k.scalar_type() == dt, "k must have the dtype of q (", dt, "), got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == dt, "v must have the dtype of q (", dt, "), got ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "k must be on the device of q (", q.device(), "), got ", k.device());
  TORCH_CHECK(v.device() == q.device(), "v must be on the device of q (", q.device(), "), got ", v.device());
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "v must be [B, L, H, Dv] with B, L, H of q ", q.sizes(), ", got ", v.sizes());
  TORCH_CHECK(q.size(3) >= 1, "q must have a head dim (Dk) >= 1");
  TORCH_CHECK(v.size(3) >= 1, "v must have a head dim (Dv) >= 1");
  for (auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->size(3) <= 1 || t->stride(3) == 1,
                (t == &q ? "q" : t == &k ? "k" : "v"), " must be contiguous in its last dimension");
  }
  if (std::string(be.name) == "CUDA") {
    TORCH_CHECK(dt != at::kDouble, "q must be float16, bfloat16 or float32 on CUDA (got float64)");
    TORCH_CHECK(q.size(3) <= 256, "q: head dim Dk must be <= 256 on CUDA (got ", q.size(3), ")");
    TORCH_CHECK(v.size(3) <= 256, "v: head dim Dv must be <= 256 on CUDA (got ", v.size(3), ")");
  }
}

void check_slopes(const at::Tensor& slopes, const at::Tensor& q, at::ScalarType acc) {
  TORCH_CHECK(slopes.dim() == 1 && slopes.size(0) == q.size(2), "slopes must have shape [H] = [", q.size(2),
              "], got ", slopes.sizes());
  TORCH_CHECK(slopes.scalar_type() == acc, "slopes must be ", acc, " for ", q.scalar_type(), " inputs, got ",
              slopes.scalar_type());
  TORCH_CHECK(slopes.device() == q.device(), "slopes must be on the device of q (", q.device(), "), got ",
              slopes.device());
}

void check_state(const char* name, const at::Tensor& s, int64_t N, int64_t H, int64_t dk, int64_t dv,
                 at::ScalarType acc, const at::Device& dev) {
  TORCH_CHECK(s.dim() == 4 && s.size(0) == N && s.size(1) == H && s.size(2) == dk && s.size(3) == dv, name,
              " must have shape [N, H, Dk, Dv] = [", N, ", ", H, ", ", dk, ", ", dv, "], got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == acc, name, " must be ", acc, ", got ", s.scalar_type());
  TORCH_CHECK(s.device() == dev, name, " must be on the device of q (", dev, "), got ", s.device());
}

Problem check_problem(const Backend& be, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& slopes, const std::optional<at::Tensor>& initial_state,
                      const std::optional<at::Tensor>& cu_seqlens, int64_t block_size, int64_t num_splits) {
  check_qkv(be, q, k, v);
  Problem pr;
  pr.B = q.size(0);
  pr.L = q.size(1);
  pr.H = q.size(2);
  pr.dk = q.size(3);
  pr.dv = v.size(3);
  pr.acc = acc_type(q.scalar_type());
  check_slopes(slopes, q, pr.acc);
  TORCH_CHECK(block_size >= 0, "block_size must be >= 0 (0: automatic), got ", block_size);
  TORCH_CHECK(num_splits >= 0, "num_splits must be >= 0 (0: automatic), got ", num_splits);
  pr.N = pr.B;
  if (cu_seqlens.has_value()) {
    const auto& cu = *cu_seqlens;
    TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, "cu_seqlens must be 1-D [N + 1], got ", cu.sizes());
    TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong,
                "cu_seqlens must be int32 or int64, got ", cu.scalar_type());
    TORCH_CHECK(cu.device() == q.device(), "cu_seqlens must be on the device of q (", q.device(), "), got ",
                cu.device());
    TORCH_CHECK(pr.B == 1, "q must have batch size 1 when cu_seqlens is given (got ", pr.B, ")");
    pr.N = cu.numel() - 1;
    pr.cu64 = cu.to(at::kLong).contiguous();
    {
      // The values are checked on the host before any kernel runs, on every device, with the same
      // messages: for a CUDA tensor that costs one copy of the N + 1 offsets to the host (a sync).
      const at::Tensor host = pr.cu64->is_cpu() ? *pr.cu64 : pr.cu64->cpu();
      const int64_t* c = host.data_ptr<int64_t>();
      TORCH_CHECK(c[0] == 0, "cu_seqlens[0] must be 0, got ", c[0]);
      for (int64_t i = 0; i < pr.N; ++i) {
        TORCH_CHECK(c[i + 1] >= c[i], "cu_seqlens must be non-decreasing (cu_seqlens[", i + 1, "] = ", c[i + 1],
                    " < ", c[i], ")");
      }
      TORCH_CHECK(c[pr.N] == pr.L, "cu_seqlens[-1] must equal the number of rows L = ", pr.L, ", got ", c[pr.N]);
    }
  }
  if (initial_state.has_value()) {
    check_state("initial_state", *initial_state, pr.N, pr.H, pr.dk, pr.dv, pr.acc, q.device());
  }
  return pr;
}

SeqTensor seq_of(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

StateTensor state_of(const std::optional<at::Tensor>& t, bool transpose) {
  if (!t.has_value()) return {nullptr, 0, 0, 0, 0};
  const auto& s = *t;
  if (transpose) return {s.data_ptr(), s.stride(0), s.stride(1), s.stride(3), s.stride(2)};
  return {s.data_ptr(), s.stride(0), s.stride(1), s.stride(2), s.stride(3)};
}

// A pass of one problem over (q', k', v'): its dims from those tensors, every other field at its default.
PassParams pass_over(const Problem& pr, const at::Tensor& slopes, const at::Tensor& qp, const at::Tensor& kp,
                     const at::Tensor& vp) {
  PassParams p{};
  p.dk = int(kp.size(3));
  p.dv = int(vp.size(3));
  p.q = seq_of(qp);
  p.k = seq_of(kp);
  p.v = seq_of(vp);
  p.num_seqs = int(pr.N);
  p.num_heads = int(pr.H);
  p.seqlen = pr.L;
  p.cu_seqlens = pr.cu64.has_value() ? pr.cu64->data_ptr<int64_t>() : nullptr;
  p.num_segments = 1;
  p.out_scale = 1.0;
  p.v_scale = 1.0;
  p.slopes = slopes.data_ptr();
  p.dtype = elem_type(qp.scalar_type());
  return p;
}

void set_out(PassParams& p, const at::Tensor& o) {
  p.o = o.data_ptr();
  p.o_batch_stride = o.stride(0);
  p.o_row_stride = o.stride(1);
  p.o_head_stride = o.stride(2);
}

// Plans the pass, allocates its workspaces (kept alive in `keep`) and runs it.
void run_pass(const Backend& be, PassParams& p, const Problem& pr, int64_t block_size, int64_t num_splits,
              const at::TensorOptions& acc_opts, std::vector<at::Tensor>& keep) {
  be.plan(p, block_size, num_splits, pr.L);
  if (p.num_segments > 1) {
    keep.push_back(at::empty({pr.N, pr.H, p.num_segments, p.dk, p.dv}, acc_opts));
    p.seg_state = keep.back().data_ptr();
    if (p.deriv) {
      keep.push_back(at::empty({pr.N, pr.H, p.num_segments, p.dk, p.dv}, acc_opts));
      p.seg_tstate = keep.back().data_ptr();
    }
  }
  if (p.deriv) {
    keep.push_back(at::zeros({pr.N, pr.H, p.num_slabs, p.num_segments}, acc_opts));
    p.dlambda_partial = keep.back().data_ptr();
  }
  be.run(p);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lightning_fwd(const Backend& be, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& slopes, double scale,
                                                 const std::optional<at::Tensor>& initial_state,
                                                 const std::optional<at::Tensor>& cu_seqlens, int64_t block_size,
                                                 int64_t num_splits) {
  const Problem pr = check_problem(be, q, k, v, slopes, initial_state, cu_seqlens, block_size, num_splits);
  const auto acc_opts = q.options().dtype(pr.acc);
  // cu_seqlens (checked by check_problem) covers every row: each row of o is written
  at::Tensor o = at::empty({pr.B, pr.L, pr.H, pr.dv}, q.options());
  at::Tensor final_state = at::empty({pr.N, pr.H, pr.dk, pr.dv}, acc_opts);
  if (pr.N == 0 || pr.H == 0) return {o, final_state};

  PassParams p = pass_over(pr, slopes, q, k, v);
  p.out_scale = scale;
  set_out(p, o);
  p.init = state_of(initial_state, false);
  p.final_state = state_of(final_state, false);
  std::vector<at::Tensor> keep;
  run_pass(be, p, pr, block_size, num_splits, acc_opts, keep);
  return {o, final_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lightning_bwd(
    const Backend& be, const at::Tensor& dout, const std::optional<at::Tensor>& dfinal_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& slopes, double scale,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& cu_seqlens, int64_t block_size,
    int64_t num_splits, bool compute_dslopes) {
  const Problem pr = check_problem(be, q, k, v, slopes, initial_state, cu_seqlens, block_size, num_splits);
  TORCH_CHECK(dout.dim() == 4 && dout.sizes() == v.sizes(), "dout must have the shape of v ", v.sizes(), ", got ",
              dout.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "dout must have the dtype of q (", q.scalar_type(), "), got ",
              dout.scalar_type());
  TORCH_CHECK(dout.device() == q.device(), "dout must be on the device of q (", q.device(), "), got ",
              dout.device());
  TORCH_CHECK(dout.size(3) <= 1 || dout.stride(3) == 1, "dout must be contiguous in its last dimension");
  if (dfinal_state.has_value()) {
    check_state("dfinal_state", *dfinal_state, pr.N, pr.H, pr.dk, pr.dv, pr.acc, q.device());
  }
  const auto acc_opts = q.options().dtype(pr.acc);
  const bool zero_fill = pr.cu64.has_value() && q.is_cuda();
  auto make = [&](const at::Tensor& like) {
    return zero_fill ? at::zeros(like.sizes(), like.options()) : at::empty(like.sizes(), like.options());
  };
  at::Tensor dq = make(q), dk = make(k), dv = make(v);
  at::Tensor dslopes = at::zeros({pr.H}, acc_opts);
  at::Tensor dinit = at::empty({pr.N, pr.H, pr.dk, pr.dv}, acc_opts);
  if (pr.N == 0 || pr.H == 0) return {dq, dk, dv, dslopes, dinit};
  std::vector<at::Tensor> keep;

  // dq_t = scale * do_t . S_t^T: the forward recurrence over (q'=do, k'=v, v'=k) with state S^T.
  {
    PassParams p = pass_over(pr, slopes, dout, v, k);
    p.out_scale = scale;
    set_out(p, dq);
    p.init = state_of(initial_state, true);
    run_pass(be, p, pr, block_size, num_splits, acc_opts, keep);
  }
  // dS_t = lambda dS_{t+1} + scale q_t^T do_t (dS_{L-1} gets dfinal): a recurrence in reversed time with
  // k'=q, v'=scale*do and init dfinal entering with one power of lambda less (init_shift = 1).
  // dv_t = k_t . dS_t; its final state times lambda is d initial_state.
  {
    PassParams p = pass_over(pr, slopes, k, q, dout);
    p.reverse = true;
    p.init_shift = 1;
    p.final_shift = 1;
    p.v_scale = scale;
    set_out(p, dv);
    p.init = state_of(dfinal_state, false);
    p.final_state = state_of(dinit, false);
    run_pass(be, p, pr, block_size, num_splits, acc_opts, keep);
  }
  // dk_t = v_t . dS_t^T: the same reversed recurrence on the transposed state (k'=do, v'=scale*q).
  {
    PassParams p = pass_over(pr, slopes, v, dout, q);
    p.reverse = true;
    p.init_shift = 1;
    p.v_scale = scale;
    set_out(p, dk);
    p.init = state_of(dfinal_state, true);
    run_pass(be, p, pr, block_size, num_splits, acc_opts, keep);
  }
  // d slopes: forward-mode derivative of the forward pass in lambda, contracted with do and dfinal;
  // ds = dlambda * dlambda/ds = -lambda * dlambda.
  if (compute_dslopes) {
    PassParams p = pass_over(pr, slopes, q, k, v);
    p.out_scale = scale;
    p.init = state_of(initial_state, false);
    p.deriv = true;
    p.dout = seq_of(dout);
    p.dfinal = state_of(dfinal_state, false);
    run_pass(be, p, pr, block_size, num_splits, acc_opts, keep);
    be.reduce_dslopes(p, dslopes.data_ptr());
  }
  return {dq, dk, dv, dslopes, dinit};
}

namespace {

DecodeParams check_decode(const Backend& be, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& state, const at::Tensor& slopes, double scale) {
  check_qkv(be, q, k, v);
  TORCH_CHECK(q.size(1) == 1, "q must hold one step per sequence, [B, 1, H, Dk] (got ", q.sizes(), ")");
  const auto acc = acc_type(q.scalar_type());
  check_slopes(slopes, q, acc);
  check_state("state", state, q.size(0), q.size(2), q.size(3), v.size(3), acc, q.device());
  DecodeParams p{};
  p.batch = int(q.size(0));
  p.num_heads = int(q.size(2));
  p.dk = int(q.size(3));
  p.dv = int(v.size(3));
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0);
  p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0);
  p.v_head_stride = v.stride(2);
  p.slopes = slopes.data_ptr();
  p.scale = scale;
  p.dtype = elem_type(q.scalar_type());
  return p;
}

}  // namespace

at::Tensor lightning_decode_(const Backend& be, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& state, const at::Tensor& slopes, double scale) {
  DecodeParams p = check_decode(be, q, k, v, state, slopes, scale);
  TORCH_CHECK(state.is_contiguous(), "state must be contiguous for the in-place decode step");
  at::Tensor o = at::empty({q.size(0), 1, q.size(2), v.size(3)}, q.options());
  p.o = o.data_ptr();
  p.o_batch_stride = o.stride(0);
  p.o_head_stride = o.stride(2);
  p.state_in = state.data_ptr();
  p.state_out = state.data_ptr();
  if (o.numel() > 0) be.decode(p);
  return o;
}

std::tuple<at::Tensor, at::Tensor> lightning_decode(const Backend& be, const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& state,
                                                    const at::Tensor& slopes, double scale) {
  DecodeParams p = check_decode(be, q, k, v, state, slopes, scale);
  const at::Tensor state_in = state.contiguous();
  at::Tensor new_state = at::empty_like(state_in, at::MemoryFormat::Contiguous);
  at::Tensor o = at::empty({q.size(0), 1, q.size(2), v.size(3)}, q.options());
  p.o = o.data_ptr();
  p.o_batch_stride = o.stride(0);
  p.o_head_stride = o.stride(2);
  p.state_in = state_in.data_ptr();
  p.state_out = new_state.data_ptr();
  if (o.numel() > 0) be.decode(p);
  return {o, new_state};
}

}  // namespace attnkit::lightning
