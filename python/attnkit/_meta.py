"""Fake (meta) implementations of attnkit's ops for torch.compile / FakeTensor, one section per op."""

from __future__ import annotations

import torch

# ------------------------------------------------------------------------------------------------
# Sparse Query Attention
# ------------------------------------------------------------------------------------------------


@torch.library.register_fake("attnkit::sqa_fwd")
def _sqa_fwd_fake(q, k, v, causal, scale):
    B, Lq, Hq, D = q.shape
    H = max(Hq, k.shape[2])
    out = q.new_empty((B, Lq, H, D))
    lse = q.new_empty((B, H, Lq), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("attnkit::sqa_bwd")
def _sqa_bwd_fake(dout, q, k, v, out, lse, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
