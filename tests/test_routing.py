"""Routing attention: routing_assign, routing_attention, the k-means state and the nn module, against
the float64 dense-mask reference (attnkit.reference) with FlashAttention's tolerance rule; opcheck,
torch.compile, gradcheck, input errors, and the module training a toy task."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit import reference as R
from conftest import DEVICES, assert_close_fa

# float64: the core keeps the scale and the lse in fp32, so ~1e-7 is its floor
ATOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _qkv(B, L, H, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H, D, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
            for _ in range(3)]


def _centroids(H, C, D, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(H, C, D, generator=g), dim=-1).to(device)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _topk_oracle(x, mu, w):
    """torch.topk + sort on float64 scores (valid when the scores have no ties)."""
    s = R.routing_scores_ref(x, mu)
    return torch.topk(s, w, dim=-1).indices.sort(-1).values


def _check_topw(idx, x, mu, w):
    """Exact against topk + sort for float64 inputs (scored in float64 by the CPU kernel); for inputs
    scored in fp32 (CUDA, or fp32 / fp16 / bf16 on CPU) the defining property instead, since an fp64
    oracle may order near-ties differently: every selected score >= every unselected one."""
    idx, x, mu = idx.cpu(), x.cpu(), mu.cpu()
    B, H, C, _ = idx.shape
    assert (idx[..., 1:] > idx[..., :-1]).all(), "lists must be sorted by position"
    if x.dtype == torch.float64:
        torch.testing.assert_close(idx.long(), _topk_oracle(x, mu, w), rtol=0, atol=0)
        return
    s = R.routing_scores_ref(x, mu)
    member = R.routing_membership_ref(idx, x.shape[1])
    assert torch.equal(member.sum(-1), torch.full((B, H, C), w))
    sel_min = s.masked_fill(~member, math.inf).amin(-1)
    rest_max = s.masked_fill(member, -math.inf).amax(-1)
    assert (sel_min >= rest_max - 1e-5).all()


# ---- routing_assign ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("L,C,w", [(1, 3, 1), (17, 3, 1), (17, 4, 16), (17, 2, 17), (256, 8, 16), (256, 1, 256),
                                   (1000, 7, 16), (1000, 32, 31)])
def test_assign_matches_topk(device, shared_qk, L, C, w):
    dtype = torch.float64 if device == "cpu" else torch.float32
    q, k, _ = _qkv(2, L, 3, 16, dtype, device)
    mu = _centroids(3, C, 16, device)
    q_idx, k_idx = attnkit.routing_assign(q, None if shared_qk else k, mu, cluster_size=w, shared_qk=shared_qk)
    assert q_idx.dtype == torch.int32 and q_idx.shape == (2, 3, C, w) and k_idx.shape == (2, 3, C, w)
    _check_topw(q_idx, q, mu, w)
    if shared_qk:
        assert torch.equal(k_idx, q_idx)
    else:
        _check_topw(k_idx, k, mu, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_assign_low_precision_selects_top_scores(device, dtype):
    q, k, _ = _qkv(2, 300, 2, 32, dtype, device, seed=3)
    mu = _centroids(2, 5, 32, device)
    q_idx, k_idx = attnkit.routing_assign(q, k, mu, cluster_size=40, shared_qk=False)
    _check_topw(q_idx, q, mu, 40)
    _check_topw(k_idx, k, mu, 40)


@pytest.mark.parametrize("device", DEVICES)
def test_assign_ties_go_to_lower_position(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 1, 8, generator=g, dtype=torch.float64)
    # 12 tokens that are 3 copies of 4 distinct vectors, scaled by powers of two (exact, so the
    # normalised copies, and their scores, are bit-identical)
    rows = [0, 1, 2, 3, 2, 0, 1, 3, 3, 2, 1, 0]
    q = torch.stack([base[r] * 2.0 ** (i % 3) for i, r in enumerate(rows)], 0)[None].to(device=device, dtype=dtype)
    mu = _centroids(1, 4, 8, device)
    for w in (1, 2, 4, 5, 12):
        q_idx, _ = attnkit.routing_assign(q, None, mu, cluster_size=w)
        ref, _ = R.routing_assign_ref(q.cpu(), None, mu.cpu(), w)
        assert torch.equal(q_idx.long().cpu(), ref), f"w={w}"
    # all tokens equal: every cluster takes the first w positions
    q_same = base[0].expand(12, 1, 8)[None].contiguous().to(device=device, dtype=dtype)
    q_idx, _ = attnkit.routing_assign(q_same, None, mu, cluster_size=5)
    assert torch.equal(q_idx.cpu(), torch.arange(5, dtype=torch.int32).expand(1, 1, 4, 5))


def test_assign_empty_batch():
    q = torch.randn(0, 5, 2, 8)
    q_idx, k_idx = attnkit.routing_assign(q, torch.randn(0, 5, 2, 8), _centroids(2, 3, 8, "cpu"), cluster_size=2,
                                          shared_qk=False)
    assert q_idx.shape == (0, 2, 3, 2) and k_idx.shape == (0, 2, 3, 2)


# ---- routing_attention vs the dense reference ----------------------------------------------------


def _check_attention(q, k, v, q_idx, k_idx, causal, shared_qk, key_padding_mask=None, scale=None):
    """Forward and backward of routing_attention vs the float64 reference, FlashAttention's rule."""
    dtype = q.dtype
    qa, va = _leaf(q), _leaf(v)
    ka = None if k is None else _leaf(k)
    out = attnkit.routing_attention(qa, ka, va, q_idx, k_idx, causal=causal, shared_qk=shared_qk, scale=scale)
    assert out.dtype == dtype and out.shape == q.shape
    kw = dict(causal=causal, shared_qk=shared_qk, scale=scale, key_padding_mask=key_padding_mask)
    cpu = [None if t is None else t.detach().cpu() for t in (q, k, v)]
    qr, vr = _leaf(cpu[0].double()), _leaf(cpu[2].double())
    kr = None if k is None else _leaf(cpu[1].double())
    qi, ki = q_idx.cpu(), k_idx.cpu()
    pad = None if key_padding_mask is None else key_padding_mask.cpu()
    ref = R.routing_attention_ref(qr, kr, vr, qi, ki, **{**kw, "key_padding_mask": pad})
    qe, ve = _leaf(cpu[0]), _leaf(cpu[2])
    ke = None if k is None else _leaf(cpu[1])
    eager = R.routing_attention_ref(qe, ke, ve, qi, ki, dtype=dtype, **{**kw, "key_padding_mask": pad})
    atol = ATOL[dtype]
    valid = torch.ones(q.shape[:2], dtype=torch.bool) if pad is None else ~pad
    assert_close_fa(out.cpu()[valid], ref[valid], eager[valid], atol, "out")

    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    g[~valid] = 0  # outputs of padded tokens are unspecified
    out.backward(g.to(q.device))
    ref.backward(g.double())
    eager.backward(g)
    names = ["dq", "dk", "dv"]
    for name, a, r, e in zip(names, (qa, ka, va), (qr, kr, vr), (qe, ke, ve)):
        if a is None:
            continue
        # gradient atol scales with the upstream gradient and the sum over clusters / keys
        assert_close_fa(a.grad.cpu(), r.grad, e.grad, atol * 4, name)
    return out


