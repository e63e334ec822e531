"""Sparse Query Attention: the op against reference.py (float64) under FlashAttention's tolerance
rule, autograd, opcheck, torch.compile, gradcheck, input errors, and the nn module."""

from __future__ import annotations

import inspect
import math
import os

import pytest
import torch
from conftest import DEVICES, assert_close_fa, one_thread

import attnkit
from attnkit.nn import SparseQueryAttention
from attnkit.nn.sqa import preset_heads
from attnkit.reference import sqa_head_mapping, sqa_reference

HEADS = [(16, 16), (16, 4), (16, 1), (8, 4), (4, 1), (4, 8)]
LOW = [torch.float16, torch.bfloat16]
# (device, dtype): fp32 on CPU only (the CUDA kernels are fp16 / bf16).
DEV_DTYPES = [("cpu", torch.float32)] + [(d, t) for d in DEVICES for t in LOW]
ATOL_FWD = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
ATOL_BWD = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _ids(val):
    if isinstance(val, torch.dtype):
        return str(val).replace("torch.", "")
    return None


def sqa_eager(q, k, v, causal, scale):
    """The same math in plain PyTorch at the inputs' dtype (the 'eager' term of the FA rule)."""
    Hq, Hkv = q.shape[2], k.shape[2]
    H = max(Hq, Hkv)
    q = q.repeat_interleave(H // Hq, dim=2).transpose(1, 2)  # [B, H, Lq, D]
    k = k.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
    v = v.repeat_interleave(H // Hkv, dim=2).transpose(1, 2)
    s = (q @ k.transpose(-1, -2)) * scale
    Lq, Lk = s.shape[-2], s.shape[-1]
    if causal:
        vis = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
        s = s.masked_fill(~vis, float("-inf"))
    seen = torch.isfinite(s).any(-1, keepdim=True)
    p = torch.softmax(torch.where(seen, s, 0.0), dim=-1)
    p = torch.where(seen, p, 0.0).to(v.dtype)
    return (p @ v).transpose(1, 2)


def _make(B, Lq, Lk, Hq, Hkv, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Lk, Hkv, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Lk, Hkv, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def _leaf(t, dtype=None):
    return t.detach().clone().to(dtype or t.dtype).requires_grad_(True)


def check_against_reference(q, k, v, causal, scale=None, backward=True):
    dtype = q.dtype
    D = q.shape[-1]
    scale_v = D**-0.5 if scale is None else scale
    qa, ka, va = _leaf(q), _leaf(k), _leaf(v)
    out, lse = attnkit.sparse_query_attention(qa, ka, va, causal=causal, scale=scale, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    with one_thread():
        qr, kr, vr = _leaf(q, torch.float64), _leaf(k, torch.float64), _leaf(v, torch.float64)
        ref, ref_lse = sqa_reference(qr, kr, vr, causal=causal, scale=scale, return_lse=True)
        qe, ke, ve = _leaf(q), _leaf(k), _leaf(v)
        eager = sqa_eager(qe, ke, ve, causal, scale_v)
    assert_close_fa(out, ref, eager, ATOL_FWD.get(dtype, 1e-9), "out")
    torch.testing.assert_close(lse.cpu(), ref_lse.float().cpu(), atol=1e-4, rtol=1e-5)
    if not backward or out.numel() == 0:
        return
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(device=out.device, dtype=dtype)
    grads = torch.autograd.grad(out, (qa, ka, va), dout)
    with one_thread():
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.double())
        eager_grads = torch.autograd.grad(eager, (qe, ke, ve), dout)
    for name, a, r, e in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grads):
        assert a.dtype == dtype and a.shape == r.shape
        assert_close_fa(a, r, e, ATOL_BWD.get(dtype, 1e-9), name)


# ---- numerics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=[f"{d}-{_ids(t)}" for d, t in DEV_DTYPES])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hq,hkv", HEADS, ids=[f"{a}q{b}kv" for a, b in HEADS])
def test_heads(device, dtype, causal, hq, hkv):
    q, k, v = _make(2, 24, 40, hq, hkv, 32, dtype, device)
    check_against_reference(q, k, v, causal)


LENGTHS = [1, 17, 128, 1000]
# Every (Lq, Lk) pair in fp32 on CPU; a spread of pairs in bf16 on every device.
LENGTH_CASES = [("cpu", torch.float32, lq, lk) for lq in LENGTHS for lk in LENGTHS] + [
    (d, torch.bfloat16, lq, lk) for d in DEVICES for lq, lk in [(1, 1), (17, 128), (128, 17), (1, 1000), (1000, 1000)]
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "device,dtype,lq,lk", LENGTH_CASES, ids=[f"{d}-{_ids(t)}-{a}x{b}" for d, t, a, b in LENGTH_CASES]
)
def test_lengths(device, dtype, lq, lk, causal):
    # Batch 1 and 2 output heads on the long cases keep them fast; odd total lengths use (2, 4)
    # heads (reverse SQA), even ones (2, 1).
    hq, hkv = (2, 1) if (lq + lk) % 2 == 0 else (2, 4)
    q, k, v = _make(1, lq, lk, hq, hkv, 32, dtype, device, seed=lq * 7 + lk)
    check_against_reference(q, k, v, causal)


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=[f"{d}-{_ids(t)}" for d, t in DEV_DTYPES])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_head_dims(device, dtype, D):
    q, k, v = _make(1, 65, 65, 4, 2, D, dtype, device)
    check_against_reference(q, k, v, causal=True)


def test_float64_cpu_tight():
    q, k, v = _make(2, 33, 50, 4, 2, 24, torch.float64, "cpu")
    out, lse = attnkit.sparse_query_attention(q, k, v, causal=True, return_lse=True)
    ref, ref_lse = sqa_reference(q, k, v, causal=True, return_lse=True)
    # fp64 is exact up to the fp32 scale and lse of the shared params (~1e-7 relative).
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse.float())


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=[f"{d}-{_ids(t)}" for d, t in DEV_DTYPES])
def test_custom_scale(device, dtype):
    q, k, v = _make(2, 19, 23, 4, 4, 32, dtype, device)
    check_against_reference(q, k, v, causal=False, scale=0.3)


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=[f"{d}-{_ids(t)}" for d, t in DEV_DTYPES])
def test_empty_batch(device, dtype):
    q, k, v = _make(0, 16, 16, 4, 2, 32, dtype, device)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    out, lse = attnkit.sparse_query_attention(q, k, v, causal=True, return_lse=True)
    assert out.shape == (0, 16, 4, 32) and lse.shape == (0, 4, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=[f"{d}-{_ids(t)}" for d, t in DEV_DTYPES])
