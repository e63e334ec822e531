"""sparse_query_attention_varlen and sparse_query_attention_with_kvcache against the float64
references (FlashAttention's tolerance rule), in-place cache appends, opcheck, torch.compile and
input errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, assert_close_fa, one_thread

import attnkit
from attnkit.reference import sqa_kvcache_reference, sqa_reference, sqa_varlen_reference

LOW = [torch.float16, torch.bfloat16]
DEV_DTYPES = [("cpu", torch.float32)] + [(d, t) for d in DEVICES for t in LOW]
ATOL_FWD = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-6}
ATOL_BWD = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-5}
IDS = [f"{d}-{str(t)[6:]}" for d, t in DEV_DTYPES]


def _rand(shape, dtype, device, g):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _leaf(t, dtype=None):
    return t.detach().clone().to(dtype or t.dtype).requires_grad_(True)


def _cu(lengths, device):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


# ---- varlen ------------------------------------------------------------------------------------

VARLEN = [
    # (q lengths, k lengths, Hq, Hkv, D, causal, window)
    ([5, 0, 70, 1], [9, 3, 64, 0], 4, 2, 32, False, (-1, -1)),
    ([70, 33, 0], [70, 100, 5], 2, 4, 64, True, (-1, -1)),
    ([130, 17], [150, 17], 4, 1, 32, True, (20, 3)),
    ([40, 64, 2], [40, 64, 90], 2, 2, 80, False, (7, 0)),
]


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=IDS)
@pytest.mark.parametrize("case", range(len(VARLEN)))
def test_varlen(device, dtype, case):
    lq, lk, hq, hkv, D, causal, window = VARLEN[case]
    g = torch.Generator().manual_seed(case)
    q = _rand((sum(lq), hq, D), dtype, device, g)
    k = _rand((sum(lk), hkv, D), dtype, device, g)
    v = _rand((sum(lk), hkv, D), dtype, device, g)
    cq, ck = _cu(lq, device), _cu(lk, device)
    qa, ka, va = _leaf(q), _leaf(k), _leaf(v)
    out, lse = attnkit.sparse_query_attention_varlen(
        qa, ka, va, cq, ck, max(lq), max(lk), causal=causal, window_size=window, return_lse=True
    )
    with one_thread():
        qr, kr, vr = _leaf(q, torch.float64), _leaf(k, torch.float64), _leaf(v, torch.float64)
        ref, ref_lse = sqa_varlen_reference(qr, kr, vr, cq, ck, causal=causal, window_size=window, return_lse=True)
        qe, ke, ve = _leaf(q), _leaf(k), _leaf(v)
        # the 'eager' term: the reference's math at the kernel's dtype
        eag = sqa_varlen_reference(qe.float(), ke.float(), ve.float(), cq, ck, causal=causal, window_size=window)
        eag = eag.to(dtype) if dtype != torch.float32 else eag.float()
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    assert_close_fa(out, ref, eag, ATOL_FWD[dtype], "out")
    torch.testing.assert_close(lse.cpu(), ref_lse.float().cpu(), atol=1e-4, rtol=1e-5)
    dout = _rand(out.shape, dtype, device, g)
    grads = torch.autograd.grad(out, (qa, ka, va), dout)
    with one_thread():
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.double())
    for name, a, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        # eager term for grads: the float64 reference rounded to dtype (a floor on representable error)
        assert_close_fa(a, r, r.to(dtype), ATOL_BWD[dtype] * max(1.0, r.abs().max().item()), name)


def test_varlen_matches_padded_batches():
    # Two equal-length sequences packed == the batched op on [2, L, H, D].
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 37, 4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    cu = _cu([37, 37], "cpu")
    packed = attnkit.sparse_query_attention_varlen(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 37, 37, causal=True, window_size=(5, 2)
    )
    batched = attnkit.sparse_query_attention(q, k, v, causal=True, window_size=(5, 2))
    torch.testing.assert_close(packed, batched.flatten(0, 1))


def test_varlen_rows_outside_sequences():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(10, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    cq = torch.tensor([2, 5, 7], dtype=torch.int32)
    ck = torch.tensor([1, 6, 6], dtype=torch.int32)
    qa = _leaf(q)
    out, lse = attnkit.sparse_query_attention_varlen(qa, k, v, cq, ck, 3, 5, return_lse=True)
    ref, ref_lse = sqa_varlen_reference(q, k, v, cq, ck, return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse.double(), ref_lse)
    assert torch.equal(out[:2], torch.zeros_like(out[:2])) and torch.isinf(lse[:, 7:]).all()
    (dq,) = torch.autograd.grad(out.sum(), qa)
    assert torch.equal(dq[:2], torch.zeros_like(dq[:2])) and torch.equal(dq[5:], torch.zeros_like(dq[5:]))


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_deterministic(device):
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(5)
    q = _rand((150, 8, 64), dtype, device, g)
    k = _rand((200, 2, 64), dtype, device, g)
    v = _rand((200, 2, 64), dtype, device, g)
    cq, ck = _cu([100, 50], device), _cu([70, 130], device)
    grads = []
    for _ in range(2):
        qa, ka, va = _leaf(q), _leaf(k), _leaf(v)
        out = attnkit.sparse_query_attention_varlen(qa, ka, va, cq, ck, 100, 130, causal=True, deterministic=True)
        grads.append(torch.autograd.grad(out.float().square().sum(), (qa, ka, va)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_opcheck_and_compile(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    g = torch.Generator().manual_seed(6)
    q = _rand((20, 4, 32), dtype, device, g).requires_grad_(True)
    k = _rand((25, 2, 32), dtype, device, g).requires_grad_(True)
    v = _rand((25, 2, 32), dtype, device, g).requires_grad_(True)
    cq, ck = _cu([12, 0, 8], device), _cu([10, 5, 10], device)
    torch.library.opcheck(torch.ops.attnkit.sqa_varlen_fwd.default, (q, k, v, cq, ck, 12, 10, True, 0.2, 3, -1))
    torch.library.opcheck(torch.ops.attnkit.sqa_varlen_fwd_det.default, (q, k, v, cq, ck, 12, 10, False, 0.2, -1, 1))
    with torch.no_grad():
        out, lse = torch.ops.attnkit.sqa_varlen_fwd(q, k, v, cq, ck, 12, 10, True, 0.2)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.attnkit.sqa_varlen_bwd.default,
        (dout, q.detach(), k.detach(), v.detach(), out, lse, cq, ck, 12, 10, True, 0.2, -1, -1, False),
    )
    torch._dynamo.reset()

    def f(q, k, v):
        return attnkit.sparse_query_attention_varlen(q, k, v, cq, ck, 12, 10, causal=True).float().square().sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = [_leaf(t) for t in (q, k, v)]
    b = [_leaf(t) for t in (q, k, v)]
    la, lb = cf(*a), f(*b)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_varlen_bad_inputs():
    q, k, v = torch.randn(10, 2, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    ok = torch.tensor([0, 4, 10], dtype=torch.int32)
    f = attnkit.sparse_query_attention_varlen
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be non-decreasing"):
        f(q, k, v, torch.tensor([0, 6, 4], dtype=torch.int32), ok, 10, 10)
    with pytest.raises(RuntimeError, match="cu_seqlens_k ends at 13, past the tensor's 12 rows"):
        f(q, k, v, ok, torch.tensor([0, 4, 13], dtype=torch.int32), 10, 10)
    with pytest.raises(RuntimeError, match="max_seqlen_q"):
        f(q, k, v, ok, ok, 5, 10)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        f(q, k, v, ok.long(), ok, 10, 10)
    with pytest.raises(ValueError, match="cu_seqlens_k must have the shape"):
        f(q, k, v, ok, ok[:2], 10, 10)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        f(q[None], k, v, ok, ok, 10, 10)
    with pytest.raises(ValueError, match="window_size left"):
        f(q, k, v, ok, ok, 10, 10, window_size=(-3, 0))
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be non-decreasing"):
        torch.ops.attnkit.sqa_varlen_fwd(q, k, v, torch.tensor([0, 6, 4], dtype=torch.int32), ok, 10, 10, False, 0.3)


# ---- KV cache ----------------------------------------------------------------------------------

KVCACHE = [
    # (B, Lq, Lnew, Lmax, cache_seqlens, Hq, Hkv, D, causal, window)
    (3, 1, 1, 200, [0, 77, 150], 8, 2, 64, True, (-1, -1)),
    (2, 4, 4, 130, [10, 100], 2, 4, 32, True, (16, -1)),
    (2, 3, 0, 90, [50, 3], 4, 4, 192, False, (-1, -1)),
    (2, 5, 2, 80, [64, 0], 4, 1, 32, False, (3, 1)),
]


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=IDS)
@pytest.mark.parametrize("case", range(len(KVCACHE)))
def test_kvcache(device, dtype, case):
    B, Lq, Lnew, Lmax, cs, hq, hkv, D, causal, window = KVCACHE[case]
    g = torch.Generator().manual_seed(10 + case)
    q = _rand((B, Lq, hq, D), dtype, device, g)
    k_cache = _rand((B, Lmax, hkv, D), dtype, device, g)
    v_cache = _rand((B, Lmax, hkv, D), dtype, device, g)
    k = _rand((B, Lnew, hkv, D), dtype, device, g) if Lnew else None
    v = _rand((B, Lnew, hkv, D), dtype, device, g) if Lnew else None
    seqlens = torch.tensor(cs, dtype=torch.int32, device=device)
    ref, kc_ref, vc_ref, ref_lse = sqa_kvcache_reference(
        q.double(), k_cache, v_cache, k, v, seqlens.cpu(), causal=causal, window_size=window, return_lse=True
    )
    eag = sqa_kvcache_reference(q.float(), k_cache.float(), v_cache.float(), None if k is None else k.float(),
                                None if v is None else v.float(), seqlens.cpu(), causal=causal, window_size=window)[0]
    out, lse = attnkit.sparse_query_attention_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=causal, window_size=window, return_lse=True
    )
    assert_close_fa(out, ref, eag.to(dtype), ATOL_FWD[dtype], "out")
    torch.testing.assert_close(lse.cpu(), ref_lse.float().cpu(), atol=1e-4, rtol=1e-5)
    # the append happened in place, rows past it are untouched
    assert torch.equal(k_cache.double().cpu(), kc_ref.cpu()) and torch.equal(v_cache.double().cpu(), vc_ref.cpu())


@pytest.mark.parametrize("device,dtype", DEV_DTYPES, ids=IDS)
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (40, 0))])
def test_kvcache_num_splits(device, dtype, causal, window):
    # num_splits changes only how the keys are split over thread blocks on CUDA (the CPU path ignores
    # it): every value matches the reference, and the results agree with each other up to rounding.
    # Batch rows of 1, 2 and 261 keys; 1000 asks for more splits than there are key blocks.
    B, Lq, Lnew, Lmax, hq, hkv, D = 3, 4, 1, 300, 8, 2, 64
    g = torch.Generator().manual_seed(30)
    q = _rand((B, Lq, hq, D), dtype, device, g)
    k_cache = _rand((B, Lmax, hkv, D), dtype, device, g)
    v_cache = _rand((B, Lmax, hkv, D), dtype, device, g)
    k, v = _rand((B, Lnew, hkv, D), dtype, device, g), _rand((B, Lnew, hkv, D), dtype, device, g)
    seqlens = torch.tensor([0, 1, 260], dtype=torch.int32, device=device)
    ref, _, _, ref_lse = sqa_kvcache_reference(
        q.double(), k_cache, v_cache, k, v, seqlens.cpu(), causal=causal, window_size=window, return_lse=True
    )
    eag = sqa_kvcache_reference(q.float(), k_cache.float(), v_cache.float(), k.float(), v.float(), seqlens.cpu(),
                                causal=causal, window_size=window)[0]
    assert torch.isinf(ref_lse).any(), "the case must hold rows without keys"
    results = {}
    for num_splits in (0, 1, 3, 1000):
        kc, vc = k_cache.clone(), v_cache.clone()
        out, lse = attnkit.sparse_query_attention_with_kvcache(
            q, kc, vc, k, v, cache_seqlens=seqlens, causal=causal, window_size=window, num_splits=num_splits,
            return_lse=True,
        )
        assert_close_fa(out, ref, eag.to(dtype), ATOL_FWD[dtype], f"out num_splits={num_splits}")
        torch.testing.assert_close(lse.cpu(), ref_lse.float().cpu(), atol=1e-4, rtol=1e-5)
        assert not out.isnan().any() and (out[lse.isinf().transpose(1, 2)] == 0).all()  # rows without keys
        results[num_splits] = out.float()
    for num_splits, out in results.items():  # the same sums in another order: rounding apart
        torch.testing.assert_close(out, results[1], atol=2 * ATOL_FWD[dtype], rtol=0, msg=f"num_splits={num_splits}")


@pytest.mark.skipif(not hasattr(torch.ops.attnkit, "_flash_num_splits_heuristic"),
                    reason="test-only op _flash_num_splits_heuristic not built (ATTNKIT_TEST_OPS=1)")
def test_num_splits_heuristic():
    # flash/flash_splits.h: (unsplit grid blocks, key blocks, SMs) -> split count
    h = torch.ops.attnkit._flash_num_splits_heuristic
    # decoding B=1, Lq=1, 8 heads over 32k keys (512 key blocks) on 132 SMs: 8 blocks leave 124 SMs
    # idle; 14 splits run 112 blocks (85% of one wave), the fewest within 85% of the best wave fill
    # (16 splits: 128 blocks, 97%)
    assert h(1 * 8 * 1, 32768 // 64, 132) == 14
    # one block over 3 key blocks: every key block its own split
    assert h(1, 3, 132) == 3
    # a big batch already fills the SMs: no split (32 * 8 blocks; 106 >= 80% of 132)
    assert h(32 * 8, 512, 132) == 1
    assert h(106, 512, 132) == 1
    assert h(105, 512, 132) > 1
    # nothing to split
    assert h(8, 0, 132) == 1 and h(8, 1, 132) == 1 and h(0, 100, 132) == 1
    for blocks in (1, 2, 3, 8, 30, 64, 100):
        for tiles in (2, 3, 5, 7, 16, 50, 100, 1000, 100000):
            s = h(blocks, tiles, 132)
            assert 1 <= s <= min(tiles, 128), (blocks, tiles, s)
            if s > 1:  # a split count is taken only when it shortens the longest split
                assert -(-tiles // s) < -(-tiles // (s - 1)), (blocks, tiles, s)


def test_kvcache_int_seqlens_and_generation_loop():
    # Decoding token by token with the cache == full causal attention over the whole sequence.
    g = torch.Generator().manual_seed(20)
    B, L, H, D = 2, 9, 2, 16
    q, k, v = (torch.randn(B, L, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    full = sqa_reference(q, k, v, causal=True)
    k_cache, v_cache = torch.zeros(B, 12, H, D, dtype=torch.float64), torch.zeros(B, 12, H, D, dtype=torch.float64)
    for t in range(L):
        out = attnkit.sparse_query_attention_with_kvcache(
            q[:, t:t + 1], k_cache, v_cache, k[:, t:t + 1], v[:, t:t + 1], cache_seqlens=t, causal=True
        )
        torch.testing.assert_close(out, full[:, t:t + 1])


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_opcheck_and_compile(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    g = torch.Generator().manual_seed(21)
    q = _rand((2, 1, 4, 32), dtype, device, g)
    kc, vc = _rand((2, 40, 2, 32), dtype, device, g), _rand((2, 40, 2, 32), dtype, device, g)
    k, v = _rand((2, 1, 2, 32), dtype, device, g), _rand((2, 1, 2, 32), dtype, device, g)
    cs = torch.tensor([5, 30], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.attnkit.sqa_kvcache_fwd.default, (q, kc, vc, k, v, cs, True, 0.2, -1, -1, 0))
    torch.library.opcheck(torch.ops.attnkit.sqa_kvcache_fwd.default, (q, kc, vc, None, None, cs, False, 0.2, 4, 0, 0))
    torch._dynamo.reset()

    def f(q, kc, vc, k, v):
        return attnkit.sparse_query_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=cs, causal=True)

    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    out1 = torch.compile(f, fullgraph=True, backend="aot_eager")(q, kc1, vc1, k, v)
    out2 = f(q, kc2, vc2, k, v)
    torch.testing.assert_close(out1, out2)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    assert torch.equal(kc1[0, 5], k[0, 0]) and torch.equal(vc1[1, 30], v[1, 0])


def test_kvcache_bad_inputs():
    q = torch.randn(2, 1, 2, 8)
    kc, vc = torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    k, v = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    kc0, vc0 = kc.clone(), vc.clone()
    f = attnkit.sparse_query_attention_with_kvcache
    with pytest.raises(RuntimeError, match="the cache is too short"):
        f(q, kc, vc, k, v, cache_seqlens=torch.tensor([2, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="the cache is too short"):
        f(q, kc, vc, k, v, cache_seqlens=8)
    with pytest.raises(ValueError, match="k and v must be given together"):
        f(q, kc, vc, k, None, cache_seqlens=1)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        f(q, kc, vc, k, v, cache_seqlens=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        f(q, kc, vc, k, v, cache_seqlens=torch.tensor([1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="cache_seqlens\\[1\\] must be >= 0"):
        f(q, kc, vc, k, v, cache_seqlens=torch.tensor([1, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match="window_size right"):
        f(q, kc, vc, cache_seqlens=1, window_size=(0, -4))
    with pytest.raises(ValueError, match="num_splits must be >= 0"):
        f(q, kc, vc, cache_seqlens=1, num_splits=-1)
    with pytest.raises(ValueError, match="k must be"):
        f(q, kc, vc, k[:, :, :1], v[:, :, :1], cache_seqlens=1)
    # nothing was written by the failed calls
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)