def _cases():
    """(L, C, w, shared_qk, causal). Tokens in 0 clusters (C * w < L), in exactly 1 (C = 1) and in
    many (w = L). Short lengths run every (shared_qk, causal) pair; long ones alternate the pairs to
    stay within the CPU time budget (the dense reference is O(C L^2))."""
    pairs = [(True, True), (False, False), (True, False), (False, True)]
    out = []
    for L, C, w in [(1, 1, 1), (1, 4, 1), (17, 4, 1), (17, 3, 16), (17, 2, 17), (17, 1, 16)]:
        out += [(L, C, w, s, c) for s, c in pairs]
    for i, (L, C, w) in enumerate([(256, 16, 16), (256, 3, 16), (256, 2, 256), (256, 1, 256)]):
        out += [(L, C, w, *pairs[(2 * i) % 4]), (L, C, w, *pairs[(2 * i + 1) % 4])]
    out += [(1000, 4, 16, True, True), (1000, 2, 1000, False, False), (1000, 7, 300, False, True)]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L,C,w,shared_qk,causal", _cases())
def test_attention_vs_reference(device, L, C, w, shared_qk, causal):
    dtype = torch.float32 if device == "cpu" else torch.float16
    B, H, D = (1, 1, 32) if L >= 1000 else (1, 2, 32) if L >= 256 else (2, 2, 32)
    q, k, v = _qkv(B, L, H, D, dtype, device, seed=L + C)
    mu = _centroids(H, C, D, device)
    q_idx, k_idx = attnkit.routing_assign(q, None if shared_qk else k, mu, cluster_size=w, shared_qk=shared_qk)
    _check_attention(q, None if shared_qk else k, v, q_idx, k_idx, causal, shared_qk)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shared_qk", [True, False])
