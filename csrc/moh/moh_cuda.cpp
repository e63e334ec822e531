// Mixture-of-Head attention, CUDA: the counting sort (moh_route.cu), the flash core with compact query
// gathers, and the row moves (moh_move.cu); TORCH_LIBRARY_IMPL(attnkit, CUDA).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>

#include <limits>

#include "flash/flash.h"
#include "flash/flash_api.h"
#include "moh/moh_api.h"
#include "moh/moh_cuda.h"

namespace attnkit::moh {
namespace {

MoveParams move_params(const at::Tensor& idx, const at::Tensor& slot, const at::Tensor* weight, int64_t hq,
                       int64_t D, const at::Tensor& src, const at::Tensor& dst) {
  MoveParams m{};
  m.batch = int(idx.size(0));
  m.seqlen = int(idx.size(1));
  m.top_k = int(idx.size(2));
  m.h_q = int(hq);
  m.head_dim = int(D);
  m.head_idx = idx.data_ptr<int>();
  m.slot = slot.data_ptr<int>();
  m.weight = weight ? weight->data_ptr<float>() : nullptr;
  m.src = src.data_ptr();
  m.src_batch_stride = src.stride(0);
  m.src_row_stride = src.stride(1);
  m.src_head_stride = src.stride(2);
  m.dst = dst.data_ptr();
  m.dst_batch_stride = dst.stride(0);
  m.dst_row_stride = dst.stride(1);
  m.dst_head_stride = dst.stride(2);
  m.dtype = flash::elem_type_of(src.scalar_type());
  return m;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moh_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& head_idx,
    const at::Tensor& head_weight, bool causal, double scale) {
  check_inputs(q_in, k_in, v_in, head_idx, head_weight, /*for_cuda_kernel=*/true, /*check_values=*/true);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  const int64_t B = q.size(0), L = q.size(1), hq = q.size(2), D = q.size(3);
  const at::Tensor idx = index_i32(head_idx), w = weight_f32(head_weight);
  const auto iopt = idx.options();

  RouteParams r{};
  r.batch = int(B);
  r.seqlen = int(L);
  r.h_q = int(hq);
  r.top_k = int(idx.size(2));
  r.num_chunks = int((L + kRouteChunk - 1) / kRouteChunk);
  at::Tensor bits = at::empty({B, r.num_chunks, hq, kRouteChunk / 32}, iopt);
  at::Tensor chunk_off = at::empty({B, hq, r.num_chunks}, iopt);
  at::Tensor q_index = at::full({B, hq, L}, -1, iopt), q_count = at::empty({B, hq}, iopt), slot = at::empty_like(idx);
  r.head_idx = idx.data_ptr<int>();
  r.bits = reinterpret_cast<uint32_t*>(bits.data_ptr<int>());
  r.chunk_off = chunk_off.data_ptr<int>();
  r.q_index = q_index.data_ptr<int>();
  r.q_count = q_count.data_ptr<int>();
  r.slot = slot.data_ptr<int>();
  launch_route(r, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  flash::FlashParams p = core_params(q, k, v, q_index, q_count, causal, scale);
  auto [out_slot, lse_slot] = alloc_slot_outputs(q);
  flash::set_output(p, out_slot, lse_slot);
  flash::flash_fwd(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor out = at::zeros({B, L, hq, D}, q.options());
  at::Tensor lse = at::full({B, hq, L}, -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat));
  MoveParams m = move_params(idx, slot, &w, hq, D, out_slot, out);
  m.lse_src = lse_slot.data_ptr<float>();
  m.lse_dst = lse.data_ptr<float>();
  launch_scatter(m, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse, out_slot, lse_slot, q_index, q_count, slot};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moh_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& head_idx, const at::Tensor& head_weight, const at::Tensor& out_slot, const at::Tensor& lse_slot,
    const at::Tensor& q_index, const at::Tensor& q_count, const at::Tensor& slot, bool causal, double scale) {
  check_inputs(q_in, k_in, v_in, head_idx, head_weight, /*for_cuda_kernel=*/true, /*check_values=*/false);
  check_bwd_inputs(dout_in, q_in, out_slot, lse_slot, q_index, q_count, slot, head_idx);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor q = flash::cuda_aligned(q_in), k = flash::cuda_aligned(k_in), v = flash::cuda_aligned(v_in);
  const int64_t B = q.size(0), L = q.size(1), hq = q.size(2), D = q.size(3);
  const at::Tensor idx = index_i32(head_idx), w = weight_f32(head_weight);
  const at::Tensor dout = dout_in.contiguous();

  // dO = w dY into slot space, dweight = <dY, O> in the same pass
  at::Tensor dout_slot = at::empty({B, L, hq, D}, q.options());
  at::Tensor dweight = at::empty(idx.sizes(), q.options().dtype(at::kFloat));
  MoveParams g = move_params(idx, slot, &w, hq, D, dout, dout_slot);
  g.aux = out_slot.data_ptr();
  g.aux_batch_stride = out_slot.stride(0);
  g.aux_row_stride = out_slot.stride(1);
  g.aux_head_stride = out_slot.stride(2);
  g.dweight = dweight.data_ptr<float>();
  launch_gather_grad(g, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  flash::FlashParams p = core_params(q, k, v, q_index, q_count, causal, scale);
  at::Tensor dq_slot = at::empty({B, L, hq, D}, q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options()), dv = at::empty(v.sizes(), v.options());
  flash::set_output(p, out_slot, lse_slot);
  flash::set_backward(p, dout_slot, dq_slot, dk, dv);
  at::Tensor delta = at::empty(lse_slot.sizes(), lse_slot.options());
  at::Tensor dq_accum = flash::alloc_dq_accum(p, q.options(), /*deterministic=*/false);
  flash::set_workspaces(p, delta, dq_accum);
  flash::flash_bwd(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor dq = at::zeros({B, L, hq, D}, q.options());
  launch_scatter(move_params(idx, slot, nullptr, hq, D, dq_slot, dq), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv, dweight.to(head_weight.scalar_type())};
}

}  // namespace
}  // namespace attnkit::moh

TORCH_LIBRARY_IMPL(attnkit, CUDA, m) {
  m.impl("moh_fwd", &attnkit::moh::moh_fwd_cuda);
  m.impl("moh_bwd", &attnkit::moh::moh_bwd_cuda);
}
