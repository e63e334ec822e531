"""sparse_query_attention's window_size and deterministic flags: the op against the float64
reference (FlashAttention's tolerance rule), opcheck, torch.compile and input errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close_fa, one_thread

import attnkit
from attnkit.reference import sqa_reference

LOW = [torch.float16, torch.bfloat16]
DEV_DTYPES = [("cpu", torch.float32)] + [(d, t) for d in DEVICES for t in LOW]
ATOL_FWD = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-6}
ATOL_BWD = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-5}


def _make(B, Lq, Lk, Hq, Hkv, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(B, L, H, D, generator=g).to(device=device, dtype=dtype)
        for L, H in ((Lq, Hq), (Lk, Hkv), (Lk, Hkv))
    )


def _leaf(t, dtype=None):
    return t.detach().clone().to(dtype or t.dtype).requires_grad_(True)


def visible_mask(Lq, Lk, causal, window, device="cpu"):
    """[Lq, Lk] bool: key j visible to query i (bottom-right aligned), written independently of
    the reference's masking so the two cross-check each other."""
    vis = torch.zeros(Lq, Lk, dtype=torch.bool)
    for i in range(Lq):
        a = i + Lk - Lq
        for j in range(Lk):
            ok = not (causal and j > a)
            ok = ok and (window[0] < 0 or j >= a - window[0])
            ok = ok and (window[1] < 0 or j <= a + window[1])
            vis[i, j] = ok
    return vis.to(device)


def eager(q, k, v, causal, window, scale):
    """The same math in plain PyTorch at the inputs' dtype (the 'eager' term of the FA rule)."""
    Hq, Hkv = q.shape[2], k.shape[2]
    H = max(Hq, Hkv)
    q = q.repeat_interleave(H // Hq, dim=2).transpose(1, 2)
    k = k.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
    v = v.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
    s = (q @ k.transpose(-1, -2)) * scale
    vis = visible_mask(s.shape[-2], s.shape[-1], causal, window, q.device)
    s = s.masked_fill(~vis, float("-inf"))
    seen = torch.isfinite(s).any(-1, keepdim=True)
    p = torch.where(seen, torch.softmax(torch.where(seen, s, 0.0), dim=-1), 0.0).to(v.dtype)
    return (p @ v).transpose(1, 2)


def check(q, k, v, causal, window, deterministic=False, backward=True):
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5
    qa, ka, va = _leaf(q), _leaf(k), _leaf(v)
    out, lse = attnkit.sparse_query_attention(
        qa, ka, va, causal=causal, window_size=window, deterministic=deterministic, return_lse=True
    )
    with one_thread():
        qr, kr, vr = _leaf(q, torch.float64), _leaf(k, torch.float64), _leaf(v, torch.float64)
        ref, ref_lse = sqa_reference(qr, kr, vr, causal=causal, return_lse=True, window_size=window)
        qe, ke, ve = _leaf(q), _leaf(k), _leaf(v)
        eag = eager(qe, ke, ve, causal, window, scale)
    assert_close_fa(out, ref, eag, ATOL_FWD[dtype], "out")
    torch.testing.assert_close(lse.cpu(), ref_lse.float().cpu(), atol=1e-4, rtol=1e-5)
    if not backward:
        return
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(device=out.device, dtype=dtype)
    grads = torch.autograd.grad(out, (qa, ka, va), dout)
    with one_thread():
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.double())
        eager_grads = torch.autograd.grad(eag, (qe, ke, ve), dout)
    for name, a, r, e in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads):
        assert_close_fa(a, r, e, ATOL_BWD[dtype], name)


def test_reference_window_matches_mask():
    # The reference's window masking agrees with the independent visible_mask above.
    q, k, v = _make(1, 7, 12, 1, 1, 8, torch.float64, "cpu")
    for causal, window in [(False, (2, 1)), (True, (3, -1)), (False, (0, 0)), (False, (-1, 0)), (True, (1, 5))]:
        out = sqa_reference(q, k, v, causal=causal, window_size=window)
        s = (q[0, :, 0] @ k[0, :, 0].T) * 8**-0.5
        s = s.masked_fill(~visible_mask(7, 12, causal, window), float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1))
        torch.testing.assert_close(out[0, :, 0], p @ v[0, :, 0])


