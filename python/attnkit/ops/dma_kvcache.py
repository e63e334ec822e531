"""Dynamic Mask Attention against a KV cache (generation): one op (``attnkit::dma_kvcache_fwd``) appends
the new keys, values and bias in place, then runs DMA over each batch row's valid keys."""

from __future__ import annotations

import math

import torch

from .._checks import (
    cache_seqlens_tensor,
    check_attention_inputs,
    check_bool,
    check_scale,
    check_tensor,
)
from .dma import _check_keep

__all__ = ["dynamic_mask_attention_with_kvcache"]


def dynamic_mask_attention_with_kvcache(q, k_cache, v_cache, bias_cache, k=None, v=None, bias=None, *,
                                        cache_seqlens, keep, causal=True, scale=None):
    """Dynamic Mask Attention for decoding with a KV cache (forward only).

    Args:
        q: ``[B, Lq, H, D]``.
        k_cache, v_cache: ``[B, Lmax, Hkv, D]``; bias_cache: ``[B, Hkv, Lmax]`` (float32 or q's dtype).
        k, v, bias: optional new entries ``[B, Lnew, Hkv, D]`` and ``[B, Hkv, Lnew]`` (all three or
            none), written **in place** into the caches at rows ``cache_seqlens[b] ..`` + Lnew.
        cache_seqlens: int or int32 ``[B]`` on q's device: valid cached rows before the append; the
            append must fit in ``Lmax``.
        keep, causal, scale: as :func:`attnkit.dynamic_mask_attention`, over the first
            ``Lk = cache_seqlens[b] + Lnew`` keys of batch row b (query row i at key position
            ``Lk - Lq + i``; ties of the top-``keep`` selection go to the lower key index).

    Returns ``out`` ``[B, Lq, max(H, Hkv), D]``. The selection keeps per query row a threshold and a
    tie index (no ``[B, H, Lk]`` tensor per query); the append, the selection of every batch row
    and the attention run in one op (``torch.ops.attnkit.dma_kvcache_fwd``, usable under
    ``torch.compile(fullgraph=True)``), which reads ``cache_seqlens`` once on the host to check it.
    No gradient flows through it (the op has no autograd formula).
    """
    check_attention_inputs(q, k_cache, v_cache)
    B, Lmax, Hkv, D = k_cache.shape
    check_tensor("bias_cache", bias_cache, 3)
    if tuple(bias_cache.shape) != (B, Hkv, Lmax):
        raise ValueError(f"bias_cache must have shape [B, Hkv, Lmax] = {[B, Hkv, Lmax]}, got {list(bias_cache.shape)}")
    if bias_cache.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"bias_cache must be float32 or the dtype of q ({q.dtype}), got {bias_cache.dtype}")
    if bias_cache.device != q.device:
        raise ValueError(f"bias_cache must be on the device of q ({q.device}), got {bias_cache.device}")
    given = [x is not None for x in (k, v, bias)]
    if any(given) and not all(given):
        raise ValueError("k, v and bias must be given together (or none of them)")
    lnew = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, 4)
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"{name} must have the dtype and device of q")
        if k.shape[0] != B or k.shape[2:] != k_cache.shape[2:] or v.shape != k.shape:
            raise ValueError(f"k and v must be [B, Lnew, Hkv, D] = [{B}, Lnew, {Hkv}, {D}], got {tuple(k.shape)}")
        lnew = k.shape[1]
        check_tensor("bias", bias, 3)
        if tuple(bias.shape) != (B, Hkv, lnew):
            raise ValueError(f"bias must have shape [B, Hkv, Lnew] = {[B, Hkv, lnew]}, got {list(bias.shape)}")
        if bias.device != q.device:
            raise ValueError(f"bias must be on the device of q ({q.device}), got {bias.device}")
    _check_keep(keep)
    causal = check_bool("causal", causal)
    scale = check_scale(scale, 1.0 / math.sqrt(D))
    cs = cache_seqlens_tensor(cache_seqlens, B, q.device)
    if isinstance(cache_seqlens, int) and cache_seqlens + lnew > Lmax:
        raise ValueError(f"the cache is too short: cache_seqlens ({cache_seqlens}) + {lnew} new keys > its {Lmax} rows")
    out, _ = torch.ops.attnkit.dma_kvcache_fwd(q, k_cache, v_cache, bias_cache, k, v, bias, cs, keep, causal, scale)
    return out


@torch.library.register_fake("attnkit::dma_kvcache_fwd")
def _dma_kvcache_fwd_fake(q, k_cache, v_cache, bias_cache, k, v, bias, cache_seqlens, keep, causal, scale):
    B, Lq, Hq, D = q.shape
    H = max(Hq, k_cache.shape[2])
    return q.new_empty((B, Lq, H, D)), q.new_empty((B, H, Lq), dtype=torch.float32)