def test_attention_dtypes(device, dtype, shared_qk):
    if device == "cuda" and dtype in (torch.float32, torch.float64):
        pytest.skip("the CUDA core runs fp16 / bf16")
    q, k, v = _qkv(2, 64, 2, 32, dtype, device, seed=11)
    mu = _centroids(2, 4, 32, device)
    q_idx, k_idx = attnkit.routing_assign(q, k, mu, cluster_size=24, shared_qk=shared_qk)
    _check_attention(q, None if shared_qk else k, v, q_idx, k_idx, True, shared_qk)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_membership_zero_one_many(device, causal):
    # hand-made lists (not sorted, k lists differ from q lists) with tokens in 0, 1 and 3 clusters
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    L = 12
    q, k, v = _qkv(1, L, 1, 32, dtype, device, seed=2)
    q_idx = torch.tensor([[[[5, 0, 7, 3], [5, 1, 9, 8], [11, 5, 2, 8]]]], dtype=torch.int32, device=device)
    k_idx = torch.tensor([[[[2, 3, 0, 10], [1, 4, 6, 9], [8, 11, 7, 5]]]], dtype=torch.int32, device=device)
    counts = R.routing_membership_ref(q_idx.cpu(), L).sum(2)[0, 0]
    assert (counts == 0).any() and (counts == 1).any() and (counts == 3).any()
    out = _check_attention(q, k, v, q_idx, k_idx, causal, False)
    assert torch.equal(out[0, counts == 0], torch.zeros_like(out[0, counts == 0])), "unrouted tokens must get 0"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_one_cluster_full_window_is_full_attention(device, causal):
    dtype = torch.float64 if device == "cpu" else torch.float16
    L = 40
    q, k, v = _qkv(2, L, 3, 32, dtype, device, seed=4)
    mu = _centroids(3, 1, 32, device)
    q_idx, k_idx = attnkit.routing_assign(q, k, mu, cluster_size=L, shared_qk=False)
    assert torch.equal(q_idx.cpu(), torch.arange(L, dtype=torch.int32).expand(2, 3, 1, L))
    out = attnkit.routing_attention(q, k, v, q_idx, k_idx, causal=causal, shared_qk=False)
    ref = R.full_attention_ref(q.cpu(), k.cpu(), v.cpu(), causal=causal)
    eager = R.full_attention_ref(q.cpu(), k.cpu(), v.cpu(), causal=causal, dtype=dtype)
    assert_close_fa(out.cpu(), ref, eager, 1e-6 if dtype == torch.float64 else ATOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_shared_qk_self_attends_only_when_alone(device):
    dtype = torch.float64 if device == "cpu" else torch.float16
    q, _, v = _qkv(1, 6, 1, 32, dtype, device, seed=9)
    idx = torch.arange(6, dtype=torch.int32, device=device).view(1, 1, 1, 6)
    out = attnkit.routing_attention(q, None, v, idx, idx, causal=True, shared_qk=True)
    # the first token sees only itself: its output is its own value
    torch.testing.assert_close(out[0, 0], v[0, 0], atol=1e-3 if dtype != torch.float64 else 1e-12, rtol=0)
    # later tokens put (almost) no weight on themselves: -5e4 against O(1) scores
    qv = q[0, :, 0].double().cpu()
    s = qv @ F.normalize(qv, dim=-1).t() / math.sqrt(32)
    s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), -math.inf)
    s.diagonal().fill_(-5e4)
    expect = torch.softmax(s, -1) @ v[0, :, 0].double().cpu()
    torch.testing.assert_close(out[0, :, 0].double().cpu(), expect, atol=2e-3 if dtype != torch.float64 else 1e-6,
                               rtol=0)
    assert (out[0, 1:, 0].double().cpu() - v[0, 1:, 0].double().cpu()).abs().amax() > 0.1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared_qk", [True, False])
