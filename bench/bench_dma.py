"""Dynamic Mask Attention on the GPU, side by side with causal SDPA (flash / cuDNN).

H100, bf16, H=16, Hkv=8, D=128, causal, keep=2048, B=1, forward and forward+backward. Targets:
  - L=32k: fwd+bwd >= 6x faster than causal SDPA;
  - nearly constant time per token once L >> keep: fwd time(64k) / time(16k) <= 5;
  - peak extra memory at L=64k < 1% of a dense fp16 [B, H, L, L] mask;
  - mask selection <= 10% of the op's time;
  - L <= 1k: backward no slower than dense SDPA.

    pytest bench/bench_dma.py --benchmark-only --benchmark-group-by=param:case

``test_dma`` times the suite's cases (``attnkit.bench.cases.dma.dma_perf_cases``: attnkit, SDPA and the
other baselines, behind the suite's correctness gate). The other benchmarks measure what only DMA
has: the selection's share of the op, the time ratio across lengths and the peak extra memory; their
numbers go to ``extra_info`` and to ``bench/results/dma_<gpu>.json``.
"""

import json
import math
from pathlib import Path

import pytest
import torch

import attnkit

pytestmark = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

try:
    from attnkit.bench.cases import case_params
    from attnkit.bench.cases.dma import dma_perf_cases

    _SUITE = [pytest.param(c, i, id=n) for c, i, n in case_params(dma_perf_cases())]
except ImportError:  # the suite's registry is not in this build
    _SUITE = []

H, HKV, D, KEEP = 16, 8, 128, 2048
RESULTS = Path(__file__).resolve().parent / "results"


@pytest.mark.skipif(not _SUITE, reason="attnkit.bench case registry not available")
@pytest.mark.parametrize("case,impl_name", _SUITE)
def test_dma(benchmark, run_bench, case, impl_name):
    run_bench(benchmark, case, impl_name)


def _inputs(L, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = {"device": "cuda", "dtype": torch.bfloat16, "generator": g}
    q = torch.randn(1, L, H, D, **kw)
    k = torch.randn(1, L, HKV, D, **kw)
    v = torch.randn(1, L, HKV, D, **kw)
    bias = torch.randn(1, HKV, L, device="cuda", generator=g)
    for t in (q, k, v, bias):
        t.requires_grad_(requires_grad)
    return q, k, v, bias


def _median_ms(fn, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _record(key, value):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"dma_{torch.cuda.get_device_name().replace(' ', '_')}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _fwd_bwd(q, k, v, bias):
    out = attnkit.dynamic_mask_attention(q, k, v, bias, keep=KEEP, causal=True)
    out.backward(torch.ones_like(out))


@needs_cuda
@pytest.mark.parametrize("L", [4096, 16384, 65536])
def test_dma_selection_share(benchmark, L):
    """Mask selection alone vs the whole op (forward, and forward+backward)."""
    q, k, v, bias = _inputs(L)
    sel = lambda: attnkit.dynamic_mask_select(bias, keep=KEEP, lq=L, causal=True)
    fwd = lambda: attnkit.dynamic_mask_attention(q, k, v, bias, keep=KEEP, causal=True)
    qg, kg, vg, bg = _inputs(L, True)
    t_sel, t_fwd = _median_ms(sel), _median_ms(fwd)
    t_fb = _median_ms(lambda: _fwd_bwd(qg, kg, vg, bg), reps=5)
    info = {"L": L, "select_ms": t_sel, "fwd_ms": t_fwd, "fwd_bwd_ms": t_fb,
            "select_share_fwd": t_sel / t_fwd, "select_share_fwd_bwd": t_sel / t_fb}
    benchmark.extra_info.update(info)
    _record(f"selection_L{L}", info)
    benchmark.pedantic(lambda: (sel(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2, iterations=1)


@needs_cuda
def test_dma_time_per_token(benchmark):
    """Forward time(64k) / time(16k): 4x the tokens, so <= 5 means nearly constant time per token."""
    t = {}
    for L in (16384, 65536):
        q, k, v, bias = _inputs(L)
        t[L] = _median_ms(lambda: attnkit.dynamic_mask_attention(q, k, v, bias, keep=KEEP, causal=True))
    info = {"fwd_ms_16k": t[16384], "fwd_ms_64k": t[65536], "ratio_64k_16k": t[65536] / t[16384]}
    benchmark.extra_info.update(info)
    _record("time_per_token", info)
    q, k, v, bias = _inputs(65536)
    benchmark.pedantic(
        lambda: (attnkit.dynamic_mask_attention(q, k, v, bias, keep=KEEP, causal=True), torch.cuda.synchronize()),
        rounds=5, warmup_rounds=1, iterations=1)


@needs_cuda
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_dma_peak_extra_memory(benchmark, mode):
    """Peak memory above inputs, outputs and gradients at L=64k, vs a dense fp16 [B, H, L, L] mask."""
    L = 65536
    q, k, v, bias = _inputs(L, mode == "fwd+bwd")
    own = sum(t.numel() * t.element_size() for t in (q, k, v, bias))
    out_bytes = L * H * D * 2 + H * L * 4  # out (bf16) and lse (fp32)
    own += out_bytes + (own if mode == "fwd+bwd" else 0)  # gradients have the inputs' sizes
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if mode == "fwd":
        with torch.no_grad():
            out = attnkit.dynamic_mask_attention(q, k, v, bias, keep=KEEP, causal=True)
    else:
        _fwd_bwd(q, k, v, bias)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - own
    dense_mask = H * L * L * 2
    info = {"mode": mode, "extra_bytes": extra, "dense_fp16_mask_bytes": dense_mask,
            "fraction": extra / dense_mask}
    benchmark.extra_info.update(info)
    _record(f"peak_extra_memory_{mode}", info)
    assert extra < 0.01 * dense_mask, info
    fn = (lambda: attnkit.dynamic_mask_attention(q.detach(), k.detach(), v.detach(), bias.detach(), keep=KEEP,
                                                 causal=True)) if mode == "fwd" else (lambda: _fwd_bwd(q, k, v, bias))
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=3, warmup_rounds=1, iterations=1)


@needs_cuda
@pytest.mark.parametrize("L", [512, 1024])
def test_dma_short_backward_vs_sdpa(benchmark, L):
    """L <= keep: DMA is dense attention plus a bias; its backward should match dense SDPA's."""
    q, k, v, bias = _inputs(L, True)
    out = attnkit.dynamic_mask_attention(q, k, v, bias, keep=KEEP, causal=True)
    g = torch.ones_like(out)
    t_dma = _median_ms(lambda: torch.autograd.grad(out, (q, k, v, bias), g, retain_graph=True))
    qs, ks, vs = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    o_s = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True,
                                                            scale=1 / math.sqrt(D))
    g_s = torch.ones_like(o_s)
    t_sdpa = _median_ms(lambda: torch.autograd.grad(o_s, (qs, ks, vs), g_s, retain_graph=True))
    info = {"L": L, "dma_bwd_ms": t_dma, "sdpa_bwd_ms": t_sdpa, "ratio": t_dma / t_sdpa}
    benchmark.extra_info.update(info)
    _record(f"short_backward_L{L}", info)
    benchmark.pedantic(lambda: (torch.autograd.grad(out, (q, k, v, bias), g, retain_graph=True),
                                torch.cuda.synchronize()), rounds=10, warmup_rounds=2, iterations=1)
