// Every schema of the attnkit library lives here, in one TORCH_LIBRARY block. Implementations
// register per dispatch key next to their kernels, in csrc/<op>/.
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifndef ATTNKIT_VERSION
#define ATTNKIT_VERSION "0.0.0+dev"
#endif
#ifndef ATTNKIT_CUDA_ARCHS_STR
#define ATTNKIT_CUDA_ARCHS_STR ""
#endif

namespace {

// "key=value" lines: read by attnkit.info.
std::string build_info() {
  std::string s;
  s += "version=" ATTNKIT_VERSION "\n";
#ifdef ATTNKIT_WITH_CUDA
  s += "cuda=1\n";
#else
  s += "cuda=0\n";
#endif
  s += "cuda_archs=" ATTNKIT_CUDA_ARCHS_STR "\n";
  return s;
}

}  // namespace

TORCH_LIBRARY(attnkit, m) {
  m.def("_build_info() -> str", &build_info);

  // ---- Sparse Query Attention (flash core) ----
  // q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D]; out [B, Lq, max(Hq,Hkv), D]; lse [B, max(Hq,Hkv), Lq] fp32.
  m.def("sqa_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "sqa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, float scale)"
      " -> (Tensor dq, Tensor dk, Tensor dv)");

  // ---- Lightning attention (own kernels: csrc/lightning/) ----
  // q, k [B, L, H, Dk], v [B, L, H, Dv]; slopes [H]; states [N, H, Dk, Dv] (N = B, or the number of
  // sequences of cu_seqlens with B = 1). State, slopes and accumulation are fp32 (fp64 for fp64 inputs,
  // CPU only). block_size: chunk length (0: automatic); num_splits: segments per sequence (0: automatic).
  m.def(
      "lightning_fwd(Tensor q, Tensor k, Tensor v, Tensor slopes, float scale, Tensor? initial_state,"
      " Tensor? cu_seqlens, int block_size, int num_splits) -> (Tensor o, Tensor final_state)");
  // dslopes is all zeros unless compute_dslopes; dinitial_state is always computed (it is cheap).
  m.def(
      "lightning_bwd(Tensor dout, Tensor? dfinal_state, Tensor q, Tensor k, Tensor v, Tensor slopes, float scale,"
      " Tensor? initial_state, Tensor? cu_seqlens, int block_size, int num_splits, bool compute_dslopes)"
      " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dslopes, Tensor dinitial_state)");
  // One decoding step, q/k [B, 1, H, Dk], v [B, 1, H, Dv]; state [B, H, Dk, Dv] updated in place.
  m.def("lightning_decode_(Tensor q, Tensor k, Tensor v, Tensor(a!) state, Tensor slopes, float scale) -> Tensor o");
  // The same step without mutation: returns the new state.
  m.def(
      "lightning_decode(Tensor q, Tensor k, Tensor v, Tensor state, Tensor slopes, float scale)"
      " -> (Tensor o, Tensor new_state)");
}

// attnkit._C is a Python extension module only so that `import attnkit._C` loads the library;
// the ops are registered by the static initialisers above and in each op's files.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "attnkit kernels (ops live in torch.ops.attnkit)", -1,
                            nullptr};
  return PyModule_Create(&def);
}
