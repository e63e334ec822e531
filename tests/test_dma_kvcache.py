"""dynamic_mask_attention_with_kvcache against the float64 DMA oracle: appends at different
cache_seqlens per batch row, ties of the top-keep selection, decode loop == full DMA, input errors."""

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
