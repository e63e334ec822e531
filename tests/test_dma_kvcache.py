"""dynamic_mask_attention_with_kvcache (the op attnkit::dma_kvcache_fwd) against the float64 DMA
oracle: appends at different cache_seqlens per batch row (0 included, rows without keys), Lq 1 and 4,
GQA both ways, keep above the valid keys, ties of the top-keep selection, decode loop == full DMA,
dma_select's per-batch key counts, opcheck, torch.compile(fullgraph=True), input errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close_fa

import attnkit
from attnkit.reference import dma_kvcache_reference, dynamic_mask_attention as dma_ref

LOW = [torch.float16, torch.bfloat16]
DEV_DTYPES = [("cpu", torch.float32)] + [(d, t) for d in DEVICES for t in LOW]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

CASES = [
    # (B, Lq, Lnew, Lmax, cache_seqlens, H, Hkv, D, keep, causal)
    (3, 1, 1, 160, [0, 50, 140], 4, 2, 32, 16, True),
    (2, 3, 3, 100, [20, 70], 2, 2, 64, 8, True),
    (2, 2, 0, 90, [5, 80], 2, 4, 32, 30, False),
    # a row with no key at all (cache_seqlens 0, no append) next to a nearly full cache
    (3, 1, 0, 80, [0, 30, 79], 2, 2, 32, 8, True),
    # Lq = 4, MQA, a row whose cache starts empty (its 4 new keys only)
    (2, 4, 4, 120, [0, 90], 4, 1, 64, 16, True),
    # Lq = 4, reverse GQA, keep above every row's key count; row 0 has 2 keys for 4 causal rows
    (2, 4, 0, 100, [2, 60], 2, 4, 32, 300, True),
    # Lq = 1, GQA, keep above the valid keys of row 0 only
    (2, 1, 1, 200, [3, 150], 4, 2, 32, 20, False),
]


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=[f"{d}-{str(t)[6:]}" for d, t in DEV_DTYPES])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_dma_kvcache(device, dtype, case):
    B, Lq, Lnew, Lmax, cs, H, Hkv, D, keep, causal = CASES[case]
    g = torch.Generator().manual_seed(case)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, kc, vc = r(B, Lq, H, D), r(B, Lmax, Hkv, D), r(B, Lmax, Hkv, D)
    # bias with many ties (rounded to 0.5) so the lower-index rule matters
    bc = (torch.randn(B, Hkv, Lmax, generator=g) * 2).round().div(2).to(device)
    k, v = (r(B, Lnew, Hkv, D), r(B, Lnew, Hkv, D)) if Lnew else (None, None)
    bias = (torch.randn(B, Hkv, Lnew, generator=g) * 2).round().div(2).to(device) if Lnew else None
    seqlens = torch.tensor(cs, dtype=torch.int32, device=device)
    ref, kc_ref, vc_ref, bc_ref = dma_kvcache_reference(q, kc, vc, bc, k, v, bias, seqlens.cpu(), keep=keep,
                                                        causal=causal)
    eag = dma_kvcache_reference(q.float(), kc.float(), vc.float(), bc, None if k is None else k.float(),
                                None if v is None else v.float(), bias, seqlens.cpu(), keep=keep, causal=causal)[0]
    out = attnkit.dynamic_mask_attention_with_kvcache(q, kc, vc, bc, k, v, bias, cache_seqlens=seqlens, keep=keep,
                                                      causal=causal)
    assert_close_fa(out, ref, eag.to(dtype), ATOL[dtype], "out")
    assert torch.equal(kc.double().cpu(), kc_ref.cpu()) and torch.equal(vc.double().cpu(), vc_ref.cpu())
    assert torch.equal(bc.double().cpu(), bc_ref.cpu())


def test_dma_kvcache_decode_loop_matches_full():
    g = torch.Generator().manual_seed(7)
    B, L, H, D, keep = 2, 12, 2, 16, 4
    q, k, v = (torch.randn(B, L, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(B, H, L, generator=g, dtype=torch.float64).round()
    full, _ = dma_ref(q, k, v, bias, keep=keep, causal=True)
    kc, vc, bc = torch.zeros(B, L, H, D, dtype=torch.float64), torch.zeros(B, L, H, D, dtype=torch.float64), \
        torch.zeros(B, H, L, dtype=torch.float64)
    for t in range(L):
        out = attnkit.dynamic_mask_attention_with_kvcache(
            q[:, t:t + 1], kc, vc, bc, k[:, t:t + 1], v[:, t:t + 1], bias[:, :, t:t + 1], cache_seqlens=t, keep=keep
        )
        torch.testing.assert_close(out, full[:, t:t + 1])


def test_dma_kvcache_bad_inputs():
    q = torch.randn(2, 1, 2, 8)
    kc, vc, bc = torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8), torch.randn(2, 2, 10)
    k, v, b = torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2)
    kc0 = kc.clone()
    f = attnkit.dynamic_mask_attention_with_kvcache
    with pytest.raises(ValueError, match="keep must be >= 1"):
        f(q, kc, vc, bc, k, v, b, cache_seqlens=1, keep=0)
    with pytest.raises(ValueError, match="the cache is too short"):
        f(q, kc, vc, bc, k, v, b, cache_seqlens=torch.tensor([1, 9], dtype=torch.int32), keep=2)
    with pytest.raises(ValueError, match="k, v and bias must be given together"):
        f(q, kc, vc, bc, k, v, None, cache_seqlens=1, keep=2)
    with pytest.raises(ValueError, match="bias_cache must have shape"):
        f(q, kc, vc, bc[:, :1], cache_seqlens=1, keep=2)
    with pytest.raises(ValueError, match="cache_seqlens\\[0\\] must be >= 0"):
        f(q, kc, vc, bc, cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32), keep=2)
    assert torch.equal(kc, kc0)


def _inputs(device, dtype, B, Lq, Lnew, Lmax, H, Hkv, D, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, kc, vc = r(B, Lq, H, D), r(B, Lmax, Hkv, D), r(B, Lmax, Hkv, D)
    bc = (torch.randn(B, Hkv, Lmax, generator=g) * 2).round().div(2).to(device)
    k, v = r(B, Lnew, Hkv, D), r(B, Lnew, Hkv, D)
    bias = (torch.randn(B, Hkv, Lnew, generator=g) * 2).round().div(2).to(device)
    return q, kc, vc, bc, k, v, bias


@pytest.mark.parametrize("device", DEVICES)
def test_dma_kvcache_op_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, kc, vc, bc, k, v, bias = _inputs(device, dtype, 3, 2, 2, 140, 4, 2, 32, seed=11)
    cs = torch.tensor([0, 70, 138], dtype=torch.int32, device=device)
    op = torch.ops.attnkit.dma_kvcache_fwd.default
    torch.library.opcheck(op, (q, kc, vc, bc, k, v, bias, cs, 16, True, 0.2))
    torch.library.opcheck(op, (q, kc, vc, bc, None, None, None, cs, 5, False, 0.2))


@pytest.mark.parametrize("device", DEVICES)
def test_dma_kvcache_compile_fullgraph(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, kc, vc, bc, k, v, bias = _inputs(device, dtype, 3, 1, 1, 96, 4, 2, 32, seed=12)
    cs = torch.tensor([0, 40, 95], dtype=torch.int32, device=device)
    torch._dynamo.reset()

    def f(q, kc, vc, bc, k, v, bias):
        return attnkit.dynamic_mask_attention_with_kvcache(q, kc, vc, bc, k, v, bias, cache_seqlens=cs, keep=8)

    c1 = [t.clone() for t in (kc, vc, bc)]
    c2 = [t.clone() for t in (kc, vc, bc)]
    out1 = torch.compile(f, fullgraph=True, backend="aot_eager")(q, *c1, k, v, bias)
    out2 = f(q, *c2, k, v, bias)
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(c1, c2))
    assert torch.equal(c1[0][1, 40], k[1, 0]) and torch.equal(c1[2][2, :, 95], bias[2, :, 0].to(c1[2].dtype))


def test_dma_kvcache_not_differentiable():
    q, kc, vc, bc, k, v, bias = _inputs("cpu", torch.float32, 1, 1, 1, 8, 2, 2, 8, seed=13)
    q.requires_grad_()
    out = attnkit.dynamic_mask_attention_with_kvcache(q, kc, vc, bc, k, v, bias, cache_seqlens=2, keep=2)
    assert out.requires_grad  # the output is tracked, but its backward raises
    with pytest.raises(RuntimeError, match="derivative for .*dma_kvcache_fwd.* is not implemented"):
        out.sum().backward()


@pytest.mark.parametrize("causal", [True, False])
def test_dma_select_seqused_k(causal):
    """dma_select with per-batch key counts == dma_select of each batch row's first keys alone."""
    g = torch.Generator().manual_seed(3)
    B, H, lk, lq, keep = 3, 2, 200, 70, 20
    bias = (torch.randn(B, H, lk, generator=g) * 2).round().div(2)
    used = torch.tensor([0, 90, 200], dtype=torch.int32)
    thr, tie, fl, fc, bl, bc = torch.ops.attnkit.dma_select(bias, keep, lq, causal, used)
    torch.library.opcheck(torch.ops.attnkit.dma_select.default, (bias, keep, lq, causal, used))
    for b in range(B):
        n = int(used[b])
        t1, e1, f1, c1, b1, d1 = torch.ops.attnkit.dma_select(bias[b:b + 1, :, :n].contiguous(), keep, lq, causal)
        assert torch.equal(thr[b:b + 1], t1) and torch.equal(tie[b:b + 1], e1)
        assert torch.equal(fc[b:b + 1], c1) and torch.equal(bc[b:b + 1, :, :d1.shape[2]], d1)
        assert (bc[b, :, d1.shape[2]:] == 0).all()
        w = f1.shape[3]
        assert torch.equal(fl[b:b + 1, ..., :w], f1) and (fl[b, ..., w:] == -1).all()
        assert torch.equal(bl[b:b + 1, :, :b1.shape[2]], b1)
    with pytest.raises(ValueError, match="seqused_k\\[1\\] must be in \\[0, Lk = 200\\]"):
        torch.ops.attnkit.dma_select(bias, keep, lq, causal, torch.tensor([0, 201, 3], dtype=torch.int32))