def test_key_padding_mask(device, shared_qk):
    # padded tokens rank last in routing_assign: with cluster_size <= the unpadded length no list holds
    # one, so attention inside the clusters equals the reference with the padded keys masked
    dtype = torch.float32 if device == "cpu" else torch.float16
    L = 30
    q, k, v = _qkv(2, L, 2, 32, dtype, device, seed=6)
    mu = _centroids(2, 3, 32, device)
    pad = torch.zeros(2, L, dtype=torch.bool)
    pad[0, 20:] = True
    pad[1, ::4] = True
    w = 12
    q_idx, k_idx = attnkit.routing_assign(q, k, mu, cluster_size=w, shared_qk=shared_qk, key_padding_mask=pad.to(device))
    ref_q, ref_k = R.routing_assign_ref(q.cpu().double(), None if shared_qk else k.cpu().double(), mu.cpu(), w,
                                        shared_qk, key_padding_mask=pad)
    if device == "cpu":
        assert torch.equal(q_idx.long(), ref_q) and torch.equal(k_idx.long(), ref_k)
    for idx in (q_idx, k_idx):
        assert not pad.gather(1, idx.cpu().long().view(2, -1)).any(), "a padded token was routed"
    _check_attention(q, None if shared_qk else k, v, q_idx, k_idx, False, shared_qk, key_padding_mask=pad.to(device))
    # window larger than an unpadded length: padded tokens fill the remaining slots, last
    q_idx, _ = attnkit.routing_assign(q, None, mu, cluster_size=25, key_padding_mask=pad.to(device))
    assert int(pad[0].gather(0, q_idx[0, 0, 0].cpu().long()).sum()) == 5


