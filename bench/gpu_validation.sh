#!/usr/bin/env bash
# GPU validation on a lent H100 (the device tool), in as few calls as possible. Run from the repo root:
#   call 1:  OUT=$OUT bash bench/gpu_validation.sh build-test      (build, info, full pytest, sanitizers)
#   call 2:  OUT=$OUT bash bench/gpu_validation.sh bench           (python -m attnkit.bench default suite)
# Each call re-installs (incremental when build/ was carried). Logs and JSON land in $OUT.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export MAX_JOBS=16 CMAKE_BUILD_PARALLEL_LEVEL=16 PYTHONUNBUFFERED=1
export ATTNKIT_CUDA_ARCHS=${ATTNKIT_CUDA_ARCHS:-9.0}
stage=${1:-build-test}

t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "build_s=$(($(date +%s) - t0)) sha=$(git rev-parse --short HEAD 2>/dev/null)" | tee -a "$OUT/times.txt"
python3 -m attnkit.info | tee "$OUT/info.txt"

if [ "$stage" = build-test ]; then
  t0=$(date +%s)
  python3 -m pytest -q -rs tests -p no:cacheprovider --junitxml="$OUT/junit.xml" >"$OUT/pytest.log" 2>&1
  echo "pytest_rc=$? pytest_s=$(($(date +%s) - t0))" | tee -a "$OUT/times.txt"
  tail -40 "$OUT/pytest.log"
  for tool in memcheck racecheck; do
    q=""; [ $tool = racecheck ] && q="--quick"
    t0=$(date +%s)
    compute-sanitizer --tool $tool --error-exitcode 9 python3 tests/gpu/sanitize_cases.py $q >"$OUT/$tool.log" 2>&1
    echo "$tool rc=$? s=$(($(date +%s) - t0))" | tee -a "$OUT/times.txt"
    tail -5 "$OUT/$tool.log"
  done
else
  python3 -m attnkit.bench --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | tail -80
fi