def test_dma_kvcache_op_bad_inputs():
    """The op's own checks (the Python wrapper is bypassed): errors name cache_seqlens and the row,
    and nothing is written by a failing call."""
    q, kc, vc, bc, k, v, bias = _inputs("cpu", torch.float32, 2, 1, 2, 10, 2, 2, 8, seed=14)
    kc0, vc0, bc0 = kc.clone(), vc.clone(), bc.clone()
    op = torch.ops.attnkit.dma_kvcache_fwd

    def cs(*x):
        return torch.tensor(x, dtype=torch.int32)

    with pytest.raises(ValueError, match="the cache is too short: cache_seqlens\\[1\\] \\(9\\) \\+ 2 new keys"):
        op(q, kc, vc, bc, k, v, bias, cs(1, 9), 2, True, 0.3)
    with pytest.raises(ValueError, match="cache_seqlens\\[1\\] must be >= 0, got -3"):
        op(q, kc, vc, bc, k, v, bias, cs(0, -3), 2, True, 0.3)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        op(q, kc, vc, bc, k, v, bias, cs(0, 0), 0, True, 0.3)
    with pytest.raises(RuntimeError, match="k, v and bias must be given together"):
        op(q, kc, vc, bc, k, v, None, cs(0, 0), 2, True, 0.3)
    with pytest.raises(RuntimeError, match="bias_cache must have shape"):
        op(q, kc, vc, bc[:, :, :9], k, v, bias, cs(0, 0), 2, True, 0.3)
    with pytest.raises(RuntimeError, match="cache_seqlens must be int32"):
        op(q, kc, vc, bc, k, v, bias, cs(0, 0).long(), 2, True, 0.3)
    with pytest.raises(RuntimeError, match="cache_seqlens must have shape"):
        op(q, kc, vc, bc, k, v, bias, cs(0), 2, True, 0.3)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(q, kc, vc, bc, k, v, bias[:, :, :1], cs(0, 0), 2, True, 0.3)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0) and torch.equal(bc, bc0)


