"""The flash core's CPU implementation against flash_params.h's semantics, through the test hook
``torch.ops.attnkit._flash_core_cpu_test``: additive bias (row-broadcast and per row, shared by
groups of heads) and its gradient, the kept predicate (row threshold with tie order), sliding
window, gathered segments with positions, and the self mask. SQA covers the plain path."""

from __future__ import annotations

import pytest
import torch
from conftest import one_thread

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.attnkit, "_flash_core_cpu_test"),
                                reason="test-only op _flash_core_cpu_test not built (ATTNKIT_TEST_OPS=1)")

NEG_INF = float("-inf")


def core_reference(
    Qs, Ks, Vs, *, S, pq, pk, shift, bias=None, thr=None, tie=None, causal=False, window_left=-1,
    self_mask=False, self_score=0.0, scale=1.0,
):
    """flash_params.h, written out in float64 on segment-space inputs.

    Qs [B, S*Lq, Hq, D], Ks / Vs [B, S*Lk, Hkv, D] hold the rows each segment reads (gathered by
    the caller); pq [B, H, S, Lq] and pk [B, H, S, Lk] are the positions the masks use. bias
    [B, Hb, 1 | S*Lq, S*Lk]; thr / tie [B, Hkv, S*Lq]. Returns out [B, S*Lq, H, D], lse [B, H, S*Lq].
    """
    B, RQ, Hq, D = Qs.shape
    RK, Hkv = Ks.shape[1], Ks.shape[2]
    H = max(Hq, Hkv)
    Lq, Lk = RQ // S, RK // S
    bhg = H // bias.shape[1] if bias is not None else 1
    outs, lses = [], []
    for b in range(B):
        out_b, lse_b = [], []
        for h in range(H):
            hq, g = h // (H // Hq), h // (H // Hkv)
            out_h, lse_h = [], []
            for s in range(S):
                rq = slice(s * Lq, (s + 1) * Lq)
                rk = slice(s * Lk, (s + 1) * Lk)
                sc = scale * (Qs[b, rq, hq] @ Ks[b, rk, g].transpose(0, 1))
                pi = pq[b, h, s].unsqueeze(1)
                pj = pk[b, h, s].unsqueeze(0)
                vis = torch.ones(Lq, Lk, dtype=torch.bool)
                if bias is not None:
                    bvals = bias[b, h // bhg, rq if bias.shape[2] > 1 else slice(0, 1), rk].expand(Lq, Lk)
                    sc = sc + bvals
                if causal:
                    vis &= pj <= pi + shift
                if window_left >= 0:
                    vis &= pj >= pi + shift - window_left
                if thr is not None:
                    t = thr[b, g, rq].double().unsqueeze(1)
                    tt = tie[b, g, rq].unsqueeze(1)
                    col = torch.arange(s * Lk, (s + 1) * Lk).unsqueeze(0)
                    bv = bvals.detach()
                    vis &= (bv > t) | ((bv == t) & (col <= tt))
                if self_mask:
                    sc = torch.where(pi == pj, torch.full_like(sc, self_score), sc)
                sc = torch.where(vis, sc, NEG_INF)
                seen = vis.any(dim=1, keepdim=True)
                safe = torch.where(seen, sc, 0.0)
                lse = torch.logsumexp(safe, dim=1, keepdim=True)
                p = torch.where(seen, torch.exp(safe - lse), 0.0)
                out_h.append(p @ Vs[b, rk, g])
                lse_h.append(torch.where(seen, lse, NEG_INF).squeeze(1))
            out_b.append(torch.cat(out_h, 0))
            lse_b.append(torch.cat(lse_h, 0))
        outs.append(torch.stack(out_b, 1))
        lses.append(torch.stack(lse_b, 0))
    return torch.stack(outs, 0), torch.stack(lses, 0)


def run_core(q, k, v, dout, *, bias=None, thr=None, tie=None, qidx=None, kidx=None, causal=False, window_left=-1,
             self_mask=False, self_score=0.0, scale=1.0):
    return torch.ops.attnkit._flash_core_cpu_test(
        q, k, v, bias, thr, tie, qidx, kidx, causal, window_left, self_mask, self_score, scale, dout
    )


def check(q, k, v, *, qidx=None, kidx=None, bias=None, atol=2e-5, rtol=1e-4, **kw):
    """Run the core (forward + backward) and compare out, lse, dq, dk, dv, dbias with autograd of
    core_reference. With gathers, the reference differentiates segment-space copies (the core writes
    dq / dk / dv in segment space)."""
    B, _, Hq, D = q.shape
    Hkv = k.shape[2]
    H = max(Hq, Hkv)
    if qidx is None:
        S, Lq, Lk = 1, q.shape[1], k.shape[1]
        pq = torch.arange(Lq).expand(B, H, 1, Lq)
        pk = torch.arange(Lk).expand(B, H, 1, Lk)
        shift = Lk - Lq
        Qs, Ks, Vs = q, k, v
    else:
        assert Hq == Hkv == H, "gathers are per output head: the test uses q_group == kv_group == 1"
        S, Lq, Lk = qidx.shape[2], qidx.shape[3], kidx.shape[3]
        pq, pk, shift = qidx.long(), kidx.long(), 0
        # Qs[b, s*Lq + i, h] = q[b, qidx[b, h, s, i], h]
        Qs = torch.stack([torch.stack([q[b, qidx[b, h].reshape(-1).long(), h] for h in range(H)], 1) for b in range(B)])
        Ks = torch.stack([torch.stack([k[b, kidx[b, h].reshape(-1).long(), h] for h in range(H)], 1) for b in range(B)])
        Vs = torch.stack([torch.stack([v[b, kidx[b, h].reshape(-1).long(), h] for h in range(H)], 1) for b in range(B)])
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(B, S * Lq, H, D, generator=g).to(q.dtype)
    out, lse, dq, dk, dv, dbias = run_core(q, k, v, dout, bias=bias, qidx=qidx, kidx=kidx, **kw)

    leaves = [t.detach().double().requires_grad_(True) for t in (Qs, Ks, Vs)]
    bias_leaf = bias.detach().double().requires_grad_(True) if bias is not None else None
    with one_thread():
        ref_out, ref_lse = core_reference(*leaves, S=S, pq=pq, pk=pk, shift=shift, bias=bias_leaf, **kw)
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-4, rtol=1e-5)
    wrt = leaves + ([bias_leaf] if bias_leaf is not None else [])
    with one_thread():
        grads = torch.autograd.grad(ref_out, wrt, dout.double(), allow_unused=True)
    for name, got, ref in zip(("dq", "dk", "dv", "dbias"), (dq, dk, dv, dbias), grads):
        ref = torch.zeros_like(wrt[("dq", "dk", "dv", "dbias").index(name)]) if ref is None else ref
        assert torch.isfinite(got).all(), f"{name}: not every element written / finite"
        torch.testing.assert_close(got.double(), ref, atol=atol * 5, rtol=rtol * 5, msg=lambda m: f"{name}: {m}")
    return out, lse, dq, dk, dv, dbias


