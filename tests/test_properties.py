"""Property tests: every op on random shapes against attnkit.reference, forward and backward, on CPU.

Hypothesis draws the shapes: batch (0 included), sequence lengths (0 and 1 included), head ratios
both ways (more query heads than KV heads and the reverse), head dims, tensors that are transposes of
a [B, H, L, D] layout (non-contiguous rows and heads), the softmax scale, causal or not. The inputs
are float64, so the kernels' only error is float64 rounding: every check is the FlashAttention rule
with the float64 reference as its own eager baseline, i.e. max |kernel - reference| <= atol.

The budget is fixed for `make test`: derandomize=True (the same examples on every run, so CI is
reproducible), a few dozen examples per op, no per-example deadline.
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import assert_close_fa, one_thread  # noqa: E402

import attnkit  # noqa: E402
from attnkit import reference  # noqa: E402

ATOL = 1e-9  # float64 kernels against float64 oracles (outputs and gradients are O(1) here)

PROPS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _close(out, ref, name, atol=ATOL):
    assert_close_fa(out, ref, ref, atol, name)


def _close_core(g, ref, name):
    """Outputs and gradients of the flash core at float64: its softmax statistics (row max, lse) are
    float32 whatever the inputs, so P = exp(s - lse) carries a relative error of about |lse| * 2^-24
    and every element the rounding of terms of the size of the largest one. The slack is that relative
    error times max |ref| (the float64 reference is its own eager baseline): with scores up to ~20
    (scale 2, |q.k| ~ 10) and sums of up to ~100 terms, 1e-5 covers it; an indexing or masking bug
    shows as an O(1) error."""
    if g is None:
        g = torch.zeros_like(ref)
    if ref is None:
        ref = torch.zeros_like(g)
    mag = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    assert_close_fa(g, ref, ref, 1e-5 * mag, name)


def _close_lse(lse, ref, name="lse"):
    """lse is float32 whatever the inputs: its eager baseline is the float64 lse rounded to float32."""
    assert lse.dtype == torch.float32, f"{name}: dtype {lse.dtype}"
    assert_close_fa(lse, ref, ref.float(), 1e-6, name)


def _tensor(draw, gen, B, L, H, D, name):
    """A float64 [B, L, H, D] tensor: contiguous, or the transpose of a contiguous [B, H, L, D] one."""
    if draw(st.booleans(), label=f"{name} transposed"):
        return torch.randn(B, H, L, D, generator=gen, dtype=torch.float64).transpose(1, 2)
    return torch.randn(B, L, H, D, generator=gen, dtype=torch.float64)


def _heads(draw):
    """(Hq, Hkv) with one a multiple of the other, both directions."""
    base = draw(st.integers(1, 2), label="base heads")
    ratio = draw(st.integers(1, 3), label="head ratio")
    if draw(st.booleans(), label="more query heads"):
        return base * ratio, base
    return base, base * ratio


def _scale(draw, D):
    if draw(st.booleans(), label="default scale"):
        return None, 1.0 / math.sqrt(D)
    s = draw(st.floats(0.05, 2.0), label="scale")
    return s, s


def _grads(out, leaves, gen):
    """Gradients of <out, dout> for a fixed random dout (zeros where out has no element)."""
    dout = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    need = [t for t in leaves if t.requires_grad]
    return torch.autograd.grad(out, need, dout, allow_unused=True), dout


def _grad_or_zeros(outs, leaves, gouts):
    """torch.autograd.grad over the outputs that are in a graph (an empty problem may give outputs
    that are not, e.g. the reference with no sequence at all): their gradients are zeros."""
    pairs = [(o, g) for o, g in zip(outs, gouts) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(t) for t in leaves]
    got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, got)]


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@st.composite
def sqa_case(draw):
    B = draw(st.integers(0, 2), label="B")
    Lq = draw(st.sampled_from([0, 1, 2, 5, 17, 64, 70]), label="Lq")
    Lk = draw(st.sampled_from([0, 1, 3, 16, 65, 80]), label="Lk")
    Hq, Hkv = _heads(draw)
    D = draw(st.sampled_from([1, 8, 16, 24, 64]), label="D")
    causal = draw(st.booleans(), label="causal")
    scale, eff = _scale(draw, D)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="seed"))
    q = _tensor(draw, gen, B, Lq, Hq, D, "q")
    k = _tensor(draw, gen, B, Lk, Hkv, D, "k")
    v = _tensor(draw, gen, B, Lk, Hkv, D, "v")
    return q, k, v, causal, scale, eff, gen


@PROPS
@given(sqa_case())
def test_sqa_properties(case):
    q, k, v, causal, scale, eff, gen = case
    with one_thread():
        lv = _leaves(q, k, v)
        out, lse = attnkit.sparse_query_attention(*lv, causal=causal, scale=scale, return_lse=True)
        rv = _leaves(q, k, v)
        ref, ref_lse = reference.sqa_reference(*rv, causal=causal, scale=eff, return_lse=True)
        _close_core(out, ref, "out")
        _close_lse(lse, ref_lse)
        g, dout = _grads(out, lv, gen)
        rg = torch.autograd.grad(ref, rv, dout, allow_unused=True)
    for name, a, r in zip(("dq", "dk", "dv"), g, rg):
        _close_core(a, r, name)


@st.composite
def dma_case(draw):
    B = draw(st.integers(0, 2), label="B")
    Lq = draw(st.sampled_from([0, 1, 2, 9, 64, 70]), label="Lq")
    Lk = draw(st.sampled_from([0, 1, 5, 64, 77]), label="Lk")
    Hq, Hkv = _heads(draw)
    D = draw(st.sampled_from([8, 16, 32]), label="D")
    causal = draw(st.booleans(), label="causal")
    keep = draw(st.integers(1, max(1, Lk + 1)), label="keep")
    scale, eff = _scale(draw, D)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="seed"))
    q = _tensor(draw, gen, B, Lq, Hq, D, "q")
    k = _tensor(draw, gen, B, Lk, Hkv, D, "k")
    v = _tensor(draw, gen, B, Lk, Hkv, D, "v")
    bias = torch.randn(B, Hkv, Lk, generator=gen, dtype=torch.float64)
    tile_skip = draw(st.booleans(), label="tile skipping")
    return q, k, v, bias, keep, causal, scale, eff, tile_skip, gen


@PROPS
@given(dma_case())
def test_dma_properties(case):
    q, k, v, bias, keep, causal, scale, eff, tile_skip, gen = case
    with one_thread():
        lv = _leaves(q, k, v, bias)
        out, lse = attnkit.dynamic_mask_attention(*lv, keep=keep, causal=causal, scale=scale, return_lse=True,
                                                  _tile_skip=tile_skip)
        rv = _leaves(q, k, v, bias)
        ref, ref_lse = reference.dynamic_mask_attention(*rv, keep=keep, causal=causal, scale=eff)
        _close_core(out, ref, "out")
        _close_lse(lse, ref_lse)
        g, dout = _grads(out, lv, gen)
        rg = torch.autograd.grad(ref, rv, dout, allow_unused=True)
    for name, a, r in zip(("dq", "dk", "dv", "dbias"), g, rg):
        _close_core(a, r, name)


@st.composite
def masked_bias_case(draw):
    B = draw(st.integers(0, 2), label="B")
    Lq = draw(st.sampled_from([0, 1, 3, 64, 66]), label="Lq")
    Lk = draw(st.sampled_from([0, 1, 7, 65]), label="Lk")
    Hq, Hkv = _heads(draw)
    hout = max(Hq, Hkv)
    D = draw(st.sampled_from([8, 16, 32]), label="D")
    causal = draw(st.booleans(), label="causal")
    scale, eff = _scale(draw, D)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="seed"))
    q = _tensor(draw, gen, B, Lq, Hq, D, "q")
    k = _tensor(draw, gen, B, Lk, Hkv, D, "k")
    v = _tensor(draw, gen, B, Lk, Hkv, D, "v")
    mask = bias = None
    if draw(st.booleans(), label="mask"):
        hm = draw(st.sampled_from([1, hout]), label="mask heads")
        rows = draw(st.sampled_from([1, Lq]), label="mask rows")  # Lq = 0: a per-row mask of zero rows
        mask = torch.rand(B, hm, rows, Lk, generator=gen) < 0.8
    if draw(st.booleans(), label="bias"):
        hb = draw(st.sampled_from([1, hout]), label="bias heads")
        rows = draw(st.sampled_from([1, Lq]), label="bias rows")
        bias = torch.randn(B, hb, rows, Lk, generator=gen, dtype=torch.float64)
    return q, k, v, mask, bias, causal, scale, eff, gen


@PROPS
@given(masked_bias_case())
def test_masked_bias_properties(case):
    q, k, v, mask, bias, causal, scale, eff, gen = case
    with one_thread():
        lv = _leaves(q, k, v) + (_leaves(bias) if bias is not None else [])
        out = attnkit.masked_bias_attention(lv[0], lv[1], lv[2], attn_mask=mask,
                                            attn_bias=lv[3] if bias is not None else None, causal=causal, scale=scale)
        rv = _leaves(q, k, v) + (_leaves(bias) if bias is not None else [])
        ref, _ = reference.masked_bias_attention(rv[0], rv[1], rv[2], attn_mask=mask,
                                                 attn_bias=rv[3] if bias is not None else None, causal=causal,
                                                 scale=eff)
        _close_core(out, ref, "out")
        g, dout = _grads(out, lv, gen)
        rg = torch.autograd.grad(ref, rv, dout, allow_unused=True)
    for name, a, r in zip(("dq", "dk", "dv", "dbias"), g, rg):
        _close_core(a, r, name)


@st.composite
def lightning_case(draw):
    varlen = draw(st.booleans(), label="cu_seqlens")
    H = draw(st.integers(1, 3), label="H")
    Dk = draw(st.sampled_from([1, 8, 16, 33]), label="Dk")
    Dv = draw(st.sampled_from([1, 8, 16, 40]), label="Dv")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="seed"))
    if varlen:
        lens = draw(st.lists(st.sampled_from([0, 1, 2, 7, 40]), min_size=0, max_size=3), label="lengths")
        B, L = 1, sum(lens)
        cu = torch.tensor([0] + [sum(lens[: i + 1]) for i in range(len(lens))], dtype=torch.int32)
        N = len(lens)
    else:
        B = draw(st.integers(0, 2), label="B")
        L = draw(st.sampled_from([0, 1, 2, 31, 70]), label="L")
        cu, N = None, B
    q = _tensor(draw, gen, B, L, H, Dk, "q")
    k = _tensor(draw, gen, B, L, H, Dk, "k") * 0.5
    v = _tensor(draw, gen, B, L, H, Dv, "v")
    slopes = torch.rand(H, generator=gen, dtype=torch.float64) * 0.5 + 0.01
    scale = draw(st.floats(0.1, 1.5), label="scale")
    init = torch.randn(N, H, Dk, Dv, generator=gen, dtype=torch.float64) if draw(st.booleans(), label="init") else None
    block = draw(st.sampled_from([None, 16, 32]), label="block_size")
    return q, k, v, slopes, scale, init, cu, block, gen


@PROPS
@given(lightning_case())
def test_lightning_properties(case):
    q, k, v, slopes, scale, init, cu, block, gen = case
    with one_thread():
        lv = _leaves(q, k, v) + (_leaves(init) if init is not None else [])
        o, fin = attnkit.lightning_attention(lv[0], lv[1], lv[2], slopes, scale=scale,
                                             initial_state=lv[3] if init is not None else None,
                                             output_final_state=True, cu_seqlens=cu, block_size=block)
        rv = _leaves(q, k, v) + (_leaves(init) if init is not None else [])
        ro, rfin = reference.lightning_attention_reference(rv[0], rv[1], rv[2], slopes, scale=scale,
                                                           initial_state=rv[3] if init is not None else None,
                                                           cu_seqlens=cu)
        _close(o, ro, "o", 1e-8)
        _close(fin, rfin, "final_state", 1e-8)
        do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
        dfin = torch.randn(fin.shape, generator=gen, dtype=fin.dtype)
        outs, routs = (o, fin), (ro, rfin)
        g = _grad_or_zeros(outs, lv, (do, dfin))
        rg = _grad_or_zeros(routs, rv, (do, dfin))
    for name, a, r in zip(("dq", "dk", "dv", "dinit"), g, rg):
        _close(a if a is not None else torch.zeros_like(r), r if r is not None else torch.zeros_like(a), name, 1e-8)


@st.composite
def decode_case(draw):
    B = draw(st.integers(0, 3), label="B")
    H = draw(st.integers(1, 3), label="H")
    Dk = draw(st.sampled_from([1, 8, 16, 33]), label="Dk")
    Dv = draw(st.sampled_from([1, 8, 40]), label="Dv")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="seed"))
    q = _tensor(draw, gen, B, 1, H, Dk, "q")
    k = _tensor(draw, gen, B, 1, H, Dk, "k")
    v = _tensor(draw, gen, B, 1, H, Dv, "v")
    state = torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64)
    slopes = torch.rand(H, generator=gen, dtype=torch.float64) * 0.5 + 0.01
    scale = draw(st.floats(0.1, 1.5), label="scale")
    return q, k, v, state, slopes, scale


@PROPS
@given(decode_case())
def test_lightning_decode_properties(case):
    q, k, v, state, slopes, scale = case
    with one_thread():
        s = state.clone()
        o, s_new = attnkit.lightning_attention_decode(q, k, v, s, slopes, scale=scale, inplace=False)
        ro, rs = reference.lightning_attention_decode_reference(q, k, v, state, slopes, scale=scale)
    _close(o, ro, "o")
    _close(s_new, rs, "state")
    _close(s, state, "state left alone (inplace=False)", 0.0)


def _centroids(gen, H, C, D):
    mu = torch.randn(H, C, D, generator=gen, dtype=torch.float64)
    return mu / mu.norm(dim=-1, keepdim=True)


@st.composite
def routing_case(draw):
    B = draw(st.integers(0, 2), label="B")
    L = draw(st.sampled_from([1, 2, 9, 40, 70]), label="L")
    H = draw(st.integers(1, 2), label="H")
    D = draw(st.sampled_from([4, 8, 16, 32]), label="D")
    C = draw(st.integers(1, 4), label="C")
    w = draw(st.integers(1, L), label="cluster_size")
    shared = draw(st.booleans(), label="shared_qk")
    causal = draw(st.booleans(), label="causal")
    scale, eff = _scale(draw, D)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="seed"))
    q = _tensor(draw, gen, B, L, H, D, "q")
    k = _tensor(draw, gen, B, L, H, D, "k")
    v = _tensor(draw, gen, B, L, H, D, "v")
    return q, k, v, _centroids(gen, H, C, D), w, shared, causal, scale, eff, gen


@PROPS
@given(routing_case())
def test_routing_properties(case):
    q, k, v, mu, w, shared, causal, scale, eff, gen = case
    with one_thread():
        qi, ki = attnkit.routing_assign(q, None if shared else k, mu, cluster_size=w, shared_qk=shared)
        rqi, rki = reference.routing_assign_ref(q, None if shared else k, mu, w, shared_qk=shared)
        # random float64 scores have no ties: the lists are equal
        assert torch.equal(qi.long(), rqi) and torch.equal(ki.long(), rki)
        kk = None if shared else k
        lv = _leaves(q, v) if shared else _leaves(q, k, v)
        lq, lk, lvv = (lv[0], None, lv[1]) if shared else lv
        out = attnkit.routing_attention(lq, lk, lvv, qi, ki, causal=causal, shared_qk=shared, scale=scale)
        rv = _leaves(q, v) if shared else _leaves(q, kk, v)
        rq, rk, rvv = (rv[0], None, rv[1]) if shared else rv
        ref = reference.routing_attention_ref(rq, rk, rvv, rqi, rki, causal=causal, shared_qk=shared, scale=eff)
        _close_core(out, ref, "out")
        g, dout = _grads(out, lv, gen)
        rg = torch.autograd.grad(ref, rv, dout, allow_unused=True)
    names = ("dq", "dv") if shared else ("dq", "dk", "dv")
    for name, a, r in zip(names, g, rg):
        _close_core(a, r, name)


@st.composite
def kmeans_case(draw):
    N = draw(st.sampled_from([0, 1, 2, 7, 50]), label="N")
    H = draw(st.integers(1, 3), label="H")
    D = draw(st.sampled_from([1, 4, 16, 64]), label="D")
    C = draw(st.integers(1, 5), label="C")
    decay = draw(st.sampled_from([0.0, 0.5, 0.99, 1.0]), label="decay")
    given_assign = draw(st.booleans(), label="given assign")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="seed"))
    x = torch.randn(N, H, D, generator=gen, dtype=torch.float64)
    if draw(st.booleans(), label="x transposed"):
        x = torch.randn(H, N, D, generator=gen, dtype=torch.float64).transpose(0, 1)
    assign = torch.randint(0, C, (N, H), generator=gen, dtype=torch.int32) if given_assign else None
    return x, _centroids(gen, H, C, D), decay, assign


@PROPS
@given(kmeans_case())
def test_kmeans_properties(case):
    x, mu, decay, assign = case
    with one_thread():
        a = attnkit.kmeans_assign(x, mu)
        assert torch.equal(a.long(), reference.kmeans_assign_ref(x, mu))
        new = mu.clone()
        attnkit.kmeans_ema_update_(new, x, decay=decay, assign=assign)
        ref = reference.kmeans_ema_update_ref(mu, x, decay, assign=assign)
    # the kernel sums in fixed point (2^-32 steps): about 1e-9 per summed unit vector
    _close(new, ref, "centroids", 1e-7)
