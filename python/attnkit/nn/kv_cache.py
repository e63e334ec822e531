"""A key/value cache the caller owns, for generation with the attention layers of ``attnkit.nn``."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Preallocated caches of one attention layer.

    ``k``, ``v``: ``[B, max_len, Hkv, D]``; ``bias``: ``[B, Hkv, max_len]`` float32 for DMA layers
    (None otherwise); ``seqlens``: int32 ``[B]``, the valid rows of each batch row. A layer called
    with ``kv_cache=`` appends its new tokens at ``seqlens[b]``, attends over the valid rows and then
    advances ``seqlens`` by the number of new tokens (all updates in place).
    """

    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor
    bias: torch.Tensor | None = None

    @classmethod
    def empty(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, with_bias: bool = False,
              device=None, dtype=None) -> "KVCache":
        shape = (batch, max_len, num_kv_heads, head_dim)
        k = torch.zeros(shape, device=device, dtype=dtype)
        v = torch.zeros(shape, device=device, dtype=dtype)
        bias = torch.zeros(batch, num_kv_heads, max_len, device=device, dtype=torch.float32) if with_bias else None
        return cls(k, v, torch.zeros(batch, dtype=torch.int32, device=device), bias)

    def reset(self) -> None:
        self.seqlens.zero_()
