// Lightning attention (TransNormerLLM): parameters of the one kernel primitive, the "chunk pass".
// Torch-free POD, shared by the CPU implementation and the CUDA kernels.
//
// Semantics of a chunk pass, per sequence n and head h, with lambda = exp(-slope[h]) and the
// sequence visited in pass time tau = 0 .. len-1 (row(tau) = tau, or len-1-tau when `reverse`):
//
//   S_tau  = lambda * S_{tau-1} + k'[row]^T v'[row]          (dk x dv, fp32; v' = v_scale * v)
//   S_{-1} = lambda^(-init_shift) * init                     (init = 0 when null)
//   o'[row] = out_scale * q'[row] . S_tau                     (written when o is set)
//   final  = lambda^final_shift * S_{len-1}                   (written when final_state is set)
//
// A negative power of lambda never appears: every use of init carries at least lambda^1.
// Derivative mode (`deriv`, init_shift = final_shift = 0) also carries T = dS/dlambda,
//   T_tau = lambda * T_{tau-1} + S_{tau-1},   T_{-1} = 0,
// and accumulates  dlambda = sum_tau dout[row] . (out_scale * q'[row] . T_tau) + <dfinal, T_{len-1}>
// into dlambda_partial (one float per block; the caller sums them). o is not written then.
//
// The ops are compositions of passes (see lightning_api.cpp):
//   forward   q'=q,  k'=k,  v'=v,            init=S0,        -> o, final
//   dq        q'=do, k'=v,  v'=k,            init=S0^T       -> dq
//   dv (rev)  q'=k,  k'=q,  v'=scale*do,     init=dfinal, shifts 1 -> dv, d initial_state
//   dk (rev)  q'=v,  k'=do, v'=scale*q,      init=dfinal^T, shift 1 -> dk
//   d slopes  derivative mode over (q, k, v, do, dfinal)
//
// Chunks: pass time is cut into chunks of `block_t` rows. Sequence splitting: the chunks of one
// sequence are spread over `num_segments` segments of ceil(nchunks / num_segments) chunks. With more
// than one segment, a state-only phase writes each segment's local state (from zero) to seg_state,
// a scan turns those into each segment's entering state, and the main phase starts every segment
// from its entering state. See lightning_segments() below for the exact split.
#pragma once
#include <cstdint>

#include "common/elem_type.h"

#if defined(__CUDACC__)
#define LT_HOST_DEVICE __host__ __device__
#else
#define LT_HOST_DEVICE
#endif

namespace attnkit::lightning {

using ::attnkit::ElemType;

// A [rows, heads, dim] activation (batch folded into rows when cu_seqlens is used).
struct SeqTensor {
  const void* ptr;
  int64_t batch_stride, row_stride, head_stride;  // in elements; the last dim is contiguous
};

// A per-(sequence, head) matrix of the accumulation type (fp32; fp64 for fp64 inputs, CPU only):
// element (r, c) of sequence n, head h lives at
// ptr[n * n_stride + h * h_stride + r * r_stride + c * c_stride]. Transposes are stride swaps.
struct StateTensor {
  void* ptr;
  int64_t n_stride, h_stride, r_stride, c_stride;
};

struct PassParams {
  // ---- shapes ----
  int num_seqs;   // N: batch, or number of sequences when cu_seqlens is set
  int num_heads;  // H
  int64_t seqlen; // rows per batch entry when cu_seqlens is null
  const int64_t* cu_seqlens;  // [N + 1] row offsets (batch must be 1), or null
  int dk;         // contraction dim of q' and k'
  int dv;         // dim of v' and o'
  int block_t;    // chunk length
  int num_segments;

  // ---- pass shape ----
  bool reverse;
  int init_shift;   // 0 or 1
  int final_shift;  // 0 or 1 (>= init_shift)
  double out_scale;  // (the CUDA kernels round both to fp32)
  double v_scale;

  // ---- tensors ----
  SeqTensor q, k, v;  // q' [*, dk], k' [*, dk], v' [*, dv]
  void* o;            // o' [*, dv], same strides as o_* below; null: not written
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  const void* slopes;   // [H], accumulation type
  StateTensor init;     // (dk x dv) per (n, h); ptr null: zeros
  StateTensor final_state;  // ptr null: not written

  // ---- sequence splitting workspace (num_segments > 1) ----
  // [N][H][num_segments][dk][dv] fp32, contiguous. Local states from the state-only phase; the scan
  // overwrites slot s with the entering state of segment s + 1.
  void* seg_state;
  void* seg_tstate;  // same, for T (derivative mode)

  // ---- derivative mode ----
  bool deriv;
  SeqTensor dout;         // [*, dv], layout of o'
  StateTensor dfinal;     // (dk x dv); ptr null: zeros
  void* dlambda_partial;  // [N][H][num_slabs][num_segments], accumulation type

  ElemType dtype;  // of q', k', v', o', dout

  // ---- set by the backend's planner ----
  int bv;         // o' columns per block (CUDA: a multiple of 16 <= 64; CPU: dv)
  int num_slabs;  // ceil(dv / bv)
};

// One decoding step per (b, h): S <- lambda * S + k^T v;  o = scale * q . S.
// q, k: [B, 1, H, dk]; v, o: [B, 1, H, dv]; states [B, H, dk, dv] contiguous, accumulation type.
// state_in may equal state_out (in place).
struct DecodeParams {
  int batch, num_heads, dk, dv;
  const void* q;
  const void* k;
  const void* v;
  int64_t q_batch_stride, q_head_stride;
  int64_t k_batch_stride, k_head_stride;
  int64_t v_batch_stride, v_head_stride;
  void* o;
  int64_t o_batch_stride, o_head_stride;
  const void* state_in;
  void* state_out;
  const void* slopes;
  double scale;
  ElemType dtype;
};

// Split of one sequence of `len` rows into chunks and segments. Every (sequence, head) has at least
// one segment (an empty sequence has one segment of zero chunks: it still writes its final state).
struct SegmentPlan {
  int64_t nchunks;
  int64_t chunks_per_seg;
  int nseg;  // segments in use, 1 .. num_segments
};

LT_HOST_DEVICE inline SegmentPlan lightning_segments(int64_t len, int block_t, int num_segments) {
  SegmentPlan p;
  p.nchunks = (len + block_t - 1) / block_t;
  int64_t ns = num_segments < 1 ? 1 : num_segments;
  p.chunks_per_seg = p.nchunks == 0 ? 1 : (p.nchunks + ns - 1) / ns;
  p.nseg = p.nchunks == 0 ? 1 : int((p.nchunks + p.chunks_per_seg - 1) / p.chunks_per_seg);
  return p;
}

}  // namespace attnkit::lightning
