"""Lightning attention: kernels vs the float64 recurrence of attnkit.reference, on CPU (and CUDA when
a GPU is visible)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, assert_close_fa

import attnkit
from attnkit.reference import (
    lightning_attention_decode_reference,
    lightning_attention_reference,
    lightning_slopes_reference,
)

ops = torch.ops.attnkit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The reference is a Python loop of small ops: intra-op threads only contend on small CI machines.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Relative slack (times max |reference|) added to the FlashAttention rule, per dtype. Why the rule's
# plain atol is not enough: the eager baseline runs the recurrence step by step (S_t = lam S_{t-1} +
# k_t^T v_t, fp32 state), the kernels the chunked form (a masked q k^T block plus the state carried
# across chunks, summed in another order). The states sum up to ~1/slope steps (slopes go down to
# 2^-10 here), so states and dslopes reach magnitudes in the hundreds, and the difference between
# two fp32 association orders is proportional to that magnitude (2^-24 per term, times the size of
# the terms), which a fixed atol sized for O(1) values cannot cover. The eager term stays unscaled.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
FWD_NAMES = ("o", "final_state")
GRAD_NAMES = ("dq", "dk", "dv", "dslopes", "dinitial_state")


def _inputs(B, L, H, Dk, Dv, dtype, device, seed=0, n_states=None):
    g = torch.Generator().manual_seed(seed)
    q = (0.5 * torch.randn(B, L, H, Dk, generator=g)).to(device=device, dtype=dtype)
    k = (0.5 * torch.randn(B, L, H, Dk, generator=g)).to(device=device, dtype=dtype)
    v = torch.randn(B, L, H, Dv, generator=g).to(device=device, dtype=dtype)
    # A spread of decays: fast (s = 1) to almost none (s = 2^-8 / 4).
    slopes = attnkit.lightning_slopes(H).to(device) * torch.linspace(4.0, 0.25, H, device=device)
    init = torch.randn(n_states or B, H, Dk, Dv, generator=g).to(device)
    return q, k, v, slopes, init


def _run_with_grads(fn, q, k, v, slopes, init, go, gf):
    """(o, final, dq, dk, dv, dslopes, dinit) of fn(q, k, v, slopes, init) -> (o, final), for the loss
    <o, go> + <final, gf> (computed in float64)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, slopes, init)]
    o, final = fn(*leaves)
    loss = (o.double() * go.double()).sum() + (final.double() * gf.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [o, final, *grads]


def _check_all(kern, ref, eager, dtype, names):
    for name, a, r, e in zip(names, kern, ref, eager):
        atol = RTOL[dtype] * max(1.0, r.abs().max().item() if r.numel() else 0.0)
        assert_close_fa(a, r, e, atol, name)


# ------------------------------------------------------------------------------------------------
# Slopes
# ------------------------------------------------------------------------------------------------


def test_slopes_values():
    s8 = attnkit.lightning_slopes(8)
    assert s8.dtype == torch.float32
    torch.testing.assert_close(s8, torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # ALiBi's rule for 6 heads: the 4-head slopes, then the 1st and 3rd of the 8-head slopes.
    torch.testing.assert_close(
        attnkit.lightning_slopes(6), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])
    )
    for h in (1, 3, 5, 12, 32, 40):
        torch.testing.assert_close(attnkit.lightning_slopes(h).double(), torch.tensor(lightning_slopes_reference(h)).double())
    # Layer scaling: 1 - l / (n - 1) + 1e-5.
    torch.testing.assert_close(attnkit.lightning_slopes(4, 0, 5), attnkit.lightning_slopes(4) * (1 + 1e-5))
    torch.testing.assert_close(attnkit.lightning_slopes(4, 4, 5), attnkit.lightning_slopes(4) * 1e-5)
    torch.testing.assert_close(attnkit.lightning_slopes(4, 1, 5), attnkit.lightning_slopes(4) * (0.75 + 1e-5))
    torch.testing.assert_close(attnkit.lightning_slopes(4, 0, 1), attnkit.lightning_slopes(4) * (1 + 1e-5))


