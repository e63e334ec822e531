"""attnkit.nn layers with a KVCache: generating token by token (and by chunks) gives the outputs of
the full causal forward pass."""

from __future__ import annotations

import pytest
import torch

from attnkit.nn import DynamicMaskAttention, KVCache, SparseQueryAttention


@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 4)])
def test_sqa_layer_generation(hq, hkv):
    torch.manual_seed(0)
    m = SparseQueryAttention(64, 4, hq, hkv, causal=True, dtype=torch.float64)
    x = torch.randn(2, 11, 64, dtype=torch.float64)
    full = m(x)
    cache = KVCache.empty(2, 16, hkv, m.head_dim, dtype=torch.float64)
    steps = [m(x[:, :4], kv_cache=cache)]  # a prompt chunk, then one token at a time
    for t in range(4, 11):
        steps.append(m(x[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full)
    assert cache.seqlens.tolist() == [11, 11]


def test_dma_layer_generation():
    torch.manual_seed(1)
    m = DynamicMaskAttention(64, 4, 2, keep=5, causal=True, dtype=torch.float64)
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    full = m(x)
    cache = KVCache.empty(2, 12, 2, m.head_dim, with_bias=True, dtype=torch.float64)
    steps = [m(x[:, t:t + 1], kv_cache=cache) for t in range(10)]
    torch.testing.assert_close(torch.cat(steps, 1), full)
    assert cache.seqlens.tolist() == [10, 10]


def test_layer_cache_errors():
    m = DynamicMaskAttention(32, 2, 2, keep=3)
    with pytest.raises(ValueError, match="with_bias=True"):
        m(torch.randn(1, 1, 32), kv_cache=KVCache.empty(1, 4, 2, 16))
    s = SparseQueryAttention(32, 2, 2, 2, causal=True)
    with pytest.raises(ValueError, match="cannot be combined"):
        s(torch.randn(1, 1, 32), torch.zeros(1, 1, dtype=torch.bool), kv_cache=KVCache.empty(1, 4, 2, 16))