def test_rows_without_keys(device, dtype):
    # Causal with Lq > Lk: the first Lq - Lk rows see no key -> out 0, lse -inf, no NaN anywhere.
    q, k, v = _make(2, 50, 20, 4, 1, 32, dtype, device)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    out, lse = attnkit.sparse_query_attention(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :30] == 0)
    assert torch.all(lse[:, :, :30] == float("-inf"))
    assert torch.isfinite(lse[:, :, 30:]).all()
    out.float().square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :30] == 0)
    check_against_reference(q.detach(), k.detach(), v.detach(), causal=True)


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=[f"{d}-{_ids(t)}" for d, t in DEV_DTYPES])
def test_strided_inputs(device, dtype):
    # q, k, v as views into one packed qkv tensor: row / head / batch strides are not contiguous.
    B, L, H, D = 2, 37, 4, 32
    qkv = torch.randn(B, L, 3, H, D, dtype=torch.float32).to(device=device, dtype=dtype)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1, :2], qkv[:, :, 2, :2]
    assert not q.is_contiguous()
    check_against_reference(q, k, v, causal=True)
    out_strided = attnkit.sparse_query_attention(q, k, v, causal=True)
    out_contig = attnkit.sparse_query_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out_strided, out_contig)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic(device):
    """Two backward runs are bitwise equal. The CPU core and CUDA's dk / dv are deterministic by
    ownership; CUDA's dq is only when the op is asked for it (deterministic=True: per-key-block fp32
    slices summed in a fixed order). Without that flag, CUDA dq adds with fp32 atomics, whose order
    changes the last bits from run to run: it is then compared with a tolerance."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = _make(2, 130, 150, 8, 2, 64, dtype, device)
    dout = torch.randn(2, 130, 8, 64).to(device=device, dtype=dtype)
    has_flag = "deterministic" in inspect.signature(attnkit.sparse_query_attention).parameters
    runs = []
    for _ in range(2):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        kw = {"deterministic": True} if has_flag else {}
        out = attnkit.sparse_query_attention(*xs, causal=True, scale=0.125, **kw)
        runs.append(torch.autograd.grad(out, xs, dout))
    for name, a, b in zip(("dq", "dk", "dv"), *runs):
        if name == "dq" and device == "cuda" and not has_flag:
            torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-2)
        else:
            assert torch.equal(a, b), name


def test_head_mapping_definition():
    # The documented mapping: more query heads -> KV head h // (Hq / Hkv); more KV heads ->
    # query head j // (Hkv / Hq), KV head j.
    assert sqa_head_mapping(8, 2) == (list(range(8)), [0, 0, 0, 0, 1, 1, 1, 1])
    assert sqa_head_mapping(2, 8) == ([0, 0, 0, 0, 1, 1, 1, 1], list(range(8)))
    assert sqa_head_mapping(4, 4) == (list(range(4)), list(range(4)))
    # Output head 5 of 8 q / 2 kv heads equals single-head attention of q head 5 with kv head 1.
    q, k, v = _make(1, 9, 11, 8, 2, 16, torch.float64, "cpu")
    out = attnkit.sparse_query_attention(q, k, v)
    single = attnkit.sparse_query_attention(q[:, :, 5:6], k[:, :, 1:2], v[:, :, 1:2])
    torch.testing.assert_close(out[:, :, 5:6], single)
    # Reverse: output head 5 of 2 q / 8 kv heads reads q head 1 and kv head 5.
    q, k, v = _make(1, 9, 11, 2, 8, 16, torch.float64, "cpu")
    out = attnkit.sparse_query_attention(q, k, v)
    single = attnkit.sparse_query_attention(q[:, :, 1:2], k[:, :, 5:6], v[:, :, 5:6])
    torch.testing.assert_close(out[:, :, 5:6], single)


# ---- torch integration -------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 4)])
def test_opcheck(device, hq, hkv):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, k, v = _make(2, 9, 13, hq, hkv, 32, dtype, device)
    for t in (q, k, v):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.attnkit.sqa_fwd.default, (q, k, v, True, 0.2))
    torch.library.opcheck(torch.ops.attnkit.sqa_fwd.default, (q, k, v, False, 0.2))
    with torch.no_grad():
        out, lse = torch.ops.attnkit.sqa_fwd(q, k, v, True, 0.2)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.attnkit.sqa_bwd.default, (dout, q.detach(), k.detach(), v.detach(), out, lse, True, 0.2)
    )


# aot_eager traces the whole graph (dynamo fullgraph, fake impls, autograd registration) without a
# C++ compile; inductor adds ~20 s of cold codegen on a 2-core CPU, so it runs on GPU machines or
# with ATTNKIT_TEST_INDUCTOR=1.
COMPILE_CASES = [(d, "aot_eager") for d in DEVICES]
if torch.cuda.is_available() or os.environ.get("ATTNKIT_TEST_INDUCTOR") == "1":
    COMPILE_CASES += [(d, "inductor") for d in DEVICES]


@pytest.mark.parametrize("device,backend", COMPILE_CASES)
def test_torch_compile(device, backend):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch._dynamo.reset()

    def f(q, k, v):
        out, lse = attnkit.sparse_query_attention(q, k, v, causal=True, return_lse=True)
        return out.float().square().sum(), lse

    cf = torch.compile(f, fullgraph=True, backend=backend)
    q, k, v = _make(2, 20, 24, 4, 2, 32, dtype, device)
    args = [_leaf(t) for t in (q, k, v)]
    args2 = [_leaf(t) for t in (q, k, v)]
    loss, lse = cf(*args)
    loss.backward()
    loss2, lse2 = f(*args2)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(lse, lse2)
    for a, b in zip(args, args2):
        torch.testing.assert_close(a.grad, b.grad)
    assert torch.count_nonzero(args[0].grad) > 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv,lq,lk", [(2, 1, 5, 7), (1, 2, 6, 4), (2, 2, 3, 3)])
def test_gradcheck(causal, hq, hkv, lq, lk):
    q, k, v = (_leaf(t) for t in _make(1, lq, lk, hq, hkv, 8, torch.float64, "cpu"))
    assert torch.autograd.gradcheck(
        lambda q, k, v: attnkit.sparse_query_attention(q, k, v, causal=causal, scale=0.7), (q, k, v)
    )


def test_lse_is_not_differentiable():
    q, k, v = (_leaf(t) for t in _make(1, 5, 5, 2, 2, 8, torch.float32, "cpu"))
    out, lse = attnkit.sparse_query_attention(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


# ---- input errors ------------------------------------------------------------------------------


def _bad_cases():
    def qkv(**over):
        base = dict(
            q=torch.randn(2, 8, 4, 16),
            k=torch.randn(2, 8, 2, 16),
            v=torch.randn(2, 8, 2, 16),
        )
        base.update(over)
        return base

    return [
        ("q not a tensor", qkv(q=[1.0]), {}, TypeError, "q must be a torch.Tensor"),
        ("q int dtype", qkv(q=torch.ones(2, 8, 4, 16, dtype=torch.int32)), {}, TypeError, "q must be float16"),
        ("k dtype", qkv(k=torch.randn(2, 8, 2, 16, dtype=torch.float64)), {}, TypeError, "k must have the dtype"),
        ("v dtype", qkv(v=torch.randn(2, 8, 2, 16).half()), {}, TypeError, "v must have the dtype"),
        ("q rank", qkv(q=torch.randn(8, 4, 16)), {}, ValueError, "q must have 4 dimensions"),
        ("k rank", qkv(k=torch.randn(1, 2, 8, 2, 16)), {}, ValueError, "k must have 4 dimensions"),
        ("v rank", qkv(v=torch.randn(2, 8, 32)), {}, ValueError, "v must have 4 dimensions"),
        ("k device", qkv(k=torch.randn(2, 8, 2, 16, device="meta")), {}, ValueError, "k must be on the device"),
        ("v device", qkv(v=torch.randn(2, 8, 2, 16, device="meta")), {}, ValueError, "v must be on the device"),
        (
            "heads",
            qkv(k=torch.randn(2, 8, 3, 16), v=torch.randn(2, 8, 3, 16)),
            {},
            ValueError,
            r"head counts of q \(4\) and k \(3\)",
        ),
        ("v shape", qkv(v=torch.randn(2, 9, 2, 16)), {}, ValueError, "v must have the shape of k"),
        (
            "head dim",
            qkv(k=torch.randn(2, 8, 2, 8), v=torch.randn(2, 8, 2, 8)),
            {},
            ValueError,
            "k must have the head dim of q",
        ),
        (
            "batch",
            qkv(k=torch.randn(3, 8, 2, 16), v=torch.randn(3, 8, 2, 16)),
            {},
            ValueError,
            "k must have the batch size",
        ),
        ("q last dim", qkv(q=torch.randn(2, 8, 4, 32)[..., ::2]), {}, ValueError, "q must be contiguous in its last"),
        ("k last dim", qkv(k=torch.randn(2, 8, 2, 32)[..., ::2]), {}, ValueError, "k must be contiguous in its last"),
        ("causal type", qkv(), {"causal": 1}, TypeError, "causal must be a bool"),
        ("scale type", qkv(), {"scale": "0.1"}, TypeError, "scale must be a float"),
        ("scale nan", qkv(), {"scale": math.nan}, ValueError, "scale must be finite"),
        ("return_lse type", qkv(), {"return_lse": None}, TypeError, "return_lse must be a bool"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, tensors, kwargs, exc, match = case
    with pytest.raises(exc, match=match):
        attnkit.sparse_query_attention(tensors["q"], tensors["k"], tensors["v"], **kwargs)


def test_bad_inputs_reach_the_op_checks():
    # The raw op checks too (for callers that skip the Python wrapper); messages name the argument.
    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 3, 16), torch.randn(2, 8, 3, 16)
    with pytest.raises(RuntimeError, match=r"head counts of q \(4\) and k \(3\)"):
        torch.ops.attnkit.sqa_fwd(q, k, v, False, 0.25)
    with pytest.raises(RuntimeError, match="v must have the dtype of q"):
        torch.ops.attnkit.sqa_fwd(q, torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16).double(), False, 0.25)
    with pytest.raises(RuntimeError, match="q must have 4 dimensions"):
        torch.ops.attnkit.sqa_fwd(q[0], k, v, False, 0.25)
    k2, v2 = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    out, lse = torch.ops.attnkit.sqa_fwd(q, k2, v2, False, 0.25)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        torch.ops.attnkit.sqa_bwd(out, q, k2, v2, out, lse[:, :2], False, 0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bad_inputs_cuda():
    q, k, v = _make(1, 8, 8, 2, 2, 48, torch.float16, "cuda")
    with pytest.raises(ValueError, match="head dim 48"):
        attnkit.sparse_query_attention(q, k, v)
    q, k, v = _make(1, 8, 8, 2, 2, 64, torch.float32, "cuda")
    with pytest.raises(TypeError, match="float16 or bfloat16 on CUDA"):
        attnkit.sparse_query_attention(q, k, v)
    qc, kc, vc = _make(1, 8, 8, 2, 2, 64, torch.float16, "cuda")
    with pytest.raises(ValueError, match="k must be on the device"):
        attnkit.sparse_query_attention(qc, kc.cpu(), vc)


# ---- nn module ---------------------------------------------------------------------------------


def test_presets_head_counts():
    expected16 = {
        "mha": (16, 16),
        "gqa": (16, 4),
        "mqa": (16, 1),
        "sqa": (8, 4),
        "ssqa": (8, 8),
        "xsqa": (4, 4),
        "xsmqa": (4, 1),
        "rsqa": (4, 8),
    }
    for name, (hq, hkv) in expected16.items():
        m = SparseQueryAttention.from_preset(name, 256)
        assert (m.num_query_heads, m.num_kv_heads) == (hq, hkv), name
        assert m.head_dim == 16
        assert m.q_proj.weight.shape == (hq * 16, 256)
        assert m.k_proj.weight.shape == (hkv * 16, 256)
        assert m.v_proj.weight.shape == (hkv * 16, 256)
        assert m.o_proj.weight.shape == (256, max(hq, hkv) * 16)
    assert preset_heads("sqa", 8) == (4, 2)
    assert preset_heads("xsqa", 32) == (8, 8)
    assert preset_heads("rsqa", 8) == (2, 4)
    assert preset_heads("mqa", 32) == (32, 1)
    assert preset_heads("xsmqa", 8) == (2, 1)
    with pytest.raises(ValueError, match="name must be one of"):
        SparseQueryAttention.from_preset("nope", 64)
    with pytest.raises(ValueError, match="embed_dim"):
        SparseQueryAttention(100, 16, 8, 4)
    with pytest.raises(ValueError, match="num_query_heads"):
        SparseQueryAttention(64, 16, 6, 4)


def _module_reference(m: SparseQueryAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer computed with reference.py in float64 (projections as in the SQA paper)."""
    B, L, _ = x.shape
    x = x.double()
    hd = m.head_dim

    def lin(layer, t):
        y = t @ layer.weight.double().t()
        return y + layer.bias.double() if layer.bias is not None else y

    q = lin(m.q_proj, x).view(B, L, m.num_query_heads, hd)
    k = lin(m.k_proj, x).view(B, L, m.num_kv_heads, hd)
    v = lin(m.v_proj, x).view(B, L, m.num_kv_heads, hd)
    o = sqa_reference(q, k, v, causal=m.causal)
    return lin(m.o_proj, o.reshape(B, L, -1))