def test_slopes_errors():
    with pytest.raises(ValueError, match="num_heads"):
        attnkit.lightning_slopes(0)
    with pytest.raises(TypeError, match="num_heads"):
        attnkit.lightning_slopes(2.0)
    with pytest.raises(ValueError, match="layer_idx and num_layers"):
        attnkit.lightning_slopes(4, layer_idx=1)
    with pytest.raises(ValueError, match="layer_idx"):
        attnkit.lightning_slopes(4, 5, 5)


# ------------------------------------------------------------------------------------------------
# Forward and backward against the reference
# ------------------------------------------------------------------------------------------------

# (L, Dk, Dv): Dk != Dv throughout, dims not powers of two where the reference stays cheap.
SHAPES = [(1, 32, 48), (15, 32, 48), (64, 16, 48), (100, 48, 32), (1000, 16, 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L,Dk,Dv", SHAPES)
def test_fwd_bwd_vs_reference(device, dtype, L, Dk, Dv):
    B, H, scale = (2, 2, 0.5) if L < 1000 else (1, 2, 0.25)
    q, k, v, slopes, init = _inputs(B, L, H, Dk, Dv, dtype, device, seed=L)
    g = torch.Generator().manual_seed(L + 1)
    go = torch.randn(B, L, H, Dv, generator=g).to(device=device, dtype=dtype)
    gf = torch.randn(B, H, Dk, Dv, generator=g).to(device)

    def kernel(q, k, v, s, i):
        return attnkit.lightning_attention(q, k, v, s, scale=scale, initial_state=i, output_final_state=True)

    def reference(q, k, v, s, i):
        return lightning_attention_reference(q, k, v, s, scale=scale, initial_state=i)

    def eager(q, k, v, s, i):
        return lightning_attention_reference(q, k, v, s, scale=scale, initial_state=i, dtype=dtype, state_dtype=torch.float32)

    kern = _run_with_grads(kernel, q, k, v, slopes, init, go, gf)
    ref = _run_with_grads(reference, *(t.double().cpu() for t in (q, k, v, slopes, init)), go.cpu(), gf.cpu())
    eag = _run_with_grads(eager, *(t.cpu() for t in (q, k, v, slopes, init)), go.cpu(), gf.cpu())
    assert kern[0].dtype == dtype and kern[1].dtype == torch.float32
    assert kern[2].dtype == dtype and kern[5].dtype == torch.float32
    _check_all(kern, ref, eag, dtype, FWD_NAMES + GRAD_NAMES)


def test_no_initial_state_no_final_state(device):
    q, k, v, slopes, _ = _inputs(2, 37, 3, 16, 32, torch.float32, device)
    o, final = attnkit.lightning_attention(q, k, v, slopes)
    assert final is None
    ref, _ = lightning_attention_reference(q.cpu(), k.cpu(), v.cpu(), slopes.cpu())
    torch.testing.assert_close(o.double().cpu(), ref, atol=1e-4, rtol=1e-5)
    # Gradient without initial state, slopes not requiring grad: q, k, v only.
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, _ = attnkit.lightning_attention(qq, kk, vv, slopes, scale=0.3)
    go = torch.randn_like(o)
    grads = torch.autograd.grad((o * go).sum(), (qq, kk, vv))
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ro, _ = lightning_attention_reference(q64, k64, v64, slopes.cpu(), scale=0.3)
    rgrads = torch.autograd.grad((ro * go.double().cpu()).sum(), (q64, k64, v64))
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a.double().cpu(), r, atol=1e-4, rtol=1e-5)


def test_closed_form():
    """The recurrence equals its closed form o_t = scale sum_{s<=t} lambda^(t-s) (q_t.k_s) v_s
    + scale lambda^(t+1) q_t S_{-1} (checks the reference itself, independently of the kernels)."""
    B, L, H, Dk, Dv = 1, 9, 2, 3, 4
    q, k, v, slopes, init = (t.double() for t in _inputs(B, L, H, Dk, Dv, torch.float64, "cpu"))
    o, _ = lightning_attention_reference(q, k, v, slopes, scale=0.7, initial_state=init)
    lam = torch.exp(-slopes)
    t = torch.arange(L, dtype=torch.float64)
    decay = lam[:, None, None] ** (t[:, None] - t[None, :]).clamp(min=0) * (t[:, None] >= t[None, :])
    scores = torch.einsum("bthd,bshd->bhts", q, k) * decay
    closed = 0.7 * torch.einsum("bhts,bshe->bthe", scores, v)
    closed = closed + 0.7 * torch.einsum("bthd,bhde->bthe", q * (lam[None, None, :, None] ** (t[None, :, None, None] + 1)), init)
    torch.testing.assert_close(o, closed)


# ------------------------------------------------------------------------------------------------
# Chunking / splitting invariance
# ------------------------------------------------------------------------------------------------


def _block_sizes(device):
    return [32, 64] if device == "cuda" else [1, 5, 16, 64, 200]


@pytest.mark.parametrize("L", [77, 300])
def test_chunking_invariance(device, L):
    dtype = torch.float64 if device == "cpu" else torch.float32
    q, k, v, slopes, init = _inputs(2, L, 2, 16, 24, dtype, device, seed=3)
    init = init.to(dtype)
    slopes = slopes.to(torch.float64 if dtype == torch.float64 else torch.float32)
    go = torch.randn(2, L, 2, 24, dtype=dtype, device=device)
    gf = torch.randn(2, 2, 16, 24, dtype=init.dtype, device=device)
    results = []
    for bs in _block_sizes(device):
        for splits in (1, 3):

            def fn(q, k, v, s, i, bs=bs, splits=splits):
                return attnkit.lightning_attention(
                    q, k, v, s, scale=0.5, initial_state=i, output_final_state=True, block_size=bs, num_splits=splits
                )

            results.append(((bs, splits), _run_with_grads(fn, q, k, v, slopes, init, go, gf)))
    (_, base) = results[0]
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-5)
    for cfg, res in results[1:]:
        for name, a, b in zip(FWD_NAMES + GRAD_NAMES, res, base):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{cfg} {name}: {m}")


