"""pytest-benchmark harness for attnkit: ``pytest bench --benchmark-only``.

The cases come from ``attnkit.bench.cases`` (the registry ``python -m attnkit.bench`` runs), so there
is one definition of the suite. Each benchmark first passes the same correctness gate as the CLI
(shared per case), then is timed with pytest-benchmark: one call per round, the device synchronised
inside the timed call, and the GPU's L2 cache flushed before each round.

Files here are named ``bench_*.py``; this conftest collects them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:
    import attnkit  # noqa: F401
except ImportError:  # running from a source tree without PYTHONPATH=python
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch  # noqa: E402

from attnkit.bench import cases as C  # noqa: E402
from attnkit.bench.runner import Runner  # noqa: E402
from attnkit.bench.timing import TimingPolicy  # noqa: E402


def pytest_collect_file(file_path, parent):
    # a file named on the command line is collected by pytest itself already
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


_GATES: dict = {}


@pytest.fixture
def run_bench():
    """run_bench(benchmark, case, impl_name): gate (once per case), then time ``impl_name``."""

    def run(benchmark, case, impl_name):
        if case.device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        missing = C.missing_attrs(case.op)
        if missing:
            pytest.skip(f"this attnkit build has no {', '.join(missing)}")
        policy = TimingPolicy.for_device(case.device)
        runner = Runner(case.device, policy)
        if case.id not in _GATES:
            cr, _ = runner.check(case)
            _GATES[case.id] = cr
        cr = _GATES[case.id]
        r = cr.impl(impl_name)
        if r.status == "FAIL":
            pytest.fail(f"correctness gate: {impl_name} disagrees with {cr.gate.get('reference')}: {r.note}")
        if r.status in ("skip", "unchecked"):
            pytest.skip(f"{impl_name}: {r.note}")
        if r.status in ("error", "oom"):
            if r.kind == "attnkit":
                pytest.fail(f"{impl_name}: {r.note}")
            pytest.skip(f"{impl_name}: {r.note}")

        inputs = case.make_inputs(case.mode == "fwd+bwd")
        fn = runner.callable_for(case, case.impl(impl_name), inputs)
        sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)

        def target():
            fn()
            sync()

        flush = runner.flusher if runner.flusher is not None else (lambda: None)
        benchmark.extra_info.update({"case": case.id, "impl": impl_name, "flops": cr.flops,
                                     "dense_flops": cr.dense_flops, "gate": r.gate})
        benchmark.pedantic(target, setup=flush, rounds=policy.min_reps * 4, warmup_rounds=policy.warmup,
                           iterations=1)
        stats = getattr(benchmark, "stats", None)
        median = getattr(getattr(stats, "stats", None), "median", None)
        if median and cr.flops:
            benchmark.extra_info["tflops"] = cr.flops / median / 1e12

    return run
