"""Dynamic Mask Attention layer (DMA / Doge style)."""

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dma import dynamic_mask_attention
from ..ops.dma_kvcache import dynamic_mask_attention_with_kvcache
from .kv_cache import KVCache


class DynamicMaskAttention(nn.Module):
    """Self-attention with a trainable dynamic mask (Doge's DMA layer).

    q, k, v and o projections; ``dt_proj`` (Linear ``Hkv*D -> Hkv``) reads the value states, and the
    per-key bias ``exp(A * softplus(dt))`` ([B, Hkv, L], A a learnt ``[Hkv]`` parameter) both selects
    the ``keep`` keys each query keeps and is added to their scores. Gradients reach ``dt_proj``
    and ``A`` through the bias. When ``L <= keep`` this is dense attention plus the bias.

    Input ``x`` ``[B, L, embed_dim]``; output ``[B, L, embed_dim]``.

    ``forward(x, kv_cache=cache)`` (generation, forward only): ``cache`` is a
    :class:`attnkit.nn.KVCache` made with ``with_bias=True``; the new tokens' keys, values and bias
    are appended, the top-``keep`` selection runs over every cached key, and ``cache.seqlens``
    advances by L (:func:`attnkit.dynamic_mask_attention_with_kvcache`).
    """

    def __init__(self, embed_dim, num_heads, num_kv_heads, keep=2048, causal=True, bias=False,
                 device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1 (got {keep!r})")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.keep = keep
        self.causal = causal
        d = self.head_dim
        self.q_proj = nn.Linear(embed_dim, num_heads * d, bias=bias, **fk)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * d, bias=bias, **fk)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * d, bias=bias, **fk)
        self.o_proj = nn.Linear(num_heads * d, embed_dim, bias=bias, **fk)
        self.dt_proj = nn.Linear(num_kv_heads * d, num_kv_heads, bias=bias, **fk)
        # A != 0 at initialisation, so that dt_proj receives a gradient from the first step.
        self.A = nn.Parameter(torch.empty(num_kv_heads, device=device, dtype=torch.float32))
        nn.init.uniform_(self.A, 0.1, 1.0)

    def dynamic_bias(self, v):
        """bias [B, Hkv, L] (float32) from the value states v [B, L, Hkv*D]."""
        dt = self.dt_proj(v)  # [B, L, Hkv]
        return torch.exp(self.A * F.softplus(dt.float())).transpose(1, 2).contiguous()

    def forward(self, x, kv_cache: KVCache | None = None):
        b, l, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, l, self.num_heads, d)
        v_flat = self.v_proj(x)
        k = self.k_proj(x).view(b, l, self.num_kv_heads, d)
        v = v_flat.view(b, l, self.num_kv_heads, d)
        bias = self.dynamic_bias(v_flat)
        if kv_cache is not None:
            if kv_cache.bias is None:
                raise ValueError("a DynamicMaskAttention layer needs a KVCache made with with_bias=True")
            o = dynamic_mask_attention_with_kvcache(q, kv_cache.k, kv_cache.v, kv_cache.bias, k, v, bias,
                                                    cache_seqlens=kv_cache.seqlens, keep=self.keep,
                                                    causal=self.causal)
            kv_cache.seqlens.add_(l)
        else:
            o = dynamic_mask_attention(q, k, v, bias, keep=self.keep, causal=self.causal)
        return self.o_proj(o.reshape(b, l, self.num_heads * d))