WINDOWS = [(0, 0), (3, 0), (0, 5), (16, 4), (4, 70), (-1, 2), (130, -1), (-1, -1)]


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=[f"{d}-{str(t)[6:]}" for d, t in DEV_DTYPES])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", WINDOWS, ids=[f"w{a}_{b}" for a, b in WINDOWS])
def test_window(device, dtype, causal, window):
    # Lq < Lk and several 64-wide tiles, so tile skipping on both sides is exercised.
    q, k, v = _make(2, 150, 200, 4, 2, 32, dtype, device, seed=window[0] * 3 + window[1])
    check(q, k, v, causal, window)


LQK = [(1, 300), (200, 70), (70, 200), (129, 129)]


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=[f"{d}-{str(t)[6:]}" for d, t in DEV_DTYPES])
@pytest.mark.parametrize("lq,lk", LQK, ids=[f"{a}x{b}" for a, b in LQK])
def test_window_lengths(device, dtype, lq, lk):
    # Lq > Lk shifts the aligned positions below 0: early rows may see no key at all (lse = -inf).
    q, k, v = _make(1, lq, lk, 2, 4, 64, dtype, device, seed=lq + lk)
    check(q, k, v, False, (5, 3))
    check(q, k, v, True, (40, 7))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    q, k, v = _make(2, 130, 150, 8, 2, 64, dtype, device)
    check(q, k, v, True, (50, -1), deterministic=True)
    grads = []
    for _ in range(2):
        qa, ka, va = _leaf(q), _leaf(k), _leaf(v)
        out = attnkit.sparse_query_attention(qa, ka, va, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out.float().square().sum(), (qa, ka, va)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, k, v = _make(2, 9, 13, 4, 2, 32, dtype, device)
    for t in (q, k, v):
        t.requires_grad_(True)
    for w in [(2, 1), (0, -1), (-1, 0)]:
        torch.library.opcheck(torch.ops.attnkit.sqa_fwd.default, (q, k, v, False, 0.2, *w))
    torch.library.opcheck(torch.ops.attnkit.sqa_fwd_det.default, (q, k, v, True, 0.2, 3, -1))
    with torch.no_grad():
        out, lse = torch.ops.attnkit.sqa_fwd(q, k, v, False, 0.2, 3, 2)
    dout = torch.randn_like(out)
    for det in (False, True):
        torch.library.opcheck(
            torch.ops.attnkit.sqa_bwd.default, (dout, q.detach(), k.detach(), v.detach(), out, lse, False, 0.2, 3, 2, det)
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_torch_compile(device, deterministic):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch._dynamo.reset()

    def f(q, k, v):
        out, lse = attnkit.sparse_query_attention(
            q, k, v, causal=True, window_size=(5, 2), deterministic=deterministic, return_lse=True
        )
        return out.float().square().sum(), lse

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = _make(2, 20, 24, 4, 2, 32, dtype, device)
    args, args2 = [_leaf(t) for t in (q, k, v)], [_leaf(t) for t in (q, k, v)]
    loss, lse = cf(*args)
    loss.backward()
    loss2, lse2 = f(*args2)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(lse, lse2)
    for a, b in zip(args, args2):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize(
    "window,exc,msg",
    [
        ((-2, 0), ValueError, "window_size left"),
        ((0, -5), ValueError, "window_size right"),
        ((1.0, 2), TypeError, "window_size left must be an int"),
        ((1, True), TypeError, "window_size right must be an int"),
        ((1, 2, 3), TypeError, "window_size must be a pair"),
        (4, TypeError, "window_size must be a pair"),
    ],
)
def test_bad_window(window, exc, msg):
    q, k, v = _make(1, 4, 4, 2, 2, 8, torch.float32, "cpu")
    with pytest.raises(exc, match=msg):
        attnkit.sparse_query_attention(q, k, v, window_size=window)


def test_bad_window_reaches_op_checks():
    q, k, v = _make(1, 4, 4, 2, 2, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="window_size"):
        torch.ops.attnkit.sqa_fwd(q, k, v, False, 0.5, -3, 0)


def test_bad_deterministic():
    q, k, v = _make(1, 4, 4, 2, 2, 8, torch.float32, "cpu")
    with pytest.raises(TypeError, match="deterministic"):
        attnkit.sparse_query_attention(q, k, v, deterministic=1)