# ------------------------------------------------------------------------------------------------
# Variable lengths
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cu_seqlens(device, dtype):
    lens = [0, 1, 77, 0, 30]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    T, H, Dk, Dv, N = sum(lens), 2, 16, 32, len(lens)
    q, k, v, slopes, init = _inputs(1, T, H, Dk, Dv, dtype, device, seed=5, n_states=N)
    g = torch.Generator().manual_seed(6)
    go = torch.randn(1, T, H, Dv, generator=g).to(device=device, dtype=dtype)
    gf = torch.randn(N, H, Dk, Dv, generator=g).to(device)

    def kernel(q, k, v, s, i):
        return attnkit.lightning_attention(q, k, v, s, initial_state=i, output_final_state=True, cu_seqlens=cu, block_size=32)

    kern = _run_with_grads(kernel, q, k, v, slopes, init, go, gf)
    cpu = [t.cpu() for t in (q, k, v, slopes, init)]
    ref = _run_with_grads(
        lambda q, k, v, s, i: lightning_attention_reference(q, k, v, s, initial_state=i, cu_seqlens=cu.cpu()),
        *(t.double() for t in cpu),
        go.cpu(),
        gf.cpu(),
    )
    eag = _run_with_grads(
        lambda q, k, v, s, i: lightning_attention_reference(
            q, k, v, s, initial_state=i, cu_seqlens=cu.cpu(), dtype=dtype, state_dtype=torch.float32
        ),
        *cpu,
        go.cpu(),
        gf.cpu(),
    )
    _check_all(kern, ref, eag, dtype, FWD_NAMES + GRAD_NAMES)
    # An empty sequence passes its initial state through, and its gradient straight back.
    torch.testing.assert_close(kern[1][0], init[0])
    torch.testing.assert_close(kern[6][3], gf[3].to(kern[6].dtype))
    # Each sequence alone gives the same output as in the pack.
    for n in (1, 2, 4):
        s, e = int(cu[n]), int(cu[n + 1])
        o_n, f_n = attnkit.lightning_attention(
            q[:, s:e], k[:, s:e], v[:, s:e], slopes, initial_state=init[n : n + 1], output_final_state=True, block_size=32
        )
        torch.testing.assert_close(kern[0][:, s:e], o_n)
        torch.testing.assert_close(kern[1][n : n + 1], f_n)


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_loop_matches_full_sequence(device, dtype):
    B, L, P, H, Dk, Dv = 2, 40, 13, 3, 16, 24
    q, k, v, slopes, init = _inputs(B, L, H, Dk, Dv, dtype, device, seed=7)
    o_full, f_full = attnkit.lightning_attention(q, k, v, slopes, scale=0.5, initial_state=init, output_final_state=True)
    # Prefill P tokens, then one token at a time.
    o_pre, state = attnkit.lightning_attention(
        q[:, :P], k[:, :P], v[:, :P], slopes, scale=0.5, initial_state=init, output_final_state=True
    )
    outs = [o_pre]
    for t in range(P, L):
        o_t, state2 = attnkit.lightning_attention_decode(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], state, slopes, scale=0.5
        )
        assert state2 is state  # updated in place
        outs.append(o_t)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(torch.cat(outs, dim=1), o_full, **tol)
    # (On CUDA the chunked kernel feeds float16 operands to the tensor cores for the state update.)
    state_tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 or device == "cpu" else dict(atol=1e-2, rtol=2e-3)
    torch.testing.assert_close(state, f_full, **state_tol)


