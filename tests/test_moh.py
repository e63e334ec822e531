"""Mixture-of-Head attention: the op against the dense float64 reference (every head computed, then
gated) under FlashAttention's tolerance rule, forward and backward with the weights; autograd,
opcheck, torch.compile, gradcheck, hypothesis over shapes, input errors; the nn module."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DEVICES, assert_close_fa, one_thread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit
from attnkit.reference import mixture_of_heads_attention_ref, moh_gate_dense

LOW = [torch.float16, torch.bfloat16]
DEV_DTYPES = [("cpu", torch.float32)] + [(d, t) for d in DEVICES for t in LOW]
ATOL_FWD = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
ATOL_BWD = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _ids(val):
    if isinstance(val, torch.dtype):
        return str(val).replace("torch.", "")
    return None


def moh_eager(q, k, v, head_idx, head_weight, causal, scale):
    """The dense computation at the inputs' dtype (the 'eager' term of the FA rule)."""
    Hq, Hkv = q.shape[2], k.shape[2]
    kx = k.repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)
    vx = v.repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)
    s = (q.transpose(1, 2) @ kx.transpose(-1, -2)) * scale
    if causal:
        L = s.shape[-1]
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    o = (torch.softmax(s.float(), -1).to(q.dtype) @ vx).transpose(1, 2)
    g = moh_gate_dense(head_idx, head_weight, Hq).to(q.dtype)
    return o * g.unsqueeze(-1)


