// Dynamic task scheduling on torch's intra-op threads for the CPU kernels.
//
// at::parallel_for (OpenMP backend) splits a range statically: with a few tasks per thread, one
// thread that is slowed down (a busier core, a VM's stolen time, a longer task) holds up the whole
// call. Here the tasks go out in index order from a shared counter instead, so a thread that
// finishes early takes the next one.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "common/cpu_gemm.h"

namespace attnkit::cpu {

// Runs body(scratch, t) for every t in [0, n); each thread makes its scratch once with
// make_scratch(), and its BLAS calls stay on that thread (SingleThreadBlas).
template <typename MakeScratch, typename Body>
void run_tasks(int64_t n, MakeScratch&& make_scratch, Body&& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const SingleThreadBlas single_thread_blas;
    auto scratch = make_scratch();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) body(scratch, t);
  });
}

// run_tasks without scratch: body(t).
template <typename Body>
void run_tasks(int64_t n, Body&& body) {
  run_tasks(n, [] { return 0; }, [&](int, int64_t t) { body(t); });
}

}  // namespace attnkit::cpu
