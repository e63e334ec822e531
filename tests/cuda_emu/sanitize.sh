#!/usr/bin/env bash
# The CUDA kernels of every op under the CPU emulator as a memory checker and a race checker.
#
#   tests/cuda_emu/sanitize.sh            the quick set: every op, small shapes
#   tests/cuda_emu/sanitize.sh FILTER     FILTER = all | flash[:CASE] | lightning[:CASE] | ops[:LABEL]
#     all: every case of every harness; flash, lightning, ops alone: that harness's part of the quick
#     set; with :CASE the cases whose name contains CASE (a label substring for ops), :* all of them
#
# Memory: the harnesses are built with -fsanitize=address,undefined -fno-sanitize-recover=all; the
# emulator gives each block exactly its dynamic shared memory (the rest of the flash harness's buffer
# is poisoned), kernels' static __shared__ arrays are globals with AddressSanitizer red zones, and the
# harnesses allocate every tensor to its exact size.
# Races: every case runs under two adversarial schedules of emu_cuda.h, with cp.async copies landing
# when issued (EMU_CP_ASYNC_EARLY=1):
#   EMU_SCHEDULE=warps     EMU_BLOCK_ORDER=fwd   warps one at a time, each up to its next block barrier
#   EMU_SCHEDULE=warps-rev EMU_BLOCK_ORDER=rev   the same, last warp first, last block first
# so a missing __syncthreads shows as a wrong result (0xCD garbage or overwritten tiles), and the
# output tensors the flash and lightning harnesses register are checked for bytes written by two
# blocks of one launch (a report and exit status 66).
# Exit status: 0 when every run passes; otherwise the number of failed runs (at most 100).
#
# Environment: PYTHON (interpreter with torch; default .venv/bin/python at the repository root),
# CXX (default g++), EMU_SANITIZE_OUT (build folder; default one per source tree under $TMPDIR).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
cxx="${CXX:-g++}"
filter="${1:-quick}"
out="${EMU_SANITIZE_OUT:-${TMPDIR:-/tmp}/attnkit_sanitize_$(printf %s "$root" | md5sum | cut -c1-10)}"
mkdir -p "$out"
san=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=65${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=65${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export EMU_CP_ASYNC_EARLY=1
failures=0
start=$SECONDS

harness=${filter%%:*}
sub=""
[[ "$filter" == *:* ]] && sub=${filter#*:}
[[ "$sub" == "*" ]] && sub=""
quick=0
[[ "$filter" == quick || "$filter" != *:* && "$filter" != all ]] && quick=1
want() { [[ "$filter" == quick || "$filter" == all || "$harness" == "$1" ]]; }
case "$harness" in quick | all | selftest | flash | lightning | ops) ;; *)
  echo "sanitize.sh: unknown filter '$filter' (all | selftest | flash[:CASE] | lightning[:CASE] | ops[:LABEL])" >&2
  exit 2
  ;;
esac

# run LABEL CMD...: the command under both schedules, the two runs side by side (each is mostly
# one busy thread: the emulator runs one warp at a time)
run() {
  local label=$1
  shift
  local scheds=(warps:fwd warps-rev:rev) pids=() rcs=() i sched order rc
  local t0=$SECONDS
  for i in 0 1; do
    sched=${scheds[$i]}
    EMU_SCHEDULE=${sched%%:*} EMU_BLOCK_ORDER=${sched#*:} "$@" >"$out/last$i.log" 2>&1 &
    pids[$i]=$!
  done
  for i in 0 1; do
    wait "${pids[$i]}"
    rcs[$i]=$?
  done
  for i in 0 1; do
    sched=${scheds[$i]}
    order=${sched#*:}
    sched=${sched%%:*}
    rc=${rcs[$i]}
    if ((rc == 0)); then
      echo "ok   $label [$sched, blocks $order] ($((SECONDS - t0))s, both schedules side by side)"
    else
      failures=$((failures + 1))
      local why="wrong result"
      ((rc == 65)) && why="AddressSanitizer/UBSan finding"
      ((rc == 66)) && why="global race finding"
      ((rc > 128)) && why="crashed (signal $((rc - 128)))"
      echo "FAIL $label [$sched, blocks $order]: $why (exit $rc); log:"
      grep -E "FAIL|ERROR|EMU SANITIZER|runtime error|SUMMARY|^    #[0-9] " "$out/last$i.log" | head -40 | sed 's/^/    /'
    fi
  done
}

build_flash() {
  local torch_dir abi common
  torch_dir="$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))')" || return 1
  abi="$("$py" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')" || return 1
  common=(-std=c++20 -g1 -pthread -D_GLIBCXX_USE_CXX11_ABI="$abi" -I"$root/csrc" -isystem "$torch_dir/include")
  # the oracle (CPU core) is not instrumented
  if [[ ! -f "$out/flash_cpu.o" || "$root/csrc/flash/flash_cpu.cpp" -nt "$out/flash_cpu.o" ]]; then
    "$cxx" "${common[@]}" -O2 -c "$root/csrc/flash/flash_cpu.cpp" -o "$out/flash_cpu.o" || return 1
  fi
  "$cxx" "${common[@]}" "${san[@]}" -O1 -Wno-unknown-pragmas -I"$here/cuda_include" -I"$here" \
    -c "$here/flash_emu_test.cpp" -o "$out/flash_emu_test.o" || return 1
  "$cxx" "${san[@]}" -pthread "$out/flash_emu_test.o" "$out/flash_cpu.o" -L"$torch_dir/lib" \
    -Wl,-rpath,"$torch_dir/lib" -ltorch_cpu -lc10 -o "$out/flash_emu_test"
}

build_lightning() {
  "$cxx" -std=c++20 -O1 -g1 -pthread "${san[@]}" -Wno-unknown-pragmas -I"$here/cuda_include" -I"$root/csrc" \
    -I"$here" "$here/lightning_emu_test.cpp" -o "$out/lightning_emu_test"
}

built() {  # built NAME STATUS
  if (($2 != 0)); then
    echo "FAIL build of $1"
    failures=$((failures + 1))
    return 1
  fi
  echo "built $1 ($((SECONDS - start))s)"
}

# the checkers themselves, on tiny kernels: each must see its planted bug
if want selftest; then
  "$cxx" -std=c++20 -O1 -g1 -pthread "${san[@]}" -I"$here/cuda_include" -I"$root/csrc" -I"$here" \
    "$here/emu_selftest.cpp" -o "$out/emu_selftest"
  if built selftest $?; then
    for sched in warps warps-rev; do
      for t in barrier:0 no-barrier:1 global-race:66 smem-overflow:65; do
        EMU_SCHEDULE=$sched "$out/emu_selftest" "${t%%:*}" >"$out/last.log" 2>&1
        rc=$?
        if ((rc == ${t#*:})); then
          echo "ok   selftest ${t%%:*} [$sched]: exit $rc as expected"
        else
          failures=$((failures + 1))
          echo "FAIL selftest ${t%%:*} [$sched]: exit $rc, expected ${t#*:}"
          head -20 "$out/last.log" | sed 's/^/    /'
        fi
      done
    done
  fi
fi

# the flash and lightning harnesses build side by side (one compiler each), logs in $out
if want flash; then
  build_flash >"$out/flash_build.log" 2>&1 &
  flash_build=$!
fi
if want lightning; then
  build_lightning >"$out/lightning_build.log" 2>&1 &
  lightning_build=$!
fi
# built_bg NAME PID LOG: waits for a background build, then as `built`, with the log's tail on failure
built_bg() {
  wait "$2"
  built "$1" $? || {
    tail -30 "$3" | sed 's/^/    /'
    return 1
  }
}

if want flash; then
  if built_bg flash "$flash_build" "$out/flash_build.log"; then
    if ((quick)); then
      # forward (three key blocks: stages refilled), delta, backward (two query blocks, fp32-atomic
      # and sliced dq), dq epilogue, several blocks per launch
      run "flash d32 Lq80 Lk150 fp16" "$out/flash_emu_test" "d32 Lq80 Lk150" fp16
      # compact query gathers (Mixture-of-Head): per-head row counts, GQA without key gathers
      run "flash d32 compact gqa4 noncausal fp16" "$out/flash_emu_test" "d32 compact gqa4 noncausal" fp16
      # split-KV forward (three splits of a windowed KV-cache decode, rows without keys) + the combine
      run "flash split3 window fp16" "$out/flash_emu_test" "split3 d64 Lq4 window both sides" fp16
    else
      run "flash ${sub:-all cases}" "$out/flash_emu_test" "$sub"
    fi
  fi
fi

if want lightning; then
  if built_bg lightning "$lightning_build" "$out/lightning_build.log"; then
    if ((quick)); then
      run "lightning bf16/bt64 fwd (pass, scan)" "$out/lightning_emu_test" "bf16/bt64/fwd odd dims dk40 dv24 L100 splits3"
      run "lightning bf16/bt32 deriv (pass, scan, dslopes)" "$out/lightning_emu_test" "bf16/bt32/deriv varlen splits3"
      run "lightning decode" "$out/lightning_emu_test" "decode"
    else
      run "lightning ${sub:-all cases}" "$out/lightning_emu_test" "$sub"
    fi
  fi
fi

if want ops; then
  asan_rt="$("$cxx" -print-file-name=libasan.so)"
  ubsan_rt="$("$cxx" -print-file-name=libubsan.so)"
  # the source tree's attnkit only where `make dev` put a built _C there; else the installed package
  pypath="${PYTHONPATH:-}"
  compgen -G "$root/python/attnkit/_C*.so" >/dev/null && pypath="$root/python"
  ops_env=(env EMU_SANITIZE=1 EMU_BUILD_DIR="$out/ops" LD_PRELOAD="$asan_rt:$ubsan_rt" PYTHONPATH="$pypath")
  mkdir -p "$out/ops"
  # the build: the first run's import (no case selected)
  "${ops_env[@]}" EMU_CASES="(build only)" "$py" "$here/run_ops_e2e.py" >"$out/ops_build.log" 2>&1
  if built "ops (sqa, routing, dma, moh op layers)" $?; then
    if ((quick)); then
      # dma_select; routing select (assign), combine + the core (attention fwd/bwd), k-means
      # assign / EMA update (the update computing its own assignment)
      run "ops dma_select" "${ops_env[@]}" EMU_CASES="dma_select causal=True ties" "$py" "$here/run_ops_e2e.py" dma
      run "ops routing" "${ops_env[@]}" \
        EMU_CASES="routing_assign torch.float16 separate+pad|routing_attention torch.bfloat16 shared=True det=False|kmeans torch.float32 computed" \
        "$py" "$here/run_ops_e2e.py" routing
      # moh: counting sort, weighted scatter, gradient gather + the core's compact gathers
      run "ops moh" "${ops_env[@]}" EMU_CASES="moh torch.float16 non-causal" "$py" "$here/run_ops_e2e.py" moh
    else
      run "ops ${sub:-all cases}" "${ops_env[@]}" EMU_CASES="$sub" "$py" "$here/run_ops_e2e.py"
    fi
  else
    tail -30 "$out/ops_build.log" | sed 's/^/    /'
  fi
fi

echo "sanitize.sh: $failures failed run(s) ($((SECONDS - start))s wall; CPU time of this shell and its children, user / system:)"
times | tail -1
exit $((failures > 100 ? 100 : failures))