def test_dma_kvcache_bad_inputs_rows():
    """Through the public function: the tensor cache_seqlens' values are checked by the op."""
    q, kc, vc, bc, k, v, bias = _inputs("cpu", torch.float32, 3, 1, 1, 10, 2, 2, 8, seed=15)
    kc0 = kc.clone()
    f = attnkit.dynamic_mask_attention_with_kvcache
    with pytest.raises(ValueError, match="the cache is too short: cache_seqlens\\[2\\] \\(10\\)"):
        f(q, kc, vc, bc, k, v, bias, cache_seqlens=torch.tensor([0, 9, 10], dtype=torch.int32), keep=2)
    with pytest.raises(ValueError, match="cache_seqlens\\[0\\] must be >= 0, got -1"):
        f(q, kc, vc, bc, cache_seqlens=torch.tensor([-1, 0, 0], dtype=torch.int32), keep=2)
    with pytest.raises(ValueError, match="the cache is too short: cache_seqlens \\(10\\)"):
        f(q, kc, vc, bc, k, v, bias, cache_seqlens=10, keep=2)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        f(q, kc, vc, bc, cache_seqlens=torch.tensor([0, 0, 0]), keep=2)
    assert torch.equal(kc, kc0)


@pytest.mark.parametrize("causal", [True, False])
def test_dma_select_seqused_k_cuda_emulation(causal):
    """The host emulation of the CUDA selection kernels (tests/dma_select_emu.py) with per-batch key
    counts reproduces the CPU op exactly (NaN, ties, a count of 0, one below keep, the full length)."""
    import numpy as np
    from dma_select_emu import select_emu

    g = np.random.default_rng(5)
    B, H, lq, lk, keep = 4, 2, 70, 200, 30
    x = g.integers(0, 4, (B, H, lk)).astype(np.float32)
    x[g.random(x.shape) < 0.1] = np.nan
    used = [0, 29, 131, 200]
    emu = select_emu(x, keep, lq, causal, used)
    cpu = torch.ops.attnkit.dma_select(torch.from_numpy(x), keep, lq, causal, torch.tensor(used, dtype=torch.int32))
    for e, c in zip(emu, cpu):
        assert torch.equal(torch.from_numpy(e).to(c.dtype), c)