def _qkv(B, Lq, Lk, Hq, Hkv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, Lq, Hq, D, generator=g).to(dtype),
        torch.randn(B, Lk, Hkv, D, generator=g).to(dtype),
        torch.randn(B, Lk, Hkv, D, generator=g).to(dtype),
    )


def _tied_bias(shape, seed=1):
    # Few distinct values, so that the kept predicate meets many ties.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, shape, generator=g).float() * 0.5 - 1.0


def _thresholds(bias, B, Hkv, rows, Lk, seed=2):
    """Per (b, kv head, row): a threshold equal to some column's bias, and a tie column."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.randint(0, Lk, (B, Hkv, rows), generator=g)
    thr = torch.gather(bias[:, :, 0, :], 2, cols).contiguous()
    tie = torch.randint(-1, Lk, (B, Hkv, rows), generator=g, dtype=torch.int32)
    return thr, tie


# ---- bias and kept predicate (DMA) -------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2), (4, 1)])
def test_row_broadcast_bias_with_kept_predicate(causal, hq, hkv):
    # DMA's layout: bias [B, Hkv, 1, Lk] shared by the query heads of a KV head (bias_head_group =
    # kv_group), thresholds per KV head and row; dbias sums rows and the heads of the group.
    B, Lq, Lk, D = 2, 70, 90, 16
    q, k, v = _qkv(B, Lq, Lk, hq, hkv, D)
    bias = _tied_bias((B, hkv, 1, Lk))
    thr, tie = _thresholds(bias, B, hkv, Lq, Lk)
    thr[0, 0, 5] = float("inf")  # a row that keeps nothing
    out, lse, dq, *_ = check(q, k, v, bias=bias, thr=thr, tie=tie, causal=causal, scale=0.3)
    assert torch.all(out[0, 5, : max(hq, hkv) // hkv] == 0)
    assert lse[0, 0, 5] == NEG_INF
    assert torch.all(dq[0, 5, : hq // hkv if hq >= hkv else 1] == 0)


def test_row_broadcast_bias_without_threshold():
    q, k, v = _qkv(1, 33, 130, 2, 2, 32)
    check(q, k, v, bias=torch.randn(1, 2, 1, 130), causal=True, scale=0.2)


def test_per_row_bias():
    # bias [B, H, Lq, Lk], one bias head per output head: dbias is dS itself.
    q, k, v = _qkv(2, 67, 45, 4, 2, 16)
    bias = torch.randn(2, 4, 67, 45)
    check(q, k, v, bias=bias, causal=True, scale=0.25)


def test_per_row_bias_shared_heads_gradient_rejected():
    # A per-row bias shared by 2 output heads would need dbias summed over heads for every (row, col):
    # the CUDA kernel does not do that, so the core (CPU and CUDA alike) refuses it when dbias is asked.
    q, k, v = _qkv(1, 9, 9, 4, 2, 16)
    dout = torch.randn(1, 9, 4, 16)
    with pytest.raises(RuntimeError, match="per-row bias gradient needs one bias head per output head"):
        run_core(q, k, v, dout, bias=torch.randn(1, 2, 9, 9), scale=0.25)


def test_bias_expanded_over_batch():
    # A batch-broadcast bias (stride 0) reads the same values; dbias is still per batch.
    q, k, v = _qkv(3, 20, 20, 2, 1, 16)
    bias = torch.randn(1, 1, 1, 20).expand(3, 1, 1, 20)
    check(q, k, v, bias=bias, scale=0.25)


# ---- window ------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk,wl", [(100, 100, 7), (40, 150, 0), (150, 40, 20)])
def test_window(causal, lq, lk, wl):
    q, k, v = _qkv(1, lq, lk, 2, 1, 16)
    check(q, k, v, causal=causal, window_left=wl, scale=0.3)


# ---- gathered segments (routing) ---------------------------------------------------------------


def _routing_indices(B, H, L, S, w, seed, shared=None):
    g = torch.Generator().manual_seed(seed)
    idx = torch.empty(B, H, S, w, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            for s in range(S):
                idx[b, h, s] = torch.randperm(L, generator=g)[:w].sort().values.int()
    return idx


@pytest.mark.parametrize("causal", [False, True])
def test_segments_shared_qk_self_mask(causal):
    # Shared-QK routing: the same gather for queries and keys, the self score replaced by -5e4.
    B, H, L, S, w, D = 2, 2, 50, 3, 12, 16
    q, _, v = _qkv(B, L, L, H, H, D)
    idx = _routing_indices(B, H, L, S, w, seed=3)
    out, lse, *_ = check(q, q, v, qidx=idx, kidx=idx, causal=causal, self_mask=True, self_score=-5e4, scale=0.25)
    assert torch.isfinite(lse).all()  # every row sees at least itself


@pytest.mark.parametrize("causal", [False, True])
def test_segments_distinct_qk(causal):
    # Separate query and key gathers (lengths differ); causal on original positions, no shift.
    B, H, L, S, D = 1, 2, 60, 2, 16
    q, k, v = _qkv(B, L, L, H, H, D, seed=4)
    qidx = _routing_indices(B, H, L, S, 10, seed=5)
    kidx = _routing_indices(B, H, L, S, 14, seed=6)
    out, lse, *_ = check(q, k, v, qidx=qidx, kidx=kidx, causal=causal, scale=0.25)
    if causal:  # a query before every routed key of its cluster sees nothing
        first_key = kidx[..., 0:1]
        empty = qidx < first_key
        assert torch.all(lse[empty.reshape(B, H, -1)] == NEG_INF)


def test_segments_with_window_and_half_precision():
    B, H, L, S, D = 1, 2, 80, 2, 32
    q, k, v = _qkv(B, L, L, H, H, D, dtype=torch.bfloat16, seed=8)
    idx = _routing_indices(B, H, L, S, 20, seed=9)
    check(q, k, v, qidx=idx, kidx=idx, causal=True, window_left=15, scale=0.2, atol=2e-2, rtol=2e-2)


def test_rejects_bias_group_spanning_kv_heads():
    # flash_params.h: a bias head's output heads must lie in one KV head's group for dbias.
    q, k, v = _qkv(1, 8, 8, 4, 4, 16)
    dout = torch.randn(1, 8, 4, 16)
    with pytest.raises(RuntimeError, match="bias heads must not span several key/value heads"):
        run_core(q, k, v, dout, bias=torch.randn(1, 2, 1, 8), scale=0.25)


# ---- the plain-loop kernels --------------------------------------------------------------------

_GENERIC_SCRIPT = r"""
import sys, torch, attnkit
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 70, 4, 40, generator=g)  # D = 40: one 32-wide chunk and a tail
k = torch.randn(2, 90, 2, 40, generator=g)
v = torch.randn(2, 90, 2, 40, generator=g)
bias = torch.randn(2, 2, 1, 90, generator=g)
dout = torch.randn(2, 70, 4, 40, generator=g)
res = list(torch.ops.attnkit._flash_core_cpu_test(q, k, v, bias, None, None, None, None, True, -1, False, 0.0,
                                                  0.3, dout))
torch.save(res, sys.argv[1])
"""


def test_plain_loop_kernels_match(tmp_path):
    # ATTNKIT_CPU_NO_AVX2=1 forces the portable kernels (what CPUs without AVX2 and non-x86 builds
    # run); they must agree with the default path, itself checked against the reference above.
    import os
    import subprocess
    import sys

    import attnkit

    script = tmp_path / "generic.py"
    script.write_text(_GENERIC_SCRIPT)
    out_file = tmp_path / "generic.pt"
    env = dict(os.environ, ATTNKIT_CPU_NO_AVX2="1")
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(attnkit.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, str(script), str(out_file)], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    generic = torch.load(out_file)
    ns = {}
    exec(_GENERIC_SCRIPT.replace("torch.save(res, sys.argv[1])", ""), ns)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dbias"), generic, ns["res"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    if ns["res"][0].numel() and torch.cpu._is_avx2_supported():
        # On an AVX2 machine the two paths round differently (FMA): proof the knob switched paths.
        assert not torch.equal(generic[0], ns["res"][0])
