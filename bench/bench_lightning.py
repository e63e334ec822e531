"""Lightning attention on the GPU (pytest-benchmark; needs CUDA, skipped otherwise).

    pytest bench/bench_lightning.py --benchmark-only --benchmark-group-by=param:case

The timed cases are the shared registry's ``attnkit.bench.cases.lightning.lightning_perf_cases`` (bf16, B=4,
H=32, D=128, L in 2k..64k, forward and forward+backward; attnkit, flash-linear-attention's
chunk_simple_gla when installed, causal SDPA backends, a plain-PyTorch chunked baseline), each behind
the registry's correctness gate (``run_bench`` in bench/conftest.py). Added here: one decode step
(B=4, H=32, 128x128 fp32 state, in place) with its achieved memory bandwidth, and a summary of the
performance targets written to bench/results/lightning_<gpu>.json: time(64k)/time(8k) <= 8.8, >= 1.0x
FLA's chunk kernel, faster than causal flash SDPA from L = 2k, decode >= 70% of the HBM bandwidth.
"""

from __future__ import annotations

import datetime
import json
import math
import pathlib
import re

import pytest
import torch

from attnkit.bench.cases import case_params
from attnkit.bench.cases.lightning import lightning_perf_cases

pytestmark = pytest.mark.cuda

B, H, D = 4, 32, 128
LENGTHS = [2048, 4096, 8192, 16384, 32768, 65536]
RESULTS: dict[tuple[str, str, int], float] = {}  # (impl, mode, L) -> median seconds


def _peak_bandwidth_gbs(name: str) -> float | None:
    """Nominal HBM bandwidth (GB/s) of common data-center GPUs, by device name."""
    table = [
        (r"H200", 4800.0),
        (r"H100.*(PCIe|PCIE)", 2000.0),
        (r"H100.*NVL", 3900.0),
        (r"H100|H800", 3350.0),
        (r"A100.*80GB", 2039.0),
        (r"A100", 1555.0),
    ]
    for pat, bw in table:
        if re.search(pat, name):
            return bw
    return None


@pytest.mark.parametrize("case,impl_name", [pytest.param(c, i, id=n) for c, i, n in case_params(lightning_perf_cases())])
def test_lightning(benchmark, run_bench, case, impl_name):
    run_bench(benchmark, case, impl_name)
    median = getattr(getattr(getattr(benchmark, "stats", None), "stats", None), "median", None)
    if median:
        RESULTS[(impl_name, case.mode, case.L)] = median


def test_lightning_decode(benchmark):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import attnkit

    steps = 100
    q, k, v = (torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    state = torch.randn(B, H, D, D, device="cuda", dtype=torch.float32)
    slopes = attnkit.lightning_slopes(H, device="cuda")

    def run():
        for _ in range(steps):
            attnkit.lightning_attention_decode(q, k, v, state, slopes)
        torch.cuda.synchronize()

    run()
    benchmark.group = "lightning decode"
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    t = benchmark.stats.stats.median / steps
    RESULTS[("attnkit", "decode", 1)] = t
    benchmark.extra_info["step_us"] = t * 1e6
    benchmark.extra_info["state_gbs"] = 2 * state.numel() * 4 / t / 1e9  # read + write once per step


def test_zz_summary():
    """Writes the performance targets against what was measured (not a pass/fail test)."""
    if not RESULTS or not torch.cuda.is_available():
        pytest.skip("no lightning benchmark ran")
    name = torch.cuda.get_device_name()
    peak = _peak_bandwidth_gbs(name)
    summary: dict = {"device": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "shape": {"B": B, "H": H, "D": D, "dtype": "bfloat16"}, "median_ms": {}, "targets": {}}
    for (impl, mode, L), t in sorted(RESULTS.items()):
        summary["median_ms"][f"{impl}/{mode}/{L}"] = round(t * 1e3, 4)
    tg = summary["targets"]
    for mode in ("fwd", "fwd+bwd"):
        a8, a64 = RESULTS.get(("attnkit", mode, 8192)), RESULTS.get(("attnkit", mode, 65536))
        if a8 and a64:
            tg[f"{mode}: time(64k)/time(8k) <= 8.8"] = {"value": a64 / a8, "met": a64 / a8 <= 8.8}
        for L in LENGTHS:
            a = RESULTS.get(("attnkit", mode, L))
            f = RESULTS.get(("fla-simple-gla", mode, L))
            s = RESULTS.get(("sdpa-flash", mode, L))
            if a and f:
                tg[f"{mode} L={L}: speed vs FLA chunk_simple_gla >= 1.0x"] = {"value": f / a, "met": f / a >= 1.0}
            if a and s:
                tg[f"{mode} L={L}: faster than causal flash SDPA"] = {"value": s / a, "met": s / a > 1.0}
    t = RESULTS.get(("attnkit", "decode", 1))
    if t:
        gbs = 2 * B * H * D * D * 4 / t / 1e9
        tg["decode: state bandwidth >= 70% of HBM peak"] = {
            "value_gbs": gbs,
            "peak_gbs": peak,
            "fraction": (gbs / peak) if peak else None,
            "met": (gbs / peak >= 0.7) if peak else None,
        }
    out = pathlib.Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    path = out / f"lightning_{tag}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nlightning benchmark summary written to {path}")
    for key, val in tg.items():
        print(f"  {key}: {val}")
    assert all(math.isfinite(v) for v in summary["median_ms"].values())