def test_key_padding_mask_rejected_with_clusters():
    q, k, v = _qkv(1, 10, 2, 32, torch.float32, "cpu")
    idx = torch.zeros(1, 2, 3, 4, dtype=torch.int32)
    pad = torch.zeros(1, 10, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        torch.ops.attnkit.routing_fwd(q, k, v, idx, idx, pad, True, -1, False, 0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_local_window_attention(device, causal):
    dtype = torch.float64 if device == "cpu" else torch.float16
    L, W = 37, 8
    q, k, v = _qkv(2, L, 2, 32, dtype, device, seed=8)
    pad = torch.zeros(2, L, dtype=torch.bool, device=device)
    pad[1, 30:] = True
    qa, ka, va = (_leaf(t) for t in (q, k, v))
    out = attnkit.ops.routing._routing_local_attention(qa, ka, va, window=W, causal=causal, key_padding_mask=pad)
    full = torch.arange(L, dtype=torch.int32).expand(2, 2, 1, L).contiguous()
    qr, kr, vr = (_leaf(t.cpu().double()) for t in (q, k, v))
    ref = R.routing_attention_ref(qr, kr, vr, full, full, causal=causal, shared_qk=False, window_left=W - 1,
                                  key_padding_mask=pad.cpu())
    atol = 1e-6 if dtype == torch.float64 else 5e-3
    torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=0)
    g = torch.randn(out.shape, dtype=torch.float64)
    out.backward(g.to(device=device, dtype=dtype))
    ref.backward(g)
    for a, r in zip((qa, ka, va), (qr, kr, vr)):
        torch.testing.assert_close(a.grad.double().cpu(), r.grad, atol=atol * 4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_flag_and_repeatability(device):
    # deterministic=True: bit-identical gradients run to run; False (fp32 atomics on CUDA, ignored on
    # CPU): the same values up to summation order
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = _qkv(1, 300, 2, 32, dtype, device, seed=12)
    mu = _centroids(2, 4, 32, device)
    q_idx, k_idx = attnkit.routing_assign(q, k, mu, cluster_size=150, shared_qk=False)
    grads = []
    for det in (True, False, True):
        qa, ka, va = (_leaf(t) for t in (q, k, v))
        out = attnkit.routing_attention(qa, ka, va, q_idx, k_idx, shared_qk=False, deterministic=det)
        out.float().square().sum().backward()
        grads.append([t.grad for t in (qa, ka, va)])
    for a, b in zip(grads[0], grads[2]):
        assert torch.equal(a, b)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_cpu_backward_gradients_outlive_its_scratch():
    # The CPU backward keeps its segment-space scratch between calls: the gradients it returns must be
    # tensors of their own, unchanged by later calls of the same and of another shape.
    def grads(L, seed, dout_seed):
        q, k, v = (_leaf(t) for t in _qkv(1, L, 2, 32, torch.float32, "cpu", seed=seed))
        q_idx, k_idx = attnkit.routing_assign(q.detach(), k.detach(), _centroids(2, 4, 32, "cpu"),
                                              cluster_size=L // 2, shared_qk=False)
        out = attnkit.routing_attention(q, k, v, q_idx, k_idx, shared_qk=False)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(dout_seed))
        return torch.autograd.grad(out, (q, k, v), dout)

    first = grads(300, 12, 0)
    kept = [g.clone() for g in first]
    second = grads(300, 12, 1)  # same shape, so the same scratch, other values
    grads(200, 5, 2)  # a smaller shape
    for a, b, c in zip(first, kept, second):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
    for a, b in zip(grads(300, 12, 0), kept):  # and the scratch holds no state: the same call, the same result
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_kmeans_update_is_deterministic(device):
    x = torch.randn(4000, 2, 32, device=device)
    mu = _centroids(2, 8, 32, device)
    a, b = mu.clone(), mu.clone()
    attnkit.kmeans_ema_update_(a, x, decay=0.5)
    attnkit.kmeans_ema_update_(b, x, decay=0.5)
    assert torch.equal(a, b)


def test_empty_batch_attention():
    q, k, v = (torch.randn(0, 7, 2, 32, requires_grad=True) for _ in range(3))
    idx = torch.zeros(0, 2, 3, 4, dtype=torch.int32)
    out = attnkit.routing_attention(q, k, v, idx, idx, shared_qk=False)
    assert out.shape == (0, 7, 2, 32)
    out.sum().backward()
    assert q.grad.shape == q.shape


# ---- k-means state -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,C", [(50, 4), (5, 8), (300, 16)])
def test_kmeans_ema_update_matches_formula(device, dtype, N, C):
    H, D = 3, 16
    x = torch.randn(N, H, D, generator=torch.Generator().manual_seed(N)).to(device=device, dtype=dtype)
    mu = _centroids(H, C, D, device, seed=C)
    before = mu.clone()
    a = attnkit.kmeans_assign(x, mu)
    ref_a = R.kmeans_assign_ref(x.cpu(), before.cpu())
    if device == "cpu":
        torch.testing.assert_close(a.long().cpu(), ref_a, rtol=0, atol=0)
    else:  # fp32 scores: near-ties may go either way
        sim = torch.einsum("nhd,hcd->nhc", F.normalize(x.cpu().double(), dim=-1), before.cpu().double())
        assert (sim.gather(2, a.cpu().long()[..., None]).squeeze(2) >= sim.amax(2) - 1e-5).all()
    decay = 0.9
    expect = R.kmeans_ema_update_ref(before.cpu(), x.cpu(), decay, assign=a.cpu())
    out = attnkit.kmeans_ema_update_(mu, x, decay=decay) if device == "cpu" else \
        attnkit.kmeans_ema_update_(mu, x, decay=decay, assign=a)
    assert out is mu
    torch.testing.assert_close(mu.double().cpu(), expect, atol=1e-6, rtol=0)
    torch.testing.assert_close(mu.norm(dim=-1), torch.ones(H, C, device=device), atol=1e-6, rtol=0)
    counts = torch.zeros(H, C, dtype=torch.long)
    counts.scatter_add_(1, a.long().cpu().t(), torch.ones(H, N, dtype=torch.long))
    empty = counts == 0
    if N < C:
        assert empty.any()
    assert torch.equal(mu.cpu()[empty], before.cpu()[empty]), "clusters that got nothing keep their centroid"
    assert not torch.equal(mu.cpu()[~empty], before.cpu()[~empty])


def test_kmeans_ema_update_given_assign_and_shapes():
    x = torch.randn(2, 10, 2, 8, dtype=torch.float64)  # [..., H, D]
    mu = _centroids(2, 3, 8, "cpu").double()
    assign = torch.randint(0, 3, (2, 10, 2), dtype=torch.int32)
    expect = R.kmeans_ema_update_ref(mu, x, 0.5, assign=assign)
    attnkit.kmeans_ema_update_(mu, x, decay=0.5, assign=assign)
    torch.testing.assert_close(mu, expect, atol=1e-12, rtol=0)
    # decay = 1 keeps every centroid; decay = 0 moves assigned clusters to their mean direction
    mu2 = mu.clone()
    attnkit.kmeans_ema_update_(mu2, x, decay=1.0)
    torch.testing.assert_close(mu2, mu, atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_commitment_loss(device):
    x = torch.randn(4, 20, 2, 16, device=device, requires_grad=True)
    mu = _centroids(2, 5, 16, device)
    loss = attnkit.routing_commitment_loss(x, mu)
    ref = R.routing_commitment_loss_ref(x.detach().cpu(), mu.cpu())
    torch.testing.assert_close(loss.double().cpu(), ref, atol=1e-6, rtol=0)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # equals 2 - 2 * (max cosine) averaged
    cos = torch.einsum("nhd,hcd->nhc", F.normalize(x.detach().double().cpu(), dim=-1).reshape(-1, 2, 16),
                       mu.double().cpu()).amax(-1)
    torch.testing.assert_close(loss.double().cpu(), (2 - 2 * cos).mean(), atol=1e-6, rtol=0)


def test_kmeans_init_clusters_well_separated_data():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(1, 4, 16, generator=g), dim=-1)  # [H, C, D]
    lab = torch.arange(400) % 4
    x = (centers[0, lab] * 5 + 0.3 * torch.randn(400, 16, generator=g))[:, None, :]  # [N, 1, D]
    mu = attnkit.kmeans_init(x, 4, iters=10, generator=torch.Generator().manual_seed(1))
    assert mu.shape == (1, 4, 16) and mu.dtype == torch.float32
    torch.testing.assert_close(mu.norm(dim=-1), torch.ones(1, 4), atol=1e-6, rtol=0)
    # every true center is matched by a learned centroid
    cos = torch.einsum("cd,kd->ck", centers[0], mu[0])
    assert (cos.amax(1) > 0.98).all()


# ---- torch integration ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, k, v = _qkv(2, 19, 2, 32, dtype, device, seed=13)
    mu = _centroids(2, 3, 32, device)
    ops = torch.ops.attnkit
    torch.library.opcheck(ops.routing_assign.default, (q, k, mu, 7, False, True))
    torch.library.opcheck(ops.routing_assign.default, (q, None, mu, 7, True, False))
    torch.library.opcheck(ops.routing_assign.default, (q, k, mu, 7, False, True, torch.rand(2, 19, device=device) < 0.3))
    q_idx, k_idx, _ = ops.routing_assign(q, k, mu, 7, False)
    pad = torch.zeros(2, 19, dtype=torch.bool, device=device)
    pad[:, -3:] = True
    qa, ka, va = (_leaf(t) for t in (q, k, v))
    torch.library.opcheck(ops.routing_fwd.default, (qa, ka, va, q_idx, k_idx, None, True, -1, False, 0.3, True))
    torch.library.opcheck(ops.routing_fwd.default, (qa, ka, va, q_idx, k_idx, None, False, -1, True, 0.3, False))
    torch.library.opcheck(ops.routing_fwd.default, (qa, ka, va, None, None, pad, True, 4, True, 0.3, True))
    with torch.no_grad():
        out, out_seg, lse = ops.routing_fwd(q, k, v, q_idx, k_idx, None, True, -1, False, 0.3)
    dout = torch.randn_like(out)
    torch.library.opcheck(ops.routing_bwd.default,
                          (dout, q, k, v, q_idx, k_idx, None, out_seg, lse, True, -1, False, 0.3, True))
    x = torch.randn(30, 2, 32, device=device, dtype=dtype)
    torch.library.opcheck(ops.kmeans_assign.default, (x, mu))
    torch.library.opcheck(ops.kmeans_ema_update_.default, (mu.clone(), x, None, 0.9))


COMPILE_CASES = [(d, "aot_eager") for d in DEVICES]
if torch.cuda.is_available() or os.environ.get("ATTNKIT_TEST_INDUCTOR") == "1":
    COMPILE_CASES += [(d, "inductor") for d in DEVICES]


@pytest.mark.parametrize("device,backend", COMPILE_CASES)
def test_torch_compile(device, backend):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch._dynamo.reset()
    mu = _centroids(2, 4, 32, device)

    def f(q, k, v):
        q_idx, k_idx = attnkit.routing_assign(q, k, mu, cluster_size=9, shared_qk=False)
        out = attnkit.routing_attention(q, k, v, q_idx, k_idx, causal=True, shared_qk=False)
        return out.float().square().sum()

    cf = torch.compile(f, fullgraph=True, backend=backend)
    q, k, v = _qkv(2, 30, 2, 32, dtype, device, seed=14)
    args, args2 = [_leaf(t) for t in (q, k, v)], [_leaf(t) for t in (q, k, v)]
    loss = cf(*args)
    loss.backward()
    loss2 = f(*args2)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    for a, b in zip(args, args2):
        torch.testing.assert_close(a.grad, b.grad)
    assert torch.count_nonzero(args[0].grad) > 0


@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck(shared_qk, causal):
    q, k, v = (_leaf(t) for t in _qkv(1, 11, 2, 8, torch.float64, "cpu", seed=15))
    mu = _centroids(2, 3, 8, "cpu").double()
    q_idx, k_idx = attnkit.routing_assign(q, k, mu, cluster_size=5, shared_qk=shared_qk)
    # scale 0.5 and fp32 lse inside the core limit float64 precision to ~1e-7: gradcheck's default
    # eps / atol need that much slack.
    kk = None if shared_qk else k
    assert torch.autograd.gradcheck(
        lambda q, k, v: attnkit.routing_attention(q, None if shared_qk else k, v, q_idx, k_idx, causal=causal,
                                                  shared_qk=shared_qk, scale=0.5),
        (q, k if kk is not None else k.detach(), v), atol=1e-5)


# ---- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs():
    q, k, v = _qkv(1, 10, 2, 8, torch.float32, "cpu")
    mu = _centroids(2, 3, 8, "cpu")
    idx = torch.zeros(1, 2, 3, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="cluster_size"):
        attnkit.routing_assign(q, k, mu, cluster_size=11)
    with pytest.raises(ValueError, match="cluster_size"):
        attnkit.routing_assign(q, k, mu, cluster_size=0)
    with pytest.raises(TypeError, match="cluster_size"):
        attnkit.routing_assign(q, k, mu, cluster_size=2.0)
    with pytest.raises(ValueError, match="centroids"):
        attnkit.routing_assign(q, k, mu[:1], cluster_size=2)
    with pytest.raises(ValueError, match="k must be given"):
        attnkit.routing_assign(q, None, mu, cluster_size=2, shared_qk=False)
    with pytest.raises(ValueError, match="^q"):
        attnkit.routing_assign(q[0], k, mu, cluster_size=2)
    with pytest.raises(TypeError, match="q_idx"):
        attnkit.routing_attention(q, k, v, idx.long(), idx)
    with pytest.raises(ValueError, match="k_idx"):
        attnkit.routing_attention(q, k, v, idx, idx[:, :1])
    with pytest.raises(ValueError, match="k_idx"):
        attnkit.routing_attention(q, k, v, idx, idx[:, :, :2])
    with pytest.raises(TypeError, match="^v"):
        attnkit.routing_attention(q, k, v.double(), idx, idx)
    with pytest.raises(ValueError, match="^k"):
        attnkit.routing_attention(q, k[:, :5], v, idx, idx)
    with pytest.raises(TypeError, match="^q"):
        attnkit.routing_attention(q.int(), k, v, idx, idx)
    with pytest.raises(TypeError, match="causal"):
        attnkit.routing_attention(q, k, v, idx, idx, causal=1)
    with pytest.raises(TypeError, match="scale"):
        attnkit.routing_attention(q, k, v, idx, idx, scale="x")
    with pytest.raises(ValueError, match="key_padding_mask"):
        attnkit.routing_assign(q, k, mu, cluster_size=2, key_padding_mask=torch.zeros(1, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        attnkit.routing_assign(q, k, mu, cluster_size=2, key_padding_mask=torch.zeros(1, 10))
    with pytest.raises(RuntimeError, match="q_idx values"):
        attnkit.routing_attention(q, k, v, idx + 10, idx)
    with pytest.raises(RuntimeError, match="k_idx values"):
        attnkit.routing_attention(q, k, v, idx, idx - 1)
    with pytest.raises(ValueError, match="decay"):
        attnkit.kmeans_ema_update_(mu.clone(), torch.randn(5, 2, 8), decay=1.5)
    with pytest.raises(ValueError, match="centroids"):
        attnkit.kmeans_ema_update_(mu.clone(), torch.randn(5, 3, 8), decay=0.9)
    with pytest.raises(TypeError, match="assign"):
        attnkit.kmeans_ema_update_(mu.clone(), torch.randn(5, 2, 8), decay=0.9, assign=torch.zeros(5, 2))
    with pytest.raises(RuntimeError, match="assign values"):
        attnkit.kmeans_ema_update_(mu.clone(), torch.randn(5, 2, 8), decay=0.9,
                                   assign=torch.full((5, 2), 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="centroids"):
        attnkit.routing_commitment_loss(torch.randn(5, 2, 7), mu)
    with pytest.raises(ValueError, match="^x"):
        attnkit.routing_commitment_loss(torch.randn(7), mu)
    with pytest.raises(ValueError, match="local_heads"):
        attnkit.nn.RoutingAttention(32, 4, 2, local_heads=5)
    with pytest.raises(ValueError, match="num_heads"):
        attnkit.nn.RoutingAttention(30, 4, 2)


# ---- nn module -----------------------------------------------------------------------------------


def _toy_batch(g, B=8, L=48, E=32):
    # a content-based lookup task: each token must output the value of the nearest earlier token of
    # the same "type" -- solvable only by attending to matching content
    x = torch.randn(B, L, E, generator=g)
    target = torch.cumsum(x, dim=1) / torch.arange(1, L + 1)[None, :, None]
    return x, target


@pytest.mark.parametrize("shared_qk,local_heads", [(True, 2), (False, 0)])
def test_module_trains(shared_qk, local_heads):
    torch.manual_seed(0)
    E = 32
    m = attnkit.nn.RoutingAttention(E, 4, num_clusters=4, cluster_size=16, causal=True, local_heads=local_heads,
                                    local_window=8, shared_qk=shared_qk, ema_decay=0.9, commitment=1.0)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    task, aux_hist = [], []
    centroids0 = m.centroids.clone()
    for step in range(60):
        x, target = _toy_batch(g)
        out, aux = m(x)
        loss = F.mse_loss(out, target)
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        task.append(loss.item())
        aux_hist.append(aux.item())
        if step == 0:
            assert bool(m.centroids_initialized)
    assert sum(task[-5:]) / 5 < 0.7 * sum(task[:5]) / 5, task
    assert sum(aux_hist[-5:]) / 5 < 0.9 * sum(aux_hist[:5]) / 5, aux_hist
    assert not torch.equal(m.centroids, centroids0)
    torch.testing.assert_close(m.centroids.norm(dim=-1), torch.ones_like(m.centroids[..., 0]), atol=1e-5, rtol=0)
    # eval: no centroid update
    m.eval()
    before = m.centroids.clone()
    with torch.no_grad():
        out, aux = m(torch.randn(2, 20, E))
    assert out.shape == (2, 20, E) and aux.item() >= 0
    assert torch.equal(m.centroids, before)


def test_module_padding_and_shapes():
    torch.manual_seed(0)
    m = attnkit.nn.RoutingAttention(32, 4, num_clusters=3, causal=False, local_heads=1, local_window=4,
                                    shared_qk=False)
    x = torch.randn(2, 25, 32)
    pad = torch.zeros(2, 25, dtype=torch.bool)
    pad[1, 18:] = True
    out, aux = m(x, key_padding_mask=pad)
    assert out.shape == x.shape and torch.isfinite(out).all() and aux.dim() == 0
    # padded keys do not influence the valid tokens
    x2 = x.clone()
    x2[1, 18:] = torch.randn(7, 32) * 10
    m.eval()
    with torch.no_grad():
        o1, _ = m(x, key_padding_mask=pad)
        o2, _ = m(x2, key_padding_mask=pad)
    # routing can change with the padded values only through the padded tokens' own slots: use one
    # cluster holding every token so the routing is fixed
    m1 = attnkit.nn.RoutingAttention(32, 4, num_clusters=1, causal=False, shared_qk=False).eval()
    with torch.no_grad():
        a, _ = m1(x, key_padding_mask=pad)
        b, _ = m1(x2, key_padding_mask=pad)
    torch.testing.assert_close(a[1, :18], b[1, :18], atol=1e-5, rtol=0)
    assert torch.equal(a[1, 18:], torch.zeros_like(a[1, 18:]) + m1.o_proj.bias)
    assert torch.isfinite(o1).all() and torch.isfinite(o2).all()
    # L = 1 and L < num_clusters work
    out1, _ = m(torch.randn(3, 1, 32))
    assert out1.shape == (3, 1, 32)
    # 16-bit modules keep float32 centroids (EMA steps would vanish in 16-bit rounding)
    mb = attnkit.nn.RoutingAttention(32, 4, num_clusters=3).to(torch.bfloat16)
    assert mb.centroids.dtype == torch.float32 and mb.q_proj.weight.dtype == torch.bfloat16
    out, aux = mb(torch.randn(2, 12, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(aux)