@pytest.mark.parametrize("preset", ["sqa", "rsqa", "xsmqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_module_matches_reference(preset, causal):
    torch.manual_seed(0)
    m = SparseQueryAttention.from_preset(preset, 64, num_heads=8, causal=causal, bias=True)
    x = torch.randn(2, 21, 64)
    torch.testing.assert_close(m(x).double(), _module_reference(m, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_module_key_padding_mask(causal):
    torch.manual_seed(0)
    m = SparseQueryAttention.from_preset("sqa", 64, num_heads=8, causal=causal, bias=True)
    B, L = 3, 12
    x = torch.randn(B, L, 64, requires_grad=True)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 9:] = True  # right padding
    mask[1, :3] = True  # left padding
    mask[1, 6] = True  # a hole
    # batch 2: no padding
    y = m(x, key_padding_mask=mask)
    for b in range(B):
        keep = (~mask[b]).nonzero().squeeze(1)
        alone = m(x[b : b + 1, keep])[0]
        torch.testing.assert_close(y[b, keep], alone, atol=1e-5, rtol=1e-5)
        pad = mask[b].nonzero().squeeze(1)
        if pad.numel():
            torch.testing.assert_close(y[b, pad], m.o_proj.bias.expand(pad.numel(), -1))
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    # Padded tokens influence nothing: their inputs get no gradient from the other tokens' outputs.
    x.grad = None
    keep0 = (~mask[0]).nonzero().squeeze(1)
    m(x, key_padding_mask=mask)[0, keep0].sum().backward()
    assert torch.all(x.grad[0, 9:] == 0)
    # An all-false mask is the unmasked path.
    torch.testing.assert_close(m(x, key_padding_mask=torch.zeros(B, L, dtype=torch.bool)), m(x))


@pytest.mark.parametrize("preset", ["xsqa", "rsqa"])
def test_module_trains(preset):
    # Toy task: regress the output of a fixed random teacher layer of the same shape.
    torch.manual_seed(0)
    teacher = SparseQueryAttention.from_preset(preset, 32, num_heads=4, causal=True)
    student = SparseQueryAttention.from_preset(preset, 32, num_heads=4, causal=True)
    x = torch.randn(8, 16, 32)
    with torch.no_grad():
        target = teacher(x)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(student(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
