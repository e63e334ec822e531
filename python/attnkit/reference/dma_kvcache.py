"""Float64 oracle of DMA decoding with a KV cache: append, then the DMA oracle per batch row."""

from __future__ import annotations

import torch

from .dma import dynamic_mask_attention


def dma_kvcache_reference(q, k_cache, v_cache, bias_cache, k=None, v=None, bias=None, cache_seqlens=0, *, keep,
                          causal=True, scale=None):
    """Returns ``(out, k_cache', v_cache', bias_cache')`` in float64 without touching the inputs:
    batch row b appends its new rows after ``cache_seqlens[b]`` and runs the DMA oracle over the
    first ``cache_seqlens[b] + Lnew`` keys."""
    B = q.shape[0]
    lens = [cache_seqlens] * B if isinstance(cache_seqlens, int) else [int(x) for x in cache_seqlens.tolist()]
    kc, vc, bc = k_cache.double().clone(), v_cache.double().clone(), bias_cache.double().clone()
    lnew = 0 if k is None else k.shape[1]
    outs = []
    for b, s in enumerate(lens):
        if lnew:
            kc[b, s:s + lnew] = k[b].double()
            vc[b, s:s + lnew] = v[b].double()
            bc[b, :, s:s + lnew] = bias[b].double()
        n = s + lnew
        out, _ = dynamic_mask_attention(q[b:b + 1].double(), kc[b:b + 1, :n], vc[b:b + 1, :n], bc[b:b + 1, :, :n],
                                        keep=keep, causal=causal, scale=scale)
        outs.append(out)
    return torch.cat(outs, 0), kc, vc, bc
