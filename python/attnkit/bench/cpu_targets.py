"""The CPU path's performance targets, evaluated at the end of a CPU run of ``python -m attnkit.bench``.

Three kinds of rows:
- *speed*: attnkit's time against the baseline a CPU user would otherwise call, read from the cases
  the suite has just timed (the same numbers as the table's speedup column);
- *threads*: attnkit's time on the op's target case with all of torch's threads against one thread,
  timed here (the scaling the CPU kernels get from ``at::parallel_for``);
- *reference*: the same ratio for one large fp32 ``torch.mm`` (torch's BLAS), timed the same way and
  without a goal. It is what this machine gives compute-bound code at the time of the run: on a
  shared VM it drifts between runs, and a thread row near its goal reads against it.

Each row carries its goal, so a regression reads as MISS in the printout, results.json and table.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .timing import measure


@dataclass(frozen=True)
class SpeedTarget:
    label: str
    op: str
    variant: str
    L: int
    mode: str
    baseline: str
    goal: float  # baseline ms / attnkit ms must be at least this


SPEED_TARGETS = (
    SpeedTarget("SQA causal fwd, L=2048 H=8 D=64, vs SDPA", "sqa", "mha 8/8 causal", 2048, "fwd", "sdpa-flash", 0.8),
    SpeedTarget("SQA causal fwd+bwd, L=2048 H=8 D=64, vs SDPA", "sqa", "mha 8/8 causal", 2048, "fwd+bwd", "sdpa-flash",
                0.7),
    SpeedTarget("lightning fwd, L=4096 H=8 D=64, vs torch-eager chunked", "lightning", "H=8", 4096, "fwd",
                "torch-eager", 1.5),
    SpeedTarget("DMA causal fwd, L=2048 keep=256, vs dense causal SDPA", "dma", "4/2 keep=256 causal", 2048, "fwd",
                "sdpa-flash", 2.0),
    SpeedTarget("routing fwd+bwd, L=2048 C=45, vs dense causal SDPA", "routing", "H=4 C=45 w=45", 2048, "fwd+bwd",
                "sdpa-flash", 1.0),
)

# The case of each op whose thread scaling is timed: (op, variant, L, mode).
SCALING_CASES = (
    ("sqa", "mha 8/8 causal", 2048, "fwd"),
    ("dma", "4/2 keep=256 causal", 2048, "fwd"),
    ("lightning", "H=8", 4096, "fwd"),
    ("routing", "H=4 C=45 w=45", 2048, "fwd+bwd"),
    ("moh", "50% active 4/8 causal", 2048, "fwd"),
)
SCALING_GOAL = 0.6  # time with 2 threads / time with 1 thread, at most
SCALING_ROUNDS = 5
REFERENCE_MM = 1024  # the reference row's square matrix size


def _find(results, op, variant, L, mode):
    for r in results:
        c = r.case
        if c.op == op and c.variant == variant and c.L == L and c.mode == mode:
            return r
    return None


def _row(label, value, goal, at_least, detail):
    if value is None:
        verdict = "not run"
    elif goal is None:
        verdict = "reference"
    else:
        verdict = "OK" if (value >= goal if at_least else value <= goal) else "MISS"
    return {"target": label, "value": value, "goal": goal, "at_least": at_least, "verdict": verdict, "detail": detail}


def speed_rows(results) -> list[dict]:
    rows = []
    for t in SPEED_TARGETS:
        r = _find(results, t.op, t.variant, t.L, t.mode)
        value, detail = None, "case not in this run"
        if r is not None:
            try:
                a, b = r.impl("attnkit"), r.impl(t.baseline)
            except KeyError:
                a = b = None
            if a is not None and a.ms and b is not None and b.ms:
                value = b.ms / a.ms
                detail = f"attnkit {a.ms:.1f} ms, {t.baseline} {b.ms:.1f} ms"
            elif a is not None:
                detail = f"attnkit {a.status}, {t.baseline} {b.status if b else 'absent'}"
        rows.append(_row(t.label, value, t.goal, True, detail))
    return rows


def scaling_rows(results, runner) -> list[dict]:
    """Times each op's scaling case with one thread and with torch's current thread count."""
    n = torch.get_num_threads()
    rows = []
    for op, variant, L, mode in SCALING_CASES:
        label = f"{op} {variant} L={L} {mode}: {n} threads / 1 thread"
        r = _find(results, op, variant, L, mode)
        if n < 2:
            rows.append(_row(label, None, SCALING_GOAL, False, "torch runs 1 thread"))
            continue
        if r is None or r.op_result is None or r.op_result.status != "ok":
            rows.append(_row(label, None, SCALING_GOAL, False, "case not timed in this run"))
            continue
        case = r.case
        impl = case.impl("attnkit")
        torch.manual_seed(case.seed)
        inputs = case.make_inputs(case.mode == "fwd+bwd")
        fn = runner.callable_for(case, impl, inputs)
        times = _best_medians(fn, runner.policy, n)
        rows.append(_row(label, times[n] / times[1], SCALING_GOAL, False,
                         f"{times[1]:.1f} ms with 1 thread, {times[n]:.1f} ms with {n}"))
    return rows


def _best_medians(fn, policy, n) -> dict[int, float]:
    """Best median over SCALING_ROUNDS of fn with 1 and with n threads, the counts alternated so that
    a thread pool warming up or a load burst on a shared machine hurts neither side alone."""
    times = {1: float("inf"), n: float("inf")}
    try:
        for _ in range(SCALING_ROUNDS):
            for threads in (1, n):
                torch.set_num_threads(threads)
                times[threads] = min(times[threads], measure(fn, "cpu", policy).median)
    finally:
        torch.set_num_threads(n)
    return times


def reference_row(runner) -> dict:
    """Thread scaling of one fp32 torch.mm on this machine now: the ceiling the thread rows read against."""
    n = torch.get_num_threads()
    m = REFERENCE_MM
    label = f"reference: torch.mm {m}x{m} fp32: {n} threads / 1 thread"
    if n < 2:
        return _row(label, None, None, False, "torch runs 1 thread")
    a, b = torch.randn(m, m), torch.randn(m, m)
    times = _best_medians(lambda: torch.mm(a, b), runner.policy, n)
    return _row(label, times[n] / times[1], None, False, f"{times[1]:.1f} ms with 1 thread, {times[n]:.1f} ms with {n}")


def evaluate(results, runner) -> list[dict]:
    return speed_rows(results) + scaling_rows(results, runner) + [reference_row(runner)]


def render(rows: list[dict]) -> str:
    lines = ["### CPU targets", "", "| target | measured | goal | verdict | detail |", "|---|---|---|---|---|"]
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.2f}x"
        goal = "-" if r["goal"] is None else f"{'>=' if r['at_least'] else '<='} {r['goal']:.2f}x"
        lines.append(f"| {r['target']} | {v} | {goal} | {r['verdict']} | {r['detail']} |")
    return "\n".join(lines)
