// run_ops_e2e.py, the op layer: csrc/sqa/sqa_cuda.cpp, csrc/routing/routing_cuda.cpp and
// csrc/dma/dma_cuda.cpp (the CUDA registrations, unchanged) compiled against stand-in c10/cuda and cub
// headers (ops_include/) and registered as torch ops of the library "attnkit_emu" on CPU tensors;
// their kernels run on the CPU emulator (emu_ops_flash.cpp, emu_ops_routing_*.cpp, emu_ops_kmeans.cpp,
// emu_ops_dma_select.cpp). Schemas are those of csrc/torch_bindings.cpp.
#include <torch/all.h>
#include <torch/library.h>

#include "common/checks.h"
#include "dma/dma_host.h"
#include "flash/flash_api.h"
#include "routing/routing_host.h"
#include "sqa/sqa_checks.h"

// The CUDA registrations check that their inputs live on the GPU: here they are CPU tensors.
#define is_cuda() is_cpu()
// Each file's TORCH_LIBRARY_IMPL(attnkit, CUDA, m) block becomes a function called below.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) static void EMU_REGISTER(torch::Library& m)

#define EMU_REGISTER register_sqa
#include "sqa/sqa_cuda.cpp"
#undef EMU_REGISTER
#define EMU_REGISTER register_routing
#include "routing/routing_cuda.cpp"
#undef EMU_REGISTER
#define EMU_REGISTER register_dma
#include "dma/dma_cuda.cpp"
#undef EMU_REGISTER

TORCH_LIBRARY(attnkit_emu, m) {
  m.def("sqa_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "sqa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, float scale)"
      " -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "routing_assign(Tensor q, Tensor? k, Tensor centroids, int window, bool shared_qk, bool with_assign=False,"
      " Tensor? key_padding_mask=None) -> (Tensor q_idx, Tensor k_idx, Tensor assign)");
  m.def(
      "routing_fwd(Tensor q, Tensor k, Tensor v, Tensor? q_idx, Tensor? k_idx, Tensor? key_padding_mask,"
      " bool causal, int window_left, bool self_mask, float scale, bool deterministic=True)"
      " -> (Tensor out, Tensor out_seg, Tensor lse)");
  m.def(
      "routing_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? q_idx, Tensor? k_idx,"
      " Tensor? key_padding_mask, Tensor out_seg, Tensor lse, bool causal, int window_left, bool self_mask,"
      " float scale, bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("kmeans_assign(Tensor x, Tensor centroids) -> Tensor");
  m.def("kmeans_ema_update_(Tensor(a!) centroids, Tensor x, Tensor? assign, float decay) -> ()");
  m.def(
      "dma_select(Tensor bias, int keep, int lq, bool causal)"
      " -> (Tensor thr, Tensor tie, Tensor fwd_list, Tensor fwd_count, Tensor bwd_list, Tensor bwd_count)");
  m.def(
      "dma_fwd(Tensor q, Tensor k, Tensor v, Tensor bias, Tensor thr, Tensor tie, Tensor? fwd_list,"
      " Tensor? fwd_count, Tensor? bwd_list, Tensor? bwd_count, bool causal, float scale)"
      " -> (Tensor out, Tensor lse)");
  m.def(
      "dma_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor bias, Tensor out, Tensor lse, Tensor thr,"
      " Tensor tie, Tensor? bwd_list, Tensor? bwd_count, bool causal, float scale)"
      " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
  m.def(
      "masked_bias_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? attn_bias, bool causal,"
      " float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "masked_bias_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? attn_bias,"
      " Tensor out, Tensor lse, bool causal, float scale, bool need_dbias)"
      " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
  register_sqa(m);
  register_dma(m);
  register_routing(m);
}