def test_decode_step_vs_reference(device):
    B, H, Dk, Dv = 3, 4, 32, 16
    q, k, v, slopes, _ = _inputs(B, 1, H, Dk, Dv, torch.bfloat16, device, seed=8)
    state = torch.randn(B, H, Dk, Dv, device=device)
    ro, rs = lightning_attention_decode_reference(q.cpu(), k.cpu(), v.cpu(), state.cpu(), slopes.cpu(), scale=0.25)
    eo, es = lightning_attention_decode_reference(q.cpu(), k.cpu(), v.cpu(), state.cpu(), slopes.cpu(), scale=0.25, dtype=torch.float32)
    o, s_new = attnkit.lightning_attention_decode(q, k, v, state, slopes, scale=0.25, inplace=False)
    assert_close_fa(o, ro, eo.to(torch.bfloat16), 1e-2 * ro.abs().max().item(), "o")
    assert_close_fa(s_new, rs, es, 1e-5 * rs.abs().max().item(), "state")
    # In place: the same numbers, written into state.
    state_c = state.clone()
    o2, s2 = attnkit.lightning_attention_decode(q, k, v, state_c, slopes, scale=0.25)
    assert s2.data_ptr() == state_c.data_ptr()
    torch.testing.assert_close(o2, o)
    torch.testing.assert_close(state_c, s_new)


