#!/usr/bin/env bash
# Builds and runs the lightning CUDA kernels under the CPU emulator (no GPU needed).
# Usage: tests/cuda_emu/run.sh [substring of case names]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
out="${TMPDIR:-/tmp}/attnkit_lightning_emu"
${CXX:-g++} -std=c++20 -O1 -g -pthread -Wall -Wno-unused-function -Wno-unknown-pragmas -I"$here/cuda_include" -I"$root/csrc" -I"$here" \
  "$here/lightning_emu_test.cpp" -o "$out"
"$out" "$@"
