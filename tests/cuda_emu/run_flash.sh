#!/usr/bin/env bash
# Builds and runs the flash core's CUDA kernels (csrc/flash) under the CPU emulator (no GPU needed),
# against the CPU core (flash_cpu.cpp, linked with libtorch for at::parallel_for / c10).
# Usage: tests/cuda_emu/run_flash.sh [substring of case names]
#   EMU_CP_ASYNC_EARLY=1: cp.async copies land when issued instead of at the covering wait_group.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
py="${PYTHON:-$root/.venv/bin/python}"
torch_dir="$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
abi="$("$py" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
out="${TMPDIR:-/tmp}/attnkit_flash_emu"
mkdir -p "$out"
cxx="${CXX:-g++}"
common=(-std=c++20 -g -pthread -D_GLIBCXX_USE_CXX11_ABI="$abi" -I"$root/csrc" -isystem "$torch_dir/include")
# the CPU core (rebuilt only when it changed)
if [[ ! -f "$out/flash_cpu.o" || "$root/csrc/flash/flash_cpu.cpp" -nt "$out/flash_cpu.o" ]]; then
  "$cxx" "${common[@]}" -O2 -c "$root/csrc/flash/flash_cpu.cpp" -o "$out/flash_cpu.o"
fi
# the emulated kernels: the stand-in CUDA headers come first on the include path
"$cxx" "${common[@]}" -O1 -Wall -Wno-unused-function -Wno-unknown-pragmas -Wno-sign-compare -I"$here/cuda_include" -I"$here" \
  -c "$here/flash_emu_test.cpp" -o "$out/flash_emu_test.o"
"$cxx" -pthread "$out/flash_emu_test.o" "$out/flash_cpu.o" -L"$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" \
  -ltorch_cpu -lc10 -o "$out/flash_emu_test"
"$out/flash_emu_test" "$@"
