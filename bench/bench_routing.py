"""Routing attention on the GPU (pytest-benchmark; skipped without CUDA).

H100, bf16, B=1, H=8, D=64, causal, C = sqrt(L), w = L / C, L in {4k, 16k, 64k}; forward + backward
of the whole layer's attention (routing, attention inside clusters, commitment loss, k-means EMA
update; no projections). Targets: >= 20x the ``routing-transformer`` package's KmeansAttention at 16k,
>= 3x causal dense SDPA at 16k, time ~ L^1.5, routing + k-means update <= 25% of the total.

    pytest bench/bench_routing.py --benchmark-only --benchmark-group-by=param:L \\
        --benchmark-json bench/results/routing.json

Impls per length: ``layer`` (everything), ``attention`` (routing_attention fwd+bwd on fixed indices),
``routing`` (routing_assign + k-means update + commitment loss, the overhead part), ``sdpa_causal``
(dense causal SDPA fwd+bwd, same B/H/D), ``routing_transformer`` (lucidrains' KmeansAttention fwd+bwd,
when the package is importable; skipped on OOM). ``test_report`` prints the ratios against the
targets (informational: it asserts nothing about speed).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

try:
    import attnkit
except ImportError:  # running from a source tree without PYTHONPATH=python
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import attnkit

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

B, H, D = 1, 8, 64
LENGTHS = [4096, 16384, 65536]
DTYPE = torch.bfloat16
_TIMES: dict = {}  # (impl, L) -> median seconds, for test_report


def _shape(L):
    C = int(round(math.sqrt(L)))
    return C, L // C


def _inputs(L, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=DTYPE, generator=g).requires_grad_() for _ in range(3))
    C, _ = _shape(L)
    mu = F.normalize(torch.randn(H, C, D, device="cuda", generator=g), dim=-1)
    return q, k, v, mu


def _layer_step(q, k, v, mu, w):
    """Routing heads of one layer, shared_qk=False: route, attend, commitment loss, backward, EMA."""
    q_idx, k_idx, assign = torch.ops.attnkit.routing_assign(q.detach(), k.detach(), mu, w, False, True)
    out = attnkit.routing_attention(q, k, v, q_idx, k_idx, causal=True, shared_qk=False)
    xs = torch.cat([q, k], 0)
    aux = 1e-4 * attnkit.routing_commitment_loss(xs, mu, assign)
    (out.float().sum() + aux).backward()
    attnkit.kmeans_ema_update_(mu, xs.detach(), decay=0.999, assign=assign)


def _routing_only(q, k, mu, w):
    q_idx, k_idx, assign = torch.ops.attnkit.routing_assign(q.detach(), k.detach(), mu, w, False, True)
    xs = torch.cat([q.detach(), k.detach()], 0)
    attnkit.routing_commitment_loss(xs, mu, assign)
    attnkit.kmeans_ema_update_(mu, xs, decay=0.999, assign=assign)


def _time(benchmark, fn, key):
    def target():
        fn()
        torch.cuda.synchronize()

    for _ in range(2):  # warm-up (allocator, first launches)
        target()
    benchmark.pedantic(target, rounds=10, iterations=1, warmup_rounds=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    median = getattr(stats, "median", None)
    if median is None:  # --benchmark-disable: time it ourselves
        t0 = time.perf_counter()
        for _ in range(5):
            target()
        median = (time.perf_counter() - t0) / 5
    _TIMES[key] = median
    benchmark.extra_info.update({"impl": key[0], "L": key[1], "median_s": median})


def _zero_grads(*ts):
    for t in ts:
        t.grad = None


@pytest.mark.parametrize("L", LENGTHS)
def test_layer(benchmark, L):
    q, k, v, mu = _inputs(L)
    _, w = _shape(L)

    def run():
        _zero_grads(q, k, v)
        _layer_step(q, k, v, mu, w)

    _time(benchmark, run, ("layer", L))


@pytest.mark.parametrize("L", LENGTHS)
def test_attention(benchmark, L):
    q, k, v, mu = _inputs(L)
    _, w = _shape(L)
    q_idx, k_idx = attnkit.routing_assign(q, k, mu, cluster_size=w, shared_qk=False)
    g = torch.randn_like(q)

    def run():
        _zero_grads(q, k, v)
        out = attnkit.routing_attention(q, k, v, q_idx, k_idx, causal=True, shared_qk=False)
        out.backward(g)

    _time(benchmark, run, ("attention", L))


@pytest.mark.parametrize("L", LENGTHS)
def test_routing(benchmark, L):
    q, k, v, mu = _inputs(L)
    _, w = _shape(L)
    _time(benchmark, lambda: _routing_only(q, k, mu, w), ("routing", L))


@pytest.mark.parametrize("L", LENGTHS)
def test_sdpa_causal(benchmark, L):
    q, k, v, _ = _inputs(L)
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    g = torch.randn_like(qt)

    def run():
        _zero_grads(qt, kt, vt)
        F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).backward(g)

    try:
        _time(benchmark, run, ("sdpa_causal", L))
    except torch.cuda.OutOfMemoryError:
        pytest.skip("out of memory")


@pytest.mark.parametrize("L", LENGTHS)
def test_routing_transformer(benchmark, L):
    rt = pytest.importorskip("routing_transformer.routing_transformer")
    C, w = _shape(L)
    try:
        attn = rt.KmeansAttention(C, w, H, D, causal=True, shared_qk=False, commitment=1e-4).cuda().to(DTYPE)
    except TypeError as e:  # another version of the package
        pytest.skip(f"routing_transformer.KmeansAttention API differs: {e}")
    attn.train()
    q, k, v, _ = _inputs(L)
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))  # [b, h, t, d]

    def run():
        _zero_grads(qt, kt, vt)
        out, aux = attn(qt, kt, vt)
        (out.float().sum() + aux).backward()

    try:
        _time(benchmark, run, ("routing_transformer", L))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip("routing_transformer: out of memory")


def test_report():
    """Prints the ratios of the performance targets (after the timed tests of this file ran)."""
    if not _TIMES:
        pytest.skip("no timings (run the whole file)")
    lines = []
    for L in LENGTHS:
        layer = _TIMES.get(("layer", L))
        if layer is None:
            continue
        line = f"L={L}: layer {layer * 1e3:.2f} ms"
        for impl in ("sdpa_causal", "routing_transformer"):
            t = _TIMES.get((impl, L))
            if t is not None:
                line += f", {impl} {t * 1e3:.2f} ms ({t / layer:.1f}x slower than attnkit)"
        r = _TIMES.get(("routing", L))
        if r is not None:
            line += f", routing+k-means {100 * r / layer:.0f}% of the layer"
        lines.append(line)
    Ls = [L for L in LENGTHS if ("layer", L) in _TIMES]
    if len(Ls) >= 2:
        a, b = Ls[0], Ls[-1]
        lines.append(f"growth exponent {math.log(_TIMES[('layer', b)] / _TIMES[('layer', a)]) / math.log(b / a):.2f} "
                     "(target ~1.5)")
    print("\n" + "\n".join(lines))
