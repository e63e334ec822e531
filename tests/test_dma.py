"""Dynamic Mask Attention: mask selection, fused attention, the masked-bias compatibility path, nn module."""

import math

import pytest
import torch

import attnkit
from attnkit import reference as ref
from attnkit.reference import dma as ref_dma
from conftest import assert_close_fa


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def close(out, ref_, eager, atol, name):
    """assert_close_fa with the slack scaled by the values' magnitude once above 1.

    Why the rule alone is not enough here: atol is an absolute floor sized for O(1) values, but dk, dv
    and above all dbias (a sum over every query row and every query head of a KV head) reach hundreds
    at these lengths. The kernels sum those terms sequentially in fp32 (per key block, in query-block
    order), eager torch reduces them blockwise / pairwise: the error of a sequential fp32 sum of n
    terms grows like sqrt(n) * 2^-24 * max|term| where the blocked one grows like log(n), so the
    kernel can exceed 2 * eager error by a margin proportional to the magnitude, not to 1. Scaling
    only the atol floor (never the eager term) by max|ref| covers exactly that, and is a no-op for
    the O(1) outputs."""
    r = ref_.detach().double()
    r = r[torch.isfinite(r)]
    mag = max(1.0, r.abs().max().item()) if r.numel() else 1.0
    assert_close_fa(out, ref_, eager, atol * mag, name)


HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))]
BLOCK = 64
ATOL = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def kept_from_thresholds(bias, thr, tie, causal):
    """Dense kept mask [B, Hkv, Lq, Lk] from the compact mask (the core's predicate + visibility)."""
    b, h, lk = bias.shape
    lq = thr.shape[2]
    x = bias.float()[:, :, None, :]
    j = torch.arange(lk, device=bias.device)
    pred = (x > thr[..., None]) | ((x == thr[..., None]) & (j <= tie[..., None].long()))
    return pred & ref_dma._visible(lq, lk, causal, bias.device)


