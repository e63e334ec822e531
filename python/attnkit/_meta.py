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


# ------------------------------------------------------------------------------------------------
# Routing attention
# ------------------------------------------------------------------------------------------------


@torch.library.register_fake("attnkit::routing_assign")
def _routing_assign_fake(q, k, centroids, window, shared_qk, with_assign=False, key_padding_mask=None):
    B, L, H, _ = q.shape
    C = centroids.shape[1]
    q_idx = q.new_empty((B, H, C, window), dtype=torch.int32)
    k_idx = q.new_empty((B, H, C, window), dtype=torch.int32)
    nx = 1 if shared_qk else 2
    assign = q.new_empty((nx * B, L, H) if with_assign else (0,), dtype=torch.int32)
    return q_idx, k_idx, assign


@torch.library.register_fake("attnkit::routing_fwd")
def _routing_fwd_fake(q, k, v, q_idx, k_idx, key_padding_mask, causal, window_left, self_mask, scale,
                      deterministic=True):
    B, L, H, D = q.shape
    out = q.new_empty((B, L, H, D))
    if q_idx is None:
        return out, q.new_empty((0,)), q.new_empty((B, H, L), dtype=torch.float32)
    rows = q_idx.shape[2] * q_idx.shape[3]
    return out, q.new_empty((B, rows, H, D)), q.new_empty((B, H, rows), dtype=torch.float32)


@torch.library.register_fake("attnkit::routing_bwd")
def _routing_bwd_fake(dout, q, k, v, q_idx, k_idx, key_padding_mask, out_seg, lse, causal, window_left, self_mask,
                      scale, deterministic):
    B, L, H, D = q.shape
    return q.new_empty((B, L, H, D)), q.new_empty((B, L, H, D)), q.new_empty((B, L, H, D))


@torch.library.register_fake("attnkit::kmeans_assign")
def _kmeans_assign_fake(x, centroids):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.int32)


@torch.library.register_fake("attnkit::kmeans_ema_update_")
def _kmeans_ema_update_fake(centroids, x, assign, decay):
    return None
