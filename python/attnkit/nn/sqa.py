"""Sparse Query Attention layer (Reactive AI, 2025): fewer query heads than the baseline head count
cut the attention FLOPs; the key/value head count is chosen independently (GQA/MQA-style)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.sqa import sparse_query_attention, sparse_query_attention_with_kvcache
from .kv_cache import KVCache

# Query / KV heads of each variant for num_heads = 16, as in the SQA paper. For another H the
# counts scale with H (e.g. 'sqa' is H/2 query and H/4 KV heads), rounded down and at least 1;
# 'mqa' and 'xsmqa' always have a single KV head.
SQA_PRESETS: dict[str, tuple[int, int]] = {
    "mha": (16, 16),
    "gqa": (16, 4),
    "mqa": (16, 1),
    "sqa": (8, 4),
    "ssqa": (8, 8),
    "xsqa": (4, 4),
    "xsmqa": (4, 1),
    "rsqa": (4, 8),
}
_SINGLE_KV = ("mqa", "xsmqa")


def preset_heads(name: str, num_heads: int = 16) -> tuple[int, int]:
    """(num_query_heads, num_kv_heads) of preset ``name`` for a model with ``num_heads`` heads."""
    if not isinstance(name, str) or name.lower() not in SQA_PRESETS:
        raise ValueError(f"name must be one of {sorted(SQA_PRESETS)}, got {name!r}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    name = name.lower()
    q16, kv16 = SQA_PRESETS[name]
    hq = max(1, q16 * num_heads // 16)
    hkv = 1 if name in _SINGLE_KV else max(1, kv16 * num_heads // 16)
    return hq, hkv


class SparseQueryAttention(nn.Module):
    """Self-attention with ``num_query_heads`` query heads and ``num_kv_heads`` key/value heads.

    ``head_dim = embed_dim // num_heads`` (``num_heads`` is the baseline head count that fixes the
    head size); the projections are Wq: ``embed_dim -> Hq * head_dim``, Wk and Wv:
    ``embed_dim -> Hkv * head_dim`` and Wo: ``max(Hq, Hkv) * head_dim -> embed_dim``. The attention
    itself is :func:`attnkit.sparse_query_attention`.

    ``forward(x, key_padding_mask=None)``: x ``[B, L, embed_dim]``. ``key_padding_mask`` ``[B, L]``
    bool, True marking padding (the ``nn.MultiheadAttention`` convention). Padded tokens are neither
    keys nor queries: each sequence runs through the op on its non-padded tokens only (same causal
    order), and the attention output at padded positions is 0 (so the layer returns Wo's bias
    there). This masked path loops over the batch; without padding the whole batch is one op call.

    ``forward(x, kv_cache=cache)`` (generation): ``cache`` is a :class:`attnkit.nn.KVCache` with
    ``num_kv_heads`` heads of ``head_dim``; the new tokens' keys / values are appended to it, they
    attend to every cached token (bottom-right aligned causal mask when ``causal``), and
    ``cache.seqlens`` advances by L. Forward only (:func:`attnkit.sparse_query_attention_with_kvcache`).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_query_heads: int,
        num_kv_heads: int,
        causal: bool = False,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, val in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("num_query_heads", num_query_heads),
            ("num_kv_heads", num_kv_heads),
        ):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_query_heads % num_kv_heads != 0 and num_kv_heads % num_query_heads != 0:
            raise ValueError(
                f"num_query_heads ({num_query_heads}) and num_kv_heads ({num_kv_heads}) must divide one another"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_query_heads = num_query_heads
        self.num_kv_heads = num_kv_heads
        self.num_out_heads = max(num_query_heads, num_kv_heads)
        self.head_dim = embed_dim // num_heads
        self.causal = bool(causal)
        kw = {"device": device, "dtype": dtype}
        hd = self.head_dim
        self.q_proj = nn.Linear(embed_dim, num_query_heads * hd, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * hd, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * hd, bias=bias, **kw)
        self.o_proj = nn.Linear(self.num_out_heads * hd, embed_dim, bias=bias, **kw)

    @classmethod
    def from_preset(cls, name: str, embed_dim: int, num_heads: int = 16, **kwargs) -> "SparseQueryAttention":
        """A layer of the SQA paper's variant ``name``: mha, gqa, mqa, sqa, ssqa, xsqa, xsmqa, rsqa
        (see ``SQA_PRESETS``). Extra keyword arguments (causal, bias, device, dtype) pass through."""
        hq, hkv = preset_heads(name, num_heads)
        return cls(embed_dim, num_heads, hq, hkv, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_query_heads={self.num_query_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, causal={self.causal}"
        )

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [batch, length, {self.embed_dim}], got {shape}")
        B, L, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).view(B, L, self.num_query_heads, hd)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, hd)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, hd)
        if kv_cache is not None:
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask and kv_cache cannot be combined")
            attn = sparse_query_attention_with_kvcache(q, kv_cache.k, kv_cache.v, k, v, cache_seqlens=kv_cache.seqlens,
                                                       causal=self.causal)
            kv_cache.seqlens.add_(L)
        elif key_padding_mask is None:
            attn = sparse_query_attention(q, k, v, causal=self.causal)
        else:
            attn = self._padded_attention(q, k, v, key_padding_mask)
        return self.o_proj(attn.reshape(B, L, self.num_out_heads * hd))

    def _padded_attention(self, q, k, v, key_padding_mask):
        B, L = q.shape[:2]
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, L):
            raise ValueError(f"key_padding_mask must have shape {(B, L)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on {q.device}, got {key_padding_mask.device}")
        if not bool(key_padding_mask.any()):
            return sparse_query_attention(q, k, v, causal=self.causal)
        outs = []
        for b in range(B):
            keep = torch.nonzero(~key_padding_mask[b]).squeeze(1)
            full = q.new_zeros((L, self.num_out_heads, self.head_dim))
            if keep.numel() > 0:
                qb = q[b].index_select(0, keep).unsqueeze(0)
                kb = k[b].index_select(0, keep).unsqueeze(0)
                vb = v[b].index_select(0, keep).unsqueeze(0)
                ob = sparse_query_attention(qb, kb, vb, causal=self.causal)
                full = full.index_copy(0, keep, ob[0])
            outs.append(full)
        return torch.stack(outs, dim=0)