def make_inputs(B, L, Hq, Hkv, D, K, dtype, device, seed=0, empty_frac=0.0, wdtype=torch.float32):
    """Random q, k, v and a random selection of K distinct heads per token (some slots -1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, Hq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, L, Hkv, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, L, Hkv, D, generator=g).to(device=device, dtype=dtype)
    idx = torch.rand(B, L, Hq, generator=g).argsort(-1)[..., :K]
    if empty_frac > 0:
        idx = torch.where(torch.rand(B, L, K, generator=g) < empty_frac, torch.full_like(idx, -1), idx)
    w = torch.rand(B, L, K, generator=g) + 0.25
    return q, k, v, idx.to(device=device, dtype=torch.int32), w.to(device=device, dtype=wdtype)


def _leaf(t, dtype=None):
    return t.detach().clone().to(dtype or t.dtype).requires_grad_(True)


def check_against_reference(q, k, v, idx, w, causal, scale=None, backward=True):
    dtype = q.dtype
    D = q.shape[-1]
    scale_v = D**-0.5 if scale is None else scale
    qa, ka, va, wa = _leaf(q), _leaf(k), _leaf(v), _leaf(w)
    out, lse = attnkit.mixture_of_heads_attention(qa, ka, va, idx, wa, causal=causal, scale=scale, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape
    with one_thread():
        qr, kr, vr, wr = (_leaf(t, torch.float64) for t in (q, k, v, w))
        ref, ref_lse = mixture_of_heads_attention_ref(qr, kr, vr, idx, wr, causal=causal, scale=scale, return_lse=True)
        qe, ke, ve, we = (_leaf(t) for t in (q, k, v, w))
        eager = moh_eager(qe, ke, ve, idx, we, causal, scale_v)
    assert_close_fa(out, ref, eager, ATOL_FWD.get(dtype, 1e-9), "out")
    # rows of unselected heads are exactly zero
    sel = moh_gate_dense(idx.cpu(), torch.ones(idx.shape, dtype=torch.float64), q.shape[2]) > 0
    assert torch.all(out.detach().cpu()[~sel] == 0)
    torch.testing.assert_close(lse.cpu(), ref_lse.float().cpu(), atol=1e-4, rtol=1e-5)
    if not backward or out.numel() == 0:
        return
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=dtype)
    grads = torch.autograd.grad(out, (qa, ka, va, wa), dout)
    with one_thread():
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr, wr), dout.double())
        eager_grads = torch.autograd.grad(eager, (qe, ke, ve, we), dout)
    for name, a, r, e in zip(("dq", "dk", "dv", "dweight"), grads, ref_grads, eager_grads):
        assert a.shape == r.shape
        assert_close_fa(a, r, e, ATOL_BWD.get(dtype, 1e-9) * (4 if name == "dweight" else 1), name)


# ---- numerics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=[f"{d}-{_ids(t)}" for d, t in DEV_DTYPES])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("K", [1, 3, 8])
def test_top_k(device, dtype, causal, K):
    """K = 1 up to Hq (= 8) selected heads per token."""
    check_against_reference(*make_inputs(2, 70, 8, 8, 32, K, dtype, device), causal)


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=[f"{d}-{_ids(t)}" for d, t in DEV_DTYPES])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 1), (4, 4)])
def test_gqa(device, dtype, causal, hq, hkv):
    check_against_reference(*make_inputs(2, 131, hq, hkv, 64, hq // 2, dtype, device, seed=3), causal)


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=[f"{d}-{_ids(t)}" for d, t in DEV_DTYPES])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_empty_slots(device, dtype, causal):
    """Slots of -1, tokens that select no head at all, and heads that no token selects."""
    q, k, v, idx, w = make_inputs(1, 150, 6, 3, 32, 4, dtype, device, seed=5, empty_frac=0.4)
    idx[:, 10:20] = -1  # tokens without heads
    idx[idx == 5] = -1  # head 5 unused
    check_against_reference(q, k, v, idx, w, causal)


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=[f"{d}-{_ids(t)}" for d, t in DEV_DTYPES])
def test_long_sparse(device, dtype):
    """Several query blocks per head with sparse lists (causal tile bounds from gathered positions)."""
    q, k, v, idx, w = make_inputs(1, 600, 8, 2, 64, 2, dtype, device, seed=7)
    check_against_reference(q, k, v, idx, w, True, scale=0.3)


def test_float64_tight():
    q, k, v, idx, w = make_inputs(2, 90, 4, 2, 16, 2, torch.float64, "cpu", seed=2, wdtype=torch.float64)
    for causal in (False, True):
        out = attnkit.mixture_of_heads_attention(q, k, v, idx, w, causal=causal)
        ref = mixture_of_heads_attention_ref(q, k, v, idx, w, causal=causal)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)  # fp32 scale / lse in the core


@pytest.mark.parametrize("device", DEVICES)
def test_index_int64_and_weight_in_q_dtype(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, idx, w = make_inputs(1, 40, 4, 2, 32, 2, dtype, device, seed=4, wdtype=dtype)
    check_against_reference(q, k, v, idx.long(), w, True)


def test_cpu_half_types():
    for dtype in LOW:
        q, k, v, idx, w = make_inputs(1, 50, 4, 2, 32, 2, dtype, "cpu", seed=8)
        check_against_reference(q, k, v, idx, w, True)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    L=st.integers(1, 140),
    hkv=st.sampled_from([1, 2, 4]),
    grp=st.sampled_from([1, 2, 3]),
    D=st.sampled_from([8, 32, 40]),
    kfrac=st.floats(0.0, 1.0),
    empty=st.sampled_from([0.0, 0.3]),
    causal=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_hypothesis_shapes(B, L, hkv, grp, D, kfrac, empty, causal, seed):
    hq = hkv * grp
    K = max(1, round(kfrac * hq))
    q, k, v, idx, w = make_inputs(B, L, hq, hkv, D, K, torch.float64, "cpu", seed=seed, empty_frac=empty,
                                  wdtype=torch.float64)
    qa, ka, va, wa = (_leaf(t) for t in (q, k, v, w))
    out = attnkit.mixture_of_heads_attention(qa, ka, va, idx, wa, causal=causal)
    qr, kr, vr, wr = (_leaf(t) for t in (q, k, v, w))
    ref = mixture_of_heads_attention_ref(qr, kr, vr, idx, wr, causal=causal)
    # fp64 is exact up to the fp32 softmax scale and lse of the core's params (~1e-7 relative)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    dout = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (qa, ka, va, wa), dout), torch.autograd.grad(ref, (qr, kr, vr, wr), dout)):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-6)


def test_cpu_backward_gradients_outlive_its_scratch():
    # The CPU backward keeps its slot-space scratch between calls: the gradients it returns must be
    # tensors of their own, unchanged by later calls of the same and of another shape.
    def grads(L, dout_seed):
        q, k, v, idx, w = make_inputs(1, L, 4, 2, 16, 2, torch.float32, "cpu", seed=3)
        q, k, v, w = (_leaf(t) for t in (q, k, v, w))
        out = attnkit.mixture_of_heads_attention(q, k, v, idx, w, causal=True)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(dout_seed))
        return torch.autograd.grad(out, (q, k, v, w), dout)

    first = grads(200, 0)
    kept = [g.clone() for g in first]
    second = grads(200, 1)
    grads(90, 2)
    for a, b, c in zip(first, kept, second):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
    for a, b in zip(grads(200, 0), kept):
        assert torch.equal(a, b)


def test_lists_follow_positions():
    """The residual lists: per (b, h) the tokens that selected h, ascending; slot points back."""
    q, k, v, idx, w = make_inputs(2, 300, 6, 2, 16, 3, torch.float32, "cpu", seed=9, empty_frac=0.2)
    _, _, _, _, q_index, q_count, slot = torch.ops.attnkit.moh_fwd(q, k, v, idx, w, True, 0.25)
    for b in range(2):
        for h in range(6):
            toks = (idx[b] == h).any(-1).nonzero().flatten().int()
            n = int(q_count[b, h])
            assert n == toks.numel()
            assert torch.equal(q_index[b, h, :n], toks)
    sel = idx >= 0
    assert torch.all(slot[~sel] == -1)
    bb, tt, kk = sel.nonzero(as_tuple=True)
    assert torch.equal(q_index[bb, idx[bb, tt, kk].long(), slot[bb, tt, kk].long()], tt.int())


# ---- torch integration -------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, k, v, idx, w = make_inputs(2, 21, 4, 2, 32, 2, dtype, device, empty_frac=0.2)
    for t in (q, k, v, w):
        t.requires_grad_(True)
    for causal in (True, False):
        torch.library.opcheck(torch.ops.attnkit.moh_fwd.default, (q, k, v, idx, w, causal, 0.2))
    with torch.no_grad():
        res = torch.ops.attnkit.moh_fwd(q, k, v, idx, w, True, 0.2)
    dout = torch.randn_like(res[0])
    args = (dout, q.detach(), k.detach(), v.detach(), idx, w.detach(), *res[2:], True, 0.2)
    torch.library.opcheck(torch.ops.attnkit.moh_bwd.default, args)


COMPILE_CASES = [(d, "aot_eager") for d in DEVICES]
if torch.cuda.is_available() or os.environ.get("ATTNKIT_TEST_INDUCTOR") == "1":
    COMPILE_CASES += [(d, "inductor") for d in DEVICES]


@pytest.mark.parametrize("device,backend", COMPILE_CASES)
def test_torch_compile(device, backend):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch._dynamo.reset()

    def f(q, k, v, idx, w):
        out, lse = attnkit.mixture_of_heads_attention(q, k, v, idx, w, causal=True, return_lse=True)
        return out.float().square().sum(), lse

    cf = torch.compile(f, fullgraph=True, backend=backend)
    q, k, v, idx, w = make_inputs(2, 30, 4, 2, 32, 2, dtype, device)
    args = [_leaf(t) for t in (q, k, v)] + [idx, _leaf(w)]
    args2 = [_leaf(t) for t in (q, k, v)] + [idx, _leaf(w)]
    loss, lse = cf(*args)
    loss.backward()
    loss2, lse2 = f(*args2)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(lse, lse2)
    for a, b in zip(args, args2):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad)
    assert torch.count_nonzero(args[-1].grad) > 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv,K", [(2, 1, 1), (4, 2, 2), (3, 3, 3)])
def test_gradcheck(causal, hq, hkv, K):
    q, k, v, idx, w = make_inputs(1, 7, hq, hkv, 8, K, torch.float64, "cpu", seed=11, empty_frac=0.2,
                                  wdtype=torch.float64)
    args = tuple(_leaf(t) for t in (q, k, v, w))
    assert torch.autograd.gradcheck(
        lambda q, k, v, w: attnkit.mixture_of_heads_attention(q, k, v, idx, w, causal=causal, scale=0.7), args
    )


def test_lse_is_not_differentiable():
    q, k, v, idx, w = make_inputs(1, 5, 2, 2, 8, 1, torch.float32, "cpu")
    out, lse = attnkit.mixture_of_heads_attention(_leaf(q), k, v, idx, w, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


# ---- input errors ------------------------------------------------------------------------------


def _bad(case):
    q, k, v, idx, w = make_inputs(1, 6, 4, 2, 8, 2, torch.float32, "cpu")
    if case == "duplicate":
        idx[0, 3] = torch.tensor([1, 1])
    elif case == "too_large":
        idx[0, 2, 0] = 4
    elif case == "below_minus_one":
        idx[0, 2, 0] = -2
    elif case == "idx_shape":
        idx = idx[:, :5]
    elif case == "weight_shape":
        w = w[..., :1]
    elif case == "idx_dtype":
        idx = idx.float()
    elif case == "weight_dtype":
        w = w.double()
    elif case == "gqa":
        k, v = k[:, :, :1].expand(1, 6, 8, 8), v[:, :, :1].expand(1, 6, 8, 8)  # more KV heads than q heads
    elif case == "length":
        k, v = k[:, :5], v[:, :5]
    return q, k, v, idx, w


BAD = {
    "duplicate": "twice",
    "too_large": r"\[-1, 4\)",
    "below_minus_one": r"\[-1, 4\)",
    "idx_shape": "head_idx",
    "weight_shape": "head_weight",
    "idx_dtype": "head_idx",
    "weight_dtype": "head_weight",
    "gqa": "multiple",
    "length": "sequence length",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=BAD[case]):
        attnkit.mixture_of_heads_attention(*_bad(case))


@pytest.mark.parametrize("case", ["duplicate", "too_large", "below_minus_one", "length"])
def test_bad_inputs_reach_the_op_checks(case):
    """The op itself rejects bad selections (what the Python wrapper leaves to it)."""
    q, k, v, idx, w = _bad(case)
    with pytest.raises(RuntimeError, match=BAD[case]):
        torch.ops.attnkit.moh_fwd(q, k, v, idx, w, True, 0.3)


# ---- nn.MoHAttention -----------------------------------------------------------------------------


def test_presets_head_counts():
    from attnkit.nn.moh import preset_heads

    assert preset_heads("moh-llama3", 32) == (16, 8)  # 50% shared, 75% active
    assert preset_heads("moh-vit", 12) == (6, 3)  # 75% active
    assert preset_heads("moh-dit", 16) == (8, 6)  # 14 of 16 heads ~ 90% active (rounded)
    m = attnkit.nn.MoHAttention.from_preset("moh-llama3", 64, 8, num_kv_heads=2)
    assert (m.num_shared_heads, m.top_k, m.num_kv_heads) == (4, 2, 2)
    with pytest.raises(ValueError, match="name"):
        preset_heads("moh-gpt", 8)


@pytest.mark.parametrize("shared,hkv", [(2, 3), (0, 2), (3, 1)])
def test_module_matches_reference(shared, hkv):
    torch.manual_seed(0)
    m = attnkit.nn.MoHAttention(48, 6, shared, 2, num_kv_heads=hkv).double()
    x = torch.randn(2, 37, 48, dtype=torch.float64)

    def rotary(q, k):  # any caller-side rotation: here a fixed per-position sign flip
        s = torch.where(torch.arange(q.shape[1]) % 3 == 0, -1.0, 1.0).double().view(1, -1, 1, 1)
        return q * s, k * s

    y, aux = m(x, rotary=rotary)
    idx, w, aux2 = m.route(x)
    # router weights: shared a1 softmax(Ws x), routed a2 * top-k of softmax(Wr x) renormalised
    pr = torch.softmax(x @ m.router_routed.weight.T, -1)
    top_p, top_i = pr.topk(2, -1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    if shared:
        a = torch.softmax(x @ m.router_balance.weight.T, -1)
        ps = torch.softmax(x @ m.router_shared.weight.T, -1)
        w_exp = torch.cat([a[..., :1] * ps, a[..., 1:] * top_p], -1)
        assert torch.equal(idx[..., :shared].long(), torch.arange(shared).expand(2, 37, shared))
    else:
        w_exp = top_p
    torch.testing.assert_close(w.double(), w_exp, atol=1e-6, rtol=1e-5)
    assert torch.equal(idx[..., shared:].long(), top_i + shared)
    B, L, D = 2, 37, 8
    q, k = rotary(m.q_proj(x).view(B, L, 6, D), m.k_proj(x).view(B, L, hkv, D))
    v = m.v_proj(x).view(B, L, hkv, D)
    o = mixture_of_heads_attention_ref(q, k, v, idx, w.double(), causal=True)
    # the core takes the softmax scale (and the kernel the weights) in fp32: ~1e-7 relative in fp64
    torch.testing.assert_close(y, m.out_proj(o.reshape(B, L, 6 * D)), atol=1e-6, rtol=1e-6)
    # load balance: Hr * sum_i f_i P_i
    f = torch.zeros(6 - shared, dtype=torch.float64).scatter_add(0, top_i.flatten(), torch.ones(top_i.numel()).double())
    f = f / top_i.numel()
    torch.testing.assert_close(aux.double(), (6 - shared) * (f * pr.reshape(-1, 6 - shared).mean(0)).sum(),
                               atol=1e-6, rtol=1e-5)
    (y.square().mean() + aux).backward()
    assert m.router_routed.weight.grad.abs().sum() > 0 and m.q_proj.weight.grad.abs().sum() > 0


def test_module_router_learns_useful_heads():
    """A student router learns to pick the routed heads a teacher uses (the others add noise)."""
    torch.manual_seed(0)
    E, H, shared, topk = 32, 8, 2, 2
    useful = [6, 7]  # routed heads of the teacher
    teacher = attnkit.nn.MoHAttention(E, H, shared, topk, num_kv_heads=4)
    with torch.no_grad():
        teacher.router_routed.weight.zero_()
        for h in useful:
            teacher.router_routed.weight[h - shared, 0] = 8.0  # feature 0 is constant: always chosen
    student = attnkit.nn.MoHAttention(E, H, shared, topk, num_kv_heads=4)
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        student.router_routed.weight.normal_(0, 0.3)
    for p in student.parameters():
        p.requires_grad_(p is student.router_routed.weight)
    opt = torch.optim.Adam([student.router_routed.weight], lr=0.05)

    def batch(seed):
        x = torch.randn(4, 24, E, generator=torch.Generator().manual_seed(seed))
        x[..., 0] = 1.0
        return x

    def useful_share(x):
        idx, _, _ = student.route(x)
        routed = idx[..., shared:].long()
        return sum((routed == h).float().mean() for h in useful).item() / 1.0

    x_eval = batch(10_000)
    before = useful_share(x_eval)
    for step in range(150):
        x = batch(step)
        with torch.no_grad():
            target, _ = teacher(x)
        y, _ = student(x)
        loss = (y - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = useful_share(x_eval)
    assert before < 0.6, before
    assert after > 0.95, (before, after)


def test_module_bad_args():
    with pytest.raises(ValueError, match="top_k"):
        attnkit.nn.MoHAttention(32, 4, 2, 3)
    with pytest.raises(ValueError, match="num_shared_heads"):
        attnkit.nn.MoHAttention(32, 4, 4, 1)
    with pytest.raises(ValueError, match="num_kv_heads"):
        attnkit.nn.MoHAttention(32, 4, 1, 1, num_kv_heads=3)


# ---- bench cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_bench_case_gate(mode):
    """The registered bench case runs, and the op and dense MoH pass the gate against the oracle."""
    from attnkit.bench.cases import moh as moh_cases
    from attnkit.bench.runner import Runner
    from attnkit.bench.timing import TimingPolicy

    case = moh_cases.moh_case(0.5, H=4, B=1, L=40, D=16, causal=True, dtype=torch.float32, device="cpu", mode=mode)
    res = Runner("cpu", TimingPolicy(warmup=1, min_reps=2, max_reps=3, target_s=0.005, flush_l2=False)).run_case(case)
    assert res.gate["status"] == "PASS", (res.op_result.status, res.op_result.note, res.op_result.gate_detail)
    dense = res.impl("dense-moh")
    assert dense.status == "ok" and dense.gate == "PASS", (dense.status, dense.note)
