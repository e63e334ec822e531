// The attnkit library: one TORCH_LIBRARY block defining every schema of op_schemas.h. Implementations
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

#define ATTNKIT_OP(schema) m.def(schema);
#include "op_schemas.h"
#undef ATTNKIT_OP
}

// attnkit._C is a Python extension module only so that `import attnkit._C` loads the library;
// the ops are registered by the static initialisers above and in each op's files.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "attnkit kernels (ops live in torch.ops.attnkit)", -1,
                            nullptr};
  return PyModule_Create(&def);
}
