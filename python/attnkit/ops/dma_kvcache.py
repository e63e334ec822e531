"""Dynamic Mask Attention against a KV cache (generation): appends the new keys, values and bias
in place, then runs :func:`attnkit.dynamic_mask_attention` of each batch row over its valid keys."""

from __future__ import annotations

import math

import torch

from .._checks import check_attention_inputs, check_bool, check_scale, check_tensor
from .dma import _check_keep, dynamic_mask_attention

__all__ = ["dynamic_mask_attention_with_kvcache"]


def _host_seqlens(cache_seqlens, B, device):
    if isinstance(cache_seqlens, bool):
        raise TypeError("cache_seqlens must be an int or an int32 tensor [B], got bool")
    if isinstance(cache_seqlens, int):
        if cache_seqlens < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens}")
        return [cache_seqlens] * B
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor [B], got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must have shape [B] = [{B}], got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens must be on the device of q ({device}), got {cache_seqlens.device}")
    out = [int(x) for x in cache_seqlens.tolist()]  # one small device-to-host copy on CUDA
    for b, s in enumerate(out):
        if s < 0:
            raise ValueError(f"cache_seqlens[{b}] must be >= 0, got {s}")
    return out


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
    tie index (no ``[B, H, Lk]`` tensor per query); each batch row runs one fused DMA call on views
    of its valid cache rows (a loop over B on the host).
    """
    check_attention_inputs(q, k_cache, v_cache)
    B, Lmax, Hkv, D = k_cache.shape
    check_tensor("bias_cache", bias_cache, 3)
    if tuple(bias_cache.shape) != (B, Hkv, Lmax):
        raise ValueError(f"bias_cache must have shape [B, Hkv, Lmax] = {[B, Hkv, Lmax]}, got {list(bias_cache.shape)}")
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
    _check_keep(keep)
    causal = check_bool("causal", causal)
    scale = check_scale(scale, 1.0 / math.sqrt(D))
    lens = _host_seqlens(cache_seqlens, B, q.device)
    for b, s in enumerate(lens):
        if s + lnew > Lmax:
            raise ValueError(f"the cache is too short: cache_seqlens[{b}] ({s}) + {lnew} new keys > its {Lmax} rows")
    outs = []
    for b, s in enumerate(lens):
        if lnew:
            k_cache[b, s:s + lnew].copy_(k[b])
            v_cache[b, s:s + lnew].copy_(v[b])
            bias_cache[b, :, s:s + lnew].copy_(bias[b])
        n = s + lnew
        outs.append(dynamic_mask_attention(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n],
                                           bias_cache[b:b + 1, :, :n], keep=keep, causal=causal, scale=scale))
    return torch.cat(outs, 0)
