"""Timing primitives: CUDA events with warm-up and an L2 flush between runs, or perf_counter on CPU.

Every measurement reports the median and the inter-quartile range over its repeats.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Timing:
    """Repeated measurements of one callable, in milliseconds."""

    times_ms: list[float] = field(default_factory=list)

    @property
    def reps(self) -> int:
        return len(self.times_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    def quartiles(self) -> tuple[float, float]:
        t = sorted(self.times_ms)
        if len(t) == 1:
            return t[0], t[0]
        q = statistics.quantiles(t, n=4, method="inclusive")
        return q[0], q[2]

    @property
    def iqr(self) -> float:
        q1, q3 = self.quartiles()
        return q3 - q1

    def as_dict(self) -> dict:
        q1, q3 = self.quartiles()
        return {
            "ms": self.median,
            "iqr_ms": q3 - q1,
            "q1_ms": q1,
            "q3_ms": q3,
            "min_ms": min(self.times_ms),
            "reps": self.reps,
        }


@dataclass
class TimingPolicy:
    """How long to measure: repeats are chosen so that one impl takes about ``target_s`` seconds."""

    warmup: int = 3
    min_reps: int = 5
    max_reps: int = 100
    target_s: float = 0.5
    flush_l2: bool = True

    @classmethod
    def for_device(cls, device: str, quick: bool = False) -> "TimingPolicy":
        if device == "cuda":
            if quick:
                return cls(warmup=2, min_reps=3, max_reps=20, target_s=0.1)
            return cls(warmup=3, min_reps=5, max_reps=100, target_s=0.5)
        # CPU: no L2 flush (caches are small next to the working sets timed here and flushing is slow
        # on a 2-core box), fewer repeats so the default suite stays inside its time budget.
        if quick:
            return cls(warmup=1, min_reps=2, max_reps=5, target_s=0.02, flush_l2=False)
        return cls(warmup=1, min_reps=3, max_reps=20, target_s=0.1, flush_l2=False)


class L2Flusher:
    """Writes a buffer twice the size of the GPU's L2 cache, so no run starts with a warm cache."""

    def __init__(self, device: torch.device):
        size = 256 << 20
        try:
            props = torch.cuda.get_device_properties(device)
            l2 = int(getattr(props, "L2_cache_size", 0) or 0)
            if l2 > 0:
                size = max(2 * l2, 8 << 20)
        except Exception:  # pragma: no cover - only without a usable GPU
            pass
        self.buf = torch.empty(size, dtype=torch.int8, device=device)

    def __call__(self) -> None:
        self.buf.zero_()


def _reps(policy: TimingPolicy, est_s: float) -> int:
    """Enough repeats to fill ``target_s``, within [min_reps, max_reps]; calls slower than 10 x target_s
    get 3 repeats (a median of 3 is still robust to one outlier)."""
    if est_s > 10 * policy.target_s:
        return min(3, policy.min_reps)
    return int(min(max(policy.target_s / est_s, policy.min_reps), policy.max_reps))


def time_cuda(fn: Callable[[], object], policy: TimingPolicy, flusher: L2Flusher | None) -> Timing:
    """CUDA events around each call; the flush runs between the events, outside the measured span."""
    t0 = time.perf_counter()
    for _ in range(max(policy.warmup, 1)):
        fn()
        torch.cuda.synchronize()
        if time.perf_counter() - t0 > policy.target_s:  # slow calls need less warming up
            break
    # estimate one call to size the number of repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if flusher is not None:
        flusher()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est_s = max(start.elapsed_time(end) / 1e3, 1e-6)
    reps = _reps(policy, est_s)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flusher is not None and policy.flush_l2:
            flusher()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return Timing([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_cpu(fn: Callable[[], object], policy: TimingPolicy) -> Timing:
    """time.perf_counter around each call; the warm-up run also sizes the number of repeats."""
    est_s = None
    for _ in range(max(policy.warmup, 1)):
        t0 = time.perf_counter()
        fn()
        est_s = time.perf_counter() - t0
    reps = _reps(policy, max(est_s or 1e-6, 1e-6))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(times)


def measure(fn: Callable[[], object], device: str, policy: TimingPolicy, flusher: L2Flusher | None = None) -> Timing:
    if device == "cuda":
        return time_cuda(fn, policy, flusher)
    return time_cpu(fn, policy)


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Peak memory allocated by one call beyond what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)