def test_decode_gradcheck():
    B, H, Dk, Dv = 2, 2, 3, 4
    g = torch.Generator().manual_seed(9)
    q, k = (torch.randn(B, 1, H, Dk, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(B, 1, H, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    state = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(H, generator=g, dtype=torch.float64).add(0.1).requires_grad_()

    def fn(q, k, v, state, slopes):
        return attnkit.lightning_attention_decode(q, k, v, state, slopes, scale=0.6, inplace=False)

    assert torch.autograd.gradcheck(fn, (q, k, v, state, slopes))


# ------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size,num_splits", [(4, 1), (3, 2), (64, 1)])
def test_gradcheck(block_size, num_splits):
    B, L, H, Dk, Dv = 2, 10, 2, 3, 5
    g = torch.Generator().manual_seed(10)
    q, k = (torch.randn(B, L, H, Dk, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(B, L, H, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(H, generator=g, dtype=torch.float64).add(0.05).requires_grad_()
    init = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, slopes, init):
        return attnkit.lightning_attention(
            q, k, v, slopes, scale=0.8, initial_state=init, output_final_state=True,
            block_size=block_size, num_splits=num_splits,
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, slopes, init))


def test_gradcheck_cu_seqlens():
    lens = [3, 0, 6, 1]
    cu = torch.tensor([0, 3, 3, 9, 10], dtype=torch.int64)
    H, Dk, Dv = 2, 2, 3
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(1, sum(lens), H, Dk, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(1, sum(lens), H, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(H, generator=g, dtype=torch.float64).add(0.05).requires_grad_()
    init = torch.randn(len(lens), H, Dk, Dv, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, slopes, init):
        return attnkit.lightning_attention(
            q, k, v, slopes, initial_state=init, output_final_state=True, cu_seqlens=cu, block_size=2
        )

    assert torch.autograd.gradcheck(fn, (q, k, v, slopes, init))


def _small(device, dtype=torch.float32, L=9, cu=False):
    q, k, v, slopes, init = _inputs(1 if cu else 2, L, 2, 16, 32, dtype, device, seed=12, n_states=3 if cu else None)
    cu_seqlens = torch.tensor([0, 4, 4, L], dtype=torch.int32, device=device) if cu else None
    return q, k, v, slopes, init, cu_seqlens


def test_opcheck(device):
    q, k, v, slopes, init, _ = _small(device)
    bs = 32
    torch.library.opcheck(ops.lightning_fwd.default, (q, k, v, slopes, 0.5, init, None, bs, 0))
    torch.library.opcheck(ops.lightning_fwd.default, (q, k, v, slopes, 1.0, None, None, 0, 2))
    qc, kc, vc, _, initc, cu = _small(device, cu=True)
    torch.library.opcheck(ops.lightning_fwd.default, (qc, kc, vc, slopes, 1.0, initc, cu, bs, 0))
    dout = torch.randn_like(v)
    dfinal = torch.randn_like(init)
    torch.library.opcheck(ops.lightning_bwd.default, (dout, dfinal, q, k, v, slopes, 0.5, init, None, bs, 0, True))
    torch.library.opcheck(ops.lightning_bwd.default, (dout, None, q, k, v, slopes, 0.5, None, None, bs, 0, False))
    # With inputs that require grad (checks the autograd registration through AOT dispatch).
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, slopes, init)]
    torch.library.opcheck(ops.lightning_fwd.default, (*leaves[:4], 0.5, leaves[4], None, bs, 0))
    q1, k1, v1 = q[:, :1].contiguous(), k[:, :1].contiguous(), v[:, :1].contiguous()
    state = torch.randn(2, 2, 16, 32, device=device)
    torch.library.opcheck(ops.lightning_decode.default, (q1, k1, v1, state, slopes, 0.5))
    torch.library.opcheck(
        ops.lightning_decode.default,
        (q1.clone().requires_grad_(), k1, v1, state.clone().requires_grad_(), slopes.clone().requires_grad_(), 0.5),
    )
    torch.library.opcheck(ops.lightning_decode_.default, (q1, k1, v1, state.clone(), slopes, 0.5))


def test_compile_fullgraph(device):
    q, k, v, slopes, init, _ = _small(device, L=20)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, init)]

    def f(q, k, v, init):
        o, final = attnkit.lightning_attention(q, k, v, slopes, scale=0.5, initial_state=init, output_final_state=True)
        return o.sum() + final.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*leaves)
    grads_c = torch.autograd.grad(loss_c, leaves)
    leaves2 = [t.detach().clone().requires_grad_() for t in (q, k, v, init)]
    loss_e = f(*leaves2)
    grads_e = torch.autograd.grad(loss_e, leaves2)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)
    # Packed sequences and a decode step compile too.
    qc, kc, vc, _, initc, cu = _small(device, cu=True)
    g = torch.compile(
        lambda q, k, v, i: attnkit.lightning_attention(q, k, v, slopes, initial_state=i, cu_seqlens=cu, output_final_state=True),
        fullgraph=True, backend="aot_eager",
    )
    torch.testing.assert_close(
        g(qc, kc, vc, initc), attnkit.lightning_attention(qc, kc, vc, slopes, initial_state=initc, cu_seqlens=cu, output_final_state=True)
    )
    q1, k1, v1 = q[:, :1], k[:, :1], v[:, :1]
    d = torch.compile(lambda s: attnkit.lightning_attention_decode(q1, k1, v1, s, slopes, inplace=False), fullgraph=True, backend="aot_eager")
    state = torch.randn(2, 2, 16, 32, device=device)
    torch.testing.assert_close(d(state), attnkit.lightning_attention_decode(q1, k1, v1, state, slopes, inplace=False))