def tile_activity(kept):
    """[B, H, nQB, nKB] bool: does the tile hold a kept (and visible) element."""
    b, h, lq, lk = kept.shape
    nqb, nkb = -(-lq // BLOCK), -(-lk // BLOCK)
    pad = torch.zeros(b, h, nqb * BLOCK, nkb * BLOCK, dtype=torch.bool, device=kept.device)
    pad[:, :, :lq, :lk] = kept
    return pad.view(b, h, nqb, BLOCK, nkb, BLOCK).any(dim=5).any(dim=3)


def check_lists(sel, act):
    """The lists of a DynamicMask equal the tile activity exactly (ascending, -1 padded)."""
    b, h, nqb, nkb = act.shape
    for outer_act, lst, cnt in ((act, sel.fwd_list, sel.fwd_count), (act.transpose(2, 3), sel.bwd_list, sel.bwd_count)):
        assert torch.equal(cnt.long(), outer_act.sum(-1)), "tile counts differ"
        for bi in range(b):
            for hi in range(h):
                for o in range(outer_act.shape[2]):
                    want = torch.nonzero(outer_act[bi, hi, o]).flatten().int()
                    c = int(cnt[bi, hi, o])
                    assert torch.equal(lst[bi, hi, o, :c].cpu(), want.cpu())
                    assert bool((lst[bi, hi, o, c:] == -1).all())


def make_bias(shape, ties, device="cpu", dtype=torch.float32):
    if ties:  # few distinct values: many ties, including at the thresholds
        return torch.randint(-2, 3, shape, device=device).to(dtype)
    return torch.randn(shape, device=device).to(dtype)


# ------------------------------------------------------------------------------------------------
# Mask selection
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk", [(1, 1), (9, 9), (5, 23), (23, 5), (70, 70)])
@pytest.mark.parametrize("keep", [1, 3, 7, 64])
def test_select_matches_topk(causal, lq, lk, keep):
    b, h = 2, 3
    bias = torch.stack([torch.randperm(lk).float() for _ in range(b * h)]).view(b, h, lk)  # distinct values
    sel = attnkit.dynamic_mask_select(bias, keep=keep, lq=lq, causal=causal)
    got = kept_from_thresholds(bias, sel.thr, sel.tie, causal)
    want = torch.zeros_like(got)
    for i in range(lq):
        n = min(lk, i + lk - lq + 1) if causal else lk
        if n <= 0:
            continue
        idx = torch.topk(bias[:, :, :n], min(keep, n), dim=-1).indices  # [b, h, min(keep, n)]
        want[:, :, i].scatter_(-1, idx, True)
    assert torch.equal(got, want)


SELECT_CASES = [  # (lq, lk, keep, ties)
    *[(lq, lk, keep, ties) for lq, lk in [(1, 1), (17, 17), (17, 300), (300, 17), (130, 129)]
      for keep in (1, 7, 64, 2000) for ties in (False, True)],
    *[(lq, lk, keep, True) for lq, lk in [(1000, 1000), (1, 1000), (1000, 1)] for keep in (7, 64)],
    (1000, 1000, 1, False),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk,keep,ties", SELECT_CASES)
def test_select_matches_dense_reference(causal, lq, lk, keep, ties):
    b, h = 2, 2
    bias = make_bias((b, h, lk), ties)
    sel = attnkit.dynamic_mask_select(bias, keep=keep, lq=lq, causal=causal)
    got = kept_from_thresholds(bias, sel.thr, sel.tie, causal)
    want = ref.dynamic_mask_dense(bias, keep, lq, causal)
    assert torch.equal(got, want)
    # Every row keeps min(keep, visible) keys.
    nvis = ref_dma._visible(lq, lk, causal, "cpu").sum(-1)
    assert torch.equal(got.sum(-1), torch.clamp(nvis, max=keep).expand(b, h, lq))
    check_lists(sel, tile_activity(want))
    width = sel.fwd_list.shape[-1]
    assert width == min(-(-lk // BLOCK), keep + 2)


def test_select_bias_dtypes_and_nan():
    lk, lq, keep = 50, 50, 5
    base = torch.randn(1, 2, lk)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        x = base.to(dt)
        sel = attnkit.dynamic_mask_select(x, keep=keep, lq=lq, causal=True)
        assert torch.equal(kept_from_thresholds(x, sel.thr, sel.tie, True), ref.dynamic_mask_dense(x, keep, lq, True))
    # NaN keys are never kept; a row whose keep-th key is NaN keeps all its other visible keys.
    x = base.clone()
    x[0, 0, ::2] = float("nan")
    sel = attnkit.dynamic_mask_select(x, keep=keep, lq=lq, causal=True)
    got = kept_from_thresholds(x, sel.thr, sel.tie, True)
    assert torch.equal(got, ref.dynamic_mask_dense(x, keep, lq, True))
    assert not got[0, 0, :, ::2].any()
    # -0.0 and +0.0 tie (the core compares floats).
    z = torch.tensor([[[0.0, -0.0, 0.0, -0.0, 1.0]]])
    sel = attnkit.dynamic_mask_select(z, keep=2, lq=1, causal=False)
    assert kept_from_thresholds(z, sel.thr, sel.tie, False)[0, 0, 0].tolist() == [True, False, False, False, True]


def test_select_empty():
    sel = attnkit.dynamic_mask_select(torch.randn(0, 2, 10), keep=3, lq=4, causal=True)
    assert sel.thr.shape == (0, 2, 4) and sel.fwd_list.shape[:3] == (0, 2, 1)
    sel = attnkit.dynamic_mask_select(torch.randn(1, 2, 0), keep=3, lq=4, causal=True)
    assert sel.fwd_count.tolist() == [[[0], [0]]] and bool((sel.thr == float("-inf")).all())


# ------------------------------------------------------------------------------------------------
# Attention: forward and backward against the float64 reference
# ------------------------------------------------------------------------------------------------
def run_case(device, dtype, b, lq, lk, hq, hkv, d, keep, causal, ties=False, bias=None, scale=None):
    q = torch.randn(b, lq, hq, d, device=device)
    k = torch.randn(b, lk, hkv, d, device=device)
    v = torch.randn(b, lk, hkv, d, device=device)
    if bias is None:
        bias = make_bias((b, hkv, lk), ties, device)
    bias = bias.float().to(device)
    dout = torch.randn(b, lq, max(hq, hkv), d, device=device)

    def fwd_bwd(fn, dt, bias_dt):
        xs = [t.to(dt).requires_grad_() for t in (q, k, v)]
        bb = bias.to(bias_dt).requires_grad_()
        out, lse = fn(*xs, bb)
        grads = torch.autograd.grad(out, [*xs, bb], dout.to(dt))
        return out.detach(), lse.detach(), grads

    kern = fwd_bwd(
        lambda q_, k_, v_, b_: attnkit.dynamic_mask_attention(
            q_, k_, v_, b_, keep=keep, causal=causal, scale=scale, return_lse=True
        ),
        dtype,
        torch.float32,
    )
    rfn = lambda q_, k_, v_, b_: ref.dynamic_mask_attention(q_, k_, v_, b_, keep=keep, causal=causal, scale=scale)
    r64 = fwd_bwd(rfn, torch.float64, torch.float64)
    eager = r64 if dtype == torch.float64 else fwd_bwd(rfn, dtype, dtype)
    atol = ATOL[dtype]
    assert kern[0].dtype == dtype and kern[1].dtype == torch.float32
    close(kern[0], r64[0], eager[0], atol, "out")
    close(kern[1], r64[1], eager[1], 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2, "lse")
    for name, g, rg, eg in zip(("dq", "dk", "dv", "dbias"), kern[2], r64[2], eager[2]):
        assert g.dtype == (torch.float32 if name == "dbias" else dtype)
        close(g, rg, eg, atol * (4 if name == "dbias" else 1), name)
    return kern


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("keep", [1, 7, 64, 10_000])
@pytest.mark.parametrize(
    "lq,lk,hq,hkv",
    [(17, 17, 16, 4), (17, 40, 2, 2), (40, 17, 4, 2), (1, 1, 2, 1), (1, 33, 16, 4), (70, 130, 2, 4)],
)
def test_attention_matches_reference(device, causal, keep, lq, lk, hq, hkv):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    d = 16 if device == "cpu" else 64
    run_case(device, dtype, 2, lq, lk, hq, hkv, d, keep, causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal,keep", [(True, 7), (False, 64)])
def test_attention_long(device, causal, keep):
    dtype = torch.float32 if device == "cpu" else torch.float16
    run_case(device, dtype, 1, 1000, 1000, 2, 1, 16 if device == "cpu" else 64, keep, causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("keep", [1, 5, 64])
def test_attention_ties(device, causal, keep):
    dtype = torch.float32 if device == "cpu" else torch.float16
    run_case(device, dtype, 2, 33, 90, 4, 2, 16 if device == "cpu" else 64, keep, causal, ties=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_attention_dtypes(device, dtype):
    if device == "cuda" and dtype in (torch.float32, torch.float64):
        pytest.skip("the CUDA kernels take float16 / bfloat16")
    run_case(device, dtype, 2, 37, 70, 4, 2, 32, 9, True, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    d = 16 if device == "cpu" else 32
    # Lq > Lk causal: the first rows see no key at all.
    out, lse, grads = run_case(device, dtype, 2, 30, 10, 4, 2, d, 3, True)
    assert bool((out[:, :20] == 0).all()) and bool((lse[:, :, :20] == float("-inf")).all())
    assert bool((grads[0][:, :20] == 0).all())
    # A KV head whose biases are all -inf: its kept keys score -inf, its rows output 0, no NaN.
    bias = torch.randn(2, 2, 40)
    bias[1, 0] = float("-inf")
    bias[0, 1, 5:] = float("-inf")  # rows of this head keep -inf keys too
    out, lse, grads = run_case(device, dtype, 2, 40, 40, 4, 2, d, 3, True, bias=bias)
    assert bool((out[1, :, 0:2] == 0).all())
    for g in grads:
        assert bool(torch.isfinite(g).all())


@pytest.mark.parametrize("causal", [True, False])
def test_keep_all_equals_bias_attention(causal):
    b, lq, lk, hq, hkv, d = 2, 21, 45, 4, 2, 16
    q, k, v = torch.randn(b, lq, hq, d), torch.randn(b, lk, hkv, d), torch.randn(b, lk, hkv, d)
    bias = torch.randn(b, hkv, lk)
    for keep in (lk, 10 * lk):
        o1 = attnkit.dynamic_mask_attention(q, k, v, bias, keep=keep, causal=causal)
        o2 = attnkit.masked_bias_attention(q, k, v, attn_bias=bias[:, :, None, :], causal=causal)
        assert torch.equal(o1, o2)
    # keep >= Lk with a zero bias is SQA attention.
    o1, l1 = attnkit.dynamic_mask_attention(q, k, v, torch.zeros(b, hkv, lk), keep=lk, causal=causal, return_lse=True)
    o3, l3 = torch.ops.attnkit.sqa_fwd(q, k, v, causal, 1 / math.sqrt(d))
    assert torch.equal(o1, o3) and torch.equal(l1, l3)
    # ... and so are the gradients (dbias of the row-broadcast bias sums over rows and query heads).
    xs = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    ys = [t.clone().requires_grad_() for t in (q, k, v)]
    yb = bias[:, :, None, :].clone().requires_grad_()
    g = torch.randn(b, lq, hq, d)
    ga = torch.autograd.grad(attnkit.dynamic_mask_attention(*xs, keep=lk, causal=causal), xs, g)
    gb = torch.autograd.grad(attnkit.masked_bias_attention(*ys, attn_bias=yb, causal=causal), [*ys, yb], g)
    for x1, x2 in zip(ga, gb):
        assert torch.equal(x1, x2.view(x1.shape))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("keep", [1, 64, 300])
def test_tile_skipping_on_off_agree(device, causal, keep):
    """Bitwise equal with and without tile skipping: the skipped tiles contribute exact zeros, and
    deterministic=True sums dq's per-key-block slices in a fixed order (with fp32 atomics the order
    of the additions, hence the last bits, would change from run to run)."""
    b, l, hq, hkv, d = 2, 700, 4, 2, 64
    q = torch.randn(b, l, hq, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(b, l, hkv, d, device=device, dtype=torch.bfloat16)
    v = torch.randn(b, l, hkv, d, device=device, dtype=torch.bfloat16)
    bias = torch.randn(b, hkv, l, device=device)
    res = []
    for skip in (True, False):
        xs = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = attnkit.dynamic_mask_attention(*xs, keep=keep, causal=causal, deterministic=True, _tile_skip=skip)
        res.append((out, *torch.autograd.grad(out, xs, torch.ones_like(out))))
    for x1, x2 in zip(*res):
        assert torch.equal(x1, x2)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lq,lk", [(1, 1), (17, 300), (300, 17), (1000, 1000), (3000, 3000)])
@pytest.mark.parametrize("keep", [1, 7, 64, 2000])
def test_select_cuda_matches_cpu(device, causal, lq, lk, keep):
    for ties in (False, True):
        bias = make_bias((2, 3, lk), ties)
        a = attnkit.dynamic_mask_select(bias, keep=keep, lq=lq, causal=causal)
        c = attnkit.dynamic_mask_select(bias.to(device), keep=keep, lq=lq, causal=causal)
        for x, y in zip(a, c):
            assert torch.equal(x, y.cpu())


@pytest.mark.parametrize(
    "shape,keep,causal,kind",
    [((2, 2, 70, 200), 7, True, "nan"), ((2, 2, 200, 70), 64, True, "ties"), ((1, 2, 130, 129), 1, False, "nan"),
     ((1, 1, 300, 4200), 37, True, "ties"), ((1, 1, 17, 17), 100, True, "randn")],
)
def test_select_cuda_emulation_matches_cpu(shape, keep, causal, kind):
    """The host emulation of the CUDA selection kernels (tests/dma_select_emu.py: multi-chunk wavelet
    build, NaN / -inf / signed zeros, ties) reproduces the CPU op exactly."""
    import numpy as np
    from dma_select_emu import select_emu

    b, h, lq, lk = shape
    g = np.random.default_rng(lq * 7 + lk)
    x = g.standard_normal((b, h, lk)).astype(np.float32)
    if kind == "ties":
        x = g.integers(0, 4, (b, h, lk)).astype(np.float32)
    elif kind == "nan":
        for val, frac in ((np.nan, 0.3), (-np.inf, 0.1), (-0.0, 0.1), (0.0, 0.1)):
            x[g.random(x.shape) < frac] = val
    emu = select_emu(x, keep, lq, causal)
    cpu = torch.ops.attnkit.dma_select(torch.from_numpy(x), keep, lq, causal)
    for e, c in zip(emu, cpu):
        assert torch.equal(torch.from_numpy(e).to(c.dtype), c)


# ------------------------------------------------------------------------------------------------
# Compatibility path
# ------------------------------------------------------------------------------------------------
B, LQ, LK, HQ, HKV = 2, 37, 70, 4, 2
MASK_SHAPES = [None, (B, HQ, LQ, LK), (B, 1, LQ, LK), (1, HKV, 1, LK), (LQ, LK), (LK,), (B, HKV, LQ, 1)]
BIAS_SHAPES = [None, (B, HQ, LQ, LK), (1, HKV, LQ, LK), (B, HKV, 1, LK), (B, 1, 1, LK), (LQ, 1), (HQ, 1, LK)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask_shape,bias_shape", list(zip(MASK_SHAPES, BIAS_SHAPES)) + [(MASK_SHAPES[1], None)])
def test_masked_bias_matches_reference(device, causal, mask_shape, bias_shape):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    d = 16 if device == "cpu" else 64
    q = torch.randn(B, LQ, HQ, d, device=device)
    k = torch.randn(B, LK, HKV, d, device=device)
    v = torch.randn(B, LK, HKV, d, device=device)
    mask = None if mask_shape is None else torch.rand(mask_shape, device=device) > 0.4
    if mask is not None and mask.dim() == 4 and mask.shape[2] == LQ:
        mask[0, :, 3] = False  # a fully masked row
        mask[..., :, 64:] = False  # fully masked tiles (skipped on CUDA)
    bias = None if bias_shape is None else torch.randn(bias_shape, device=device)
    dout = torch.randn(B, LQ, HQ, d, device=device)

    def fwd_bwd(fn, dt):
        xs = [t.to(dt).requires_grad_() for t in (q, k, v)]
        bb = None if bias is None else bias.to(dt).requires_grad_()
        out, lse = fn(*xs, attn_mask=mask, attn_bias=bb, causal=causal)
        grads = torch.autograd.grad(out, xs + ([bb] if bb is not None else []), dout.to(dt))
        return out.detach(), lse.detach(), grads

    kern = fwd_bwd(lambda *a, **kw: attnkit.masked_bias_attention(*a, **kw, return_lse=True), dtype)
    r64 = fwd_bwd(ref.masked_bias_attention, torch.float64)
    eager = fwd_bwd(ref.masked_bias_attention, dtype)
    atol = ATOL[dtype]
    close(kern[0], r64[0], eager[0], atol, "out")
    close(kern[1], r64[1], eager[1], 1e-4 if dtype == torch.float32 else 1e-2, "lse")
    for name, g, rg, eg in zip(("dq", "dk", "dv", "dbias"), kern[2], r64[2], eager[2]):
        if name == "dbias":
            assert g.shape == bias.shape and g.dtype == dtype
        close(g, rg, eg, atol * (4 if name == "dbias" else 1), name)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_bias_row_bias_as_stride0_expand(device):
    """A per-row attn_bias given as a stride-0 expand over Lq still gets a per-row gradient (the core
    reads a row stride of 0 as a row-broadcast bias and would sum every row's gradient into row 0)."""
    dtype, d = (torch.float32, 16) if device == "cpu" else (torch.bfloat16, 64)
    q = torch.randn(B, LQ, HQ, d, device=device, dtype=dtype)
    k = torch.randn(B, LK, HKV, d, device=device, dtype=dtype)
    v = torch.randn(B, LK, HKV, d, device=device, dtype=dtype)
    dout = torch.randn(B, LQ, HQ, d, device=device, dtype=dtype)
    base = torch.randn(B, HQ, 1, LK, device=device)
    grads = []
    for ab in (base.expand(B, HQ, LQ, LK), base.expand(B, HQ, LQ, LK).contiguous()):
        out, lse = torch.ops.attnkit.masked_bias_fwd(q, k, v, None, ab, True, 0.3)
        grads.append(torch.ops.attnkit.masked_bias_bwd(dout, q, k, v, None, ab, out, lse, True, 0.3, True)[3])
    assert grads[0].shape == (B, HQ, LQ, LK)
    assert torch.equal(grads[0], grads[1])
    assert grads[1][:, :, 1:].abs().sum() > 0  # rows other than the first carry gradient


@pytest.mark.parametrize("device", DEVICES)
def test_masked_bias_no_query_rows(device):
    """Lq = 0 with a per-row mask and bias of zero rows: empty output, gradients of the right shapes
    (zero for k, v, since no query reads them)."""
    q = torch.randn(2, 0, HQ, 16, device=device, requires_grad=True)
    k = torch.randn(2, LK, HKV, 16, device=device, requires_grad=True)
    v = torch.randn(2, LK, HKV, 16, device=device, requires_grad=True)
    mask = torch.ones(2, HQ, 0, LK, dtype=torch.bool, device=device)
    bias = torch.randn(2, HQ, 0, LK, device=device, requires_grad=True)
    out = attnkit.masked_bias_attention(q, k, v, attn_mask=mask, attn_bias=bias, causal=True)
    assert out.shape == (2, 0, max(HQ, HKV), 16)
    gq, gk, gv, gb = torch.autograd.grad(out.sum() + (k.sum() + v.sum()) * 0, (q, k, v, bias), allow_unused=True)
    assert gq.shape == q.shape and gb.shape == bias.shape
    assert gk.abs().max().item() == 0 and gv.abs().max().item() == 0


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"))])
def test_misaligned_inputs(device):
    """q, k, v, dout whose data pointers are not 16-byte aligned (the core copies 16-byte chunks)."""
    def shifted(t):  # same values, storage offset of one element
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        return out

    q, k, v = (torch.randn(2, 70, h, 64, device=device, dtype=torch.float16) for h in (4, 2, 2))
    bias = torch.randn(2, 2, 70, device=device)
    dout = torch.randn(2, 70, 4, 64, device=device, dtype=torch.float16)
    mask = torch.rand(2, 1, 70, 70, device=device) > 0.5
    res = []
    for xs in ((q, k, v, dout), tuple(shifted(t) for t in (q, k, v, dout))):
        ins = [t.detach().requires_grad_() for t in xs[:3]]
        out = attnkit.dynamic_mask_attention(*ins, bias, keep=9, causal=True)
        res.append([out, *torch.autograd.grad(out, ins, xs[3])])
        out = attnkit.masked_bias_attention(*ins, attn_mask=mask, causal=False)
        res[-1] += [out, *torch.autograd.grad(out, ins, xs[3])]
    for a, b in zip(*res):  # dq accumulates with atomics: equal up to the summation order
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------------------------
# opcheck, compile, gradcheck
# ------------------------------------------------------------------------------------------------
def small_inputs(dtype=torch.float32, requires_grad=False, lq=13, lk=29, hq=4, hkv=2, d=8):
    q = torch.randn(2, lq, hq, d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(2, lk, hkv, d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(2, lk, hkv, d, dtype=dtype, requires_grad=requires_grad)
    bias = torch.randn(2, hkv, lk).float().to(dtype).requires_grad_(requires_grad)
    return q, k, v, bias


def test_opcheck():
    q, k, v, bias = small_inputs(requires_grad=True)
    sel = torch.ops.attnkit.dma_select(bias.detach(), 5, q.shape[1], True)
    torch.library.opcheck(torch.ops.attnkit.dma_select.default, (bias.detach(), 5, q.shape[1], True))
    fwd_args = (q, k, v, bias, *sel, True, 0.3)
    torch.library.opcheck(torch.ops.attnkit.dma_fwd.default, fwd_args)
    torch.library.opcheck(torch.ops.attnkit.dma_fwd.default, (q, k, v, bias, sel[0], sel[1], None, None, None, None, False, 0.3))
    out, lse = torch.ops.attnkit.dma_fwd(*fwd_args)
    dout = torch.randn_like(out)
    bwd_utils = ("test_schema", "test_faketensor")  # backward ops: no autograd of their own
    torch.library.opcheck(
        torch.ops.attnkit.dma_bwd.default,
        (dout, q.detach(), k.detach(), v.detach(), bias.detach(), out.detach(), lse, sel[0], sel[1], sel[4], sel[5], True, 0.3),
        test_utils=bwd_utils,
    )
    mask = torch.rand(2, 1, q.shape[1], k.shape[1]) > 0.3
    ab = torch.randn(2, 2, 1, k.shape[1], requires_grad=True)
    torch.library.opcheck(torch.ops.attnkit.masked_bias_fwd.default, (q, k, v, mask, ab, True, 0.3))
    torch.library.opcheck(torch.ops.attnkit.masked_bias_fwd.default, (q, k, v, None, None, False, 0.3))
    out, lse = torch.ops.attnkit.masked_bias_fwd(q, k, v, mask, ab, True, 0.3)
    for need in (True, False):
        torch.library.opcheck(
            torch.ops.attnkit.masked_bias_bwd.default,
            (dout, q.detach(), k.detach(), v.detach(), mask, ab.detach(), out.detach(), lse, True, 0.3, need),
            test_utils=bwd_utils,
        )


def test_compile_fullgraph():
    q, k, v, bias = small_inputs(requires_grad=True)
    mask = torch.rand(2, 1, q.shape[1], k.shape[1]) > 0.3

    def fn(q, k, v, bias):
        o1 = attnkit.dynamic_mask_attention(q, k, v, bias, keep=5, causal=True)
        o2 = attnkit.masked_bias_attention(q, k, v, attn_mask=mask, attn_bias=bias[:, :, None, :], causal=False)
        sel = attnkit.dynamic_mask_select(bias, keep=5, lq=q.shape[1], causal=True)
        return (o1 * o2).sum() + sel.thr.sum()

    cfn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    l1 = fn(q, k, v, bias)
    g1 = torch.autograd.grad(l1, (q, k, v, bias))
    l2 = cfn(q, k, v, bias)
    g2 = torch.autograd.grad(l2, (q, k, v, bias))
    assert torch.equal(l1, l2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_gradcheck():
    # The flash core's bias is float32, so finite differences on the bias need a larger step; q, k, v
    # run in float64 end to end.
    q, k, v, bias = small_inputs(torch.float64, True, lq=6, lk=9, hq=2, hkv=1, d=4)
    bias = (torch.randperm(9).double() / 3).view(1, 1, 9).repeat(2, 1, 1).requires_grad_()  # gaps >> eps
    for causal, keep in ((True, 3), (False, 4), (True, 100)):
        f = lambda q, k, v, b: attnkit.dynamic_mask_attention(q, k, v, b, keep=keep, causal=causal)
        assert torch.autograd.gradcheck(f, (q, k, v, bias), eps=1e-3, atol=2e-4, rtol=1e-3)
    mask = torch.rand(6, 9) > 0.3
    ab = torch.randn(2, 1, 6, 9).float().double().requires_grad_()
    f = lambda q, k, v, b: attnkit.masked_bias_attention(q, k, v, attn_mask=mask, attn_bias=b, causal=True)
    assert torch.autograd.gradcheck(f, (q, k, v, ab), eps=1e-3, atol=2e-4, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------
def _bad_cases():
    q, k, v, bias = small_inputs()
    dma = attnkit.dynamic_mask_attention
    mba = attnkit.masked_bias_attention
    sel = attnkit.dynamic_mask_select
    return [
        (lambda: dma(q[0], k, v, bias, keep=3), ValueError, "q must have 4 dimensions"),
        (lambda: dma(q, k.double(), v, bias, keep=3), TypeError, "k must have the dtype"),
        (lambda: dma(q, k, v[:, :-1], bias, keep=3), ValueError, "v must have the shape"),
        (lambda: dma(q, k[..., :4], v[..., :4], bias, keep=3), ValueError, "head dim"),
        (lambda: dma(q[:, :, :3], k, v, bias, keep=3), ValueError, "head counts"),
        (lambda: dma(q, k, v, bias[:, :1], keep=3), ValueError, "bias must have shape"),
        (lambda: dma(q, k, v, bias.to(torch.float16), keep=3), TypeError, "bias must be float32"),
        (lambda: dma(q, k, v, "x", keep=3), TypeError, "bias must be a torch.Tensor"),
        (lambda: dma(q, k, v, bias, keep=0), ValueError, "keep must be >= 1"),
        (lambda: dma(q, k, v, bias, keep=2.5), TypeError, "keep must be an int"),
        (lambda: dma(q, k, v, bias, keep=True), TypeError, "keep must be an int"),
        (lambda: dma(q, k, v, bias, keep=3, causal=1), TypeError, "causal must be a bool"),
        (lambda: dma(q, k, v, bias, keep=3, scale="a"), TypeError, "scale must be"),
        (lambda: sel(bias[0], keep=3, lq=4, causal=True), ValueError, "bias must be 3-D"),
        (lambda: sel(bias.int(), keep=3, lq=4, causal=True), TypeError, "bias must be a floating"),
        (lambda: sel(bias, keep=3, lq=-1, causal=True), ValueError, "lq must be"),
        (lambda: sel(bias, keep=-2, lq=4, causal=True), ValueError, "keep must be"),
        (lambda: mba(q, k, v, attn_mask=torch.ones(13, 29)), TypeError, "attn_mask must be a bool"),
        (lambda: mba(q, k, v, attn_mask=torch.ones(13, 28, dtype=torch.bool)), ValueError, "attn_mask of shape"),
        (lambda: mba(q, k, v, attn_bias=torch.ones(2, 3, 13, 29)), ValueError, "attn_bias of shape"),
        (lambda: mba(q, k, v, attn_bias=torch.ones(1, 1, 1, 1, 29)), ValueError, "attn_bias must have at most 4"),
        (lambda: mba(q, k, v, attn_bias=torch.ones(29, dtype=torch.int64)), TypeError, "attn_bias must be a floating"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs(case):
    fn, exc, msg = _bad_cases()[case]
    with pytest.raises(exc, match=msg):
        fn()


def test_op_level_errors_name_the_argument():
    q, k, v, bias = small_inputs()
    sel = torch.ops.attnkit.dma_select(bias, 3, q.shape[1], True)
    with pytest.raises(RuntimeError, match="thr must have shape"):
        torch.ops.attnkit.dma_fwd(q, k, v, bias, sel[0][:, :, 1:], sel[1], None, None, None, None, True, 1.0)
    with pytest.raises(RuntimeError, match="fwd_list and fwd_count"):
        torch.ops.attnkit.dma_fwd(q, k, v, bias, sel[0], sel[1], sel[2], None, None, None, True, 1.0)
    with pytest.raises(RuntimeError, match="keep must be >= 1"):
        torch.ops.attnkit.dma_select(bias, 0, 3, True)


# ------------------------------------------------------------------------------------------------
# nn module
# ------------------------------------------------------------------------------------------------
def test_module_dense_when_short():
    m = attnkit.nn.DynamicMaskAttention(32, 4, 2, keep=64, causal=True).double()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    y = m(x)
    # Same computation by hand: dense causal attention plus the bias.
    q = m.q_proj(x).view(2, 20, 4, 8)
    k = m.k_proj(x).view(2, 20, 2, 8)
    vf = m.v_proj(x)
    bias = m.dynamic_bias(vf).double()
    o, _ = ref.masked_bias_attention(q, k, vf.view(2, 20, 2, 8), attn_bias=bias[:, :, None, :], causal=True)
    torch.testing.assert_close(y, m.o_proj(o.reshape(2, 20, 32)), atol=1e-5, rtol=1e-5)


def test_module_trains_and_gradients_reach_dt_proj_and_A():
    torch.manual_seed(0)
    m = attnkit.nn.DynamicMaskAttention(32, 4, 2, keep=4, causal=True)
    head = torch.nn.Linear(32, 1)
    x = torch.randn(16, 24, 32)
    # Toy task: predict the running mean of feature 0 over the last 3 tokens (needs attention).
    target = torch.nn.functional.avg_pool1d(
        torch.nn.functional.pad(x[..., 0], (2, 0)).unsqueeze(1), 3, stride=1
    ).squeeze(1).unsqueeze(-1)
    opt = torch.optim.Adam([*m.parameters(), *head.parameters()], lr=1e-2)
    losses = []
    for step in range(60):
        loss = torch.nn.functional.mse_loss(head(m(x)), target)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert m.dt_proj.weight.grad is not None and m.dt_proj.weight.grad.abs().sum() > 0
            assert m.A.grad is not None and m.A.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