# ------------------------------------------------------------------------------------------------
# Bad inputs: every error names its argument
# ------------------------------------------------------------------------------------------------


def test_bad_inputs(device):
    q, k, v, slopes, init, _ = _small(device)
    la = attnkit.lightning_attention
    cases = [
        (lambda: la(q[0], k, v, slopes), ValueError, "q must have 4 dimensions"),
        (lambda: la(q, k.half(), v, slopes), TypeError, "k must have the dtype of q"),
        (lambda: la(q, k, v[:, :3], slopes), ValueError, "v must be"),
        (lambda: la(q, k[..., :8], v, slopes), ValueError, "k must have the shape of q"),
        (lambda: la(q.int(), k.int(), v.int(), slopes), TypeError, "q must be float16"),
        (lambda: la(q, k, v, slopes[:1]), ValueError, "slopes must have shape"),
        (lambda: la(q, k, v, [0.1, 0.2]), TypeError, "slopes must be a torch.Tensor"),
        (lambda: la(q, k, v, slopes, scale=float("nan")), ValueError, "scale must be finite"),
        (lambda: la(q, k, v, slopes, scale="1"), TypeError, "scale must be a float"),
        (lambda: la(q, k, v, slopes, initial_state=init[:1]), ValueError, "initial_state must have shape"),
        (lambda: la(q, k, v, slopes, output_final_state=1), TypeError, "output_final_state must be a bool"),
        (lambda: la(q, k, v, slopes, block_size=0), ValueError, "block_size must be >= 1"),
        (lambda: la(q, k, v, slopes, num_splits=-1), ValueError, "num_splits must be >= 1"),
        (lambda: la(q, k, v, slopes, cu_seqlens=torch.tensor([0, 9], device=device)), ValueError, "batch size 1"),
        (lambda: la(q[:1], k[:1], v[:1], slopes, cu_seqlens=torch.tensor([0.0, 9.0], device=device)), TypeError, "cu_seqlens must be int32"),
    ]
    if device == "cpu":
        cases += [
            (lambda: la(q[:1], k[:1], v[:1], slopes, cu_seqlens=torch.tensor([0, 5, 3, 9])), ValueError, "cu_seqlens must be non-decreasing"),
            (lambda: la(q[:1], k[:1], v[:1], slopes, cu_seqlens=torch.tensor([0, 5])), ValueError, r"cu_seqlens\[-1\]"),
            (lambda: la(q[:1], k[:1], v[:1], slopes, cu_seqlens=torch.tensor([1, 9])), ValueError, r"cu_seqlens\[0\]"),
        ]
    else:
        cases += [
            (lambda: la(q.double(), k.double(), v.double(), slopes), TypeError, "on CUDA"),
            (lambda: la(q, k, v, slopes, block_size=16), ValueError, "block_size must be one of"),
        ]
    dec = attnkit.lightning_attention_decode
    state = torch.randn(2, 2, 16, 32, device=device)
    q1, k1, v1 = q[:, :1], k[:, :1], v[:, :1]
    cases += [
        (lambda: dec(q, k, v, state, slopes), ValueError, "one step per sequence"),
        (lambda: dec(q1, k1, v1, state[:, :1], slopes), ValueError, "state must have shape"),
        (lambda: dec(q1, k1, v1, state.double(), slopes), TypeError, "state must be torch.float32"),
        (lambda: dec(q1, k1, v1, state.transpose(2, 3).contiguous().transpose(2, 3), slopes), ValueError, "state must be contiguous"),
        (lambda: dec(q1.requires_grad_(), k1, v1, state, slopes), ValueError, "not differentiable"),
    ]
    for fn, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            fn()


def test_op_level_errors_name_arguments():
    q, k, v, slopes, init, _ = _small("cpu")
    with pytest.raises(RuntimeError, match="slopes must be"):
        ops.lightning_fwd(q, k, v, slopes.double(), 1.0, None, None, 0, 0)
    with pytest.raises(RuntimeError, match="initial_state must"):
        ops.lightning_fwd(q, k, v, slopes, 1.0, init.double(), None, 0, 0)
    with pytest.raises(RuntimeError, match="block_size must be >= 0"):
        ops.lightning_fwd(q, k, v, slopes, 1.0, None, None, -1, 0)
    with pytest.raises(RuntimeError, match="cu_seqlens\\[-1\\]"):
        ops.lightning_fwd(q[:1], k[:1], v[:1], slopes, 1.0, None, torch.tensor([0, 3]), 0, 0)
    with pytest.raises(RuntimeError, match="dout must have the shape of v"):
        ops.lightning_bwd(q, None, q, k, v, slopes, 1.0, None, None, 0, 0, False)
    with pytest.raises(RuntimeError, match="dfinal_state must"):
        ops.lightning_bwd(torch.randn_like(v), init[:1], q, k, v, slopes, 1.0, None, None, 0, 0, False)


# ------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------


def test_empty_inputs(device):
    q, k, v, slopes, init = _inputs(2, 0, 2, 16, 32, torch.float32, device)
    o, final = attnkit.lightning_attention(q, k, v, slopes, initial_state=init, output_final_state=True)
    assert o.shape == (2, 0, 2, 32)
    torch.testing.assert_close(final, init)  # nothing to decay: the state passes through
    q, k, v, slopes, _ = _inputs(0, 5, 2, 16, 32, torch.float32, device)
    o, final = attnkit.lightning_attention(q, k, v, slopes, output_final_state=True)
    assert o.shape == (0, 5, 2, 32) and final.shape == (0, 2, 16, 32)


def test_large_slopes_no_nan(device):
    # Huge decays underflow lambda^m to 0; nothing may become inf * 0 = NaN (forward or backward).
    q, k, v, _, init = _inputs(1, 70, 2, 16, 16, torch.float32, device)
    slopes = torch.tensor([200.0, 0.0], device=device, requires_grad=True)
    qq = q.clone().requires_grad_()
    o, final = attnkit.lightning_attention(qq, k, v, slopes, initial_state=init, output_final_state=True)
    (o.sum() + final.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(qq.grad).all() and torch.isfinite(slopes.grad).all()
    # Head 0 has no memory: o_t = q_t . k_t v_t.
    ref = torch.einsum("bthd,bthd->bth", q[:, :, :1], k[:, :, :1])[..., None] * v[:, :, :1]
    torch.testing.assert_close(o[:, :, :1], ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# nn module
# ------------------------------------------------------------------------------------------------


def test_module_incremental_matches_full(device):
    torch.manual_seed(0)
    m = attnkit.nn.LightningAttention(64, 4, layer_idx=1, num_layers=4).to(device)
    x = torch.randn(2, 12, 64, device=device)
    y_full, state_full = m(x, use_cache=True)
    assert state_full.shape == (2, 4, 16, 16) and state_full.dtype == torch.float32
    y_pre, state = m(x[:, :5], use_cache=True)
    ys = [y_pre]
    for t in range(5, 12):
        y_t, state = m(x[:, t : t + 1], past_state=state, use_cache=True)
        ys.append(y_t)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, state_full, atol=1e-4, rtol=1e-4)
    # The slopes are this layer's TransNormerLLM slopes.
    torch.testing.assert_close(m.slopes, attnkit.lightning_slopes(4, 1, 4).to(device))


def test_module_trains_toy_task(device):
    """Predict the previous token: needs the causal memory of the attention (x alone cannot)."""
    torch.manual_seed(0)
    vocab, d, L = 8, 32, 24
    emb = torch.nn.Embedding(vocab, d)
    attn = attnkit.nn.LightningAttention(d, 4, layer_idx=0, num_layers=2)
    head = torch.nn.Linear(d, vocab)
    model = torch.nn.ModuleList([emb, attn, head]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn():
        tok = torch.randint(0, vocab, (16, L), device=device)
        h = emb(tok)
        y, _ = attn(h)
        logits = head(h + y)[:, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), tok[:, :-1].reshape(-1))

    with torch.no_grad():
        first = sum(loss_fn().item() for _ in range(4)) / 4
    for _ in range(200):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = sum(loss_fn().item() for _ in range(4)) / 4
    assert math.log(vocab) - 0.1 < first  # starts at chance
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"
