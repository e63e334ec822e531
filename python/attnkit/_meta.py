"""Fake (meta) implementations of attnkit's ops for torch.compile / FakeTensor, one section per op."""

from __future__ import annotations

import torch

# ------------------------------------------------------------------------------------------------
# Lightning attention
# ------------------------------------------------------------------------------------------------


def _lightning_acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("attnkit::lightning_fwd")
def _lightning_fwd_fake(q, k, v, slopes, scale, initial_state, cu_seqlens, block_size, num_splits):
    B, L, H, Dk = q.shape
    Dv = v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty((B, L, H, Dv))
    final_state = q.new_empty((N, H, Dk, Dv), dtype=_lightning_acc(q.dtype))
    return o, final_state


@torch.library.register_fake("attnkit::lightning_bwd")
def _lightning_bwd_fake(
    dout, dfinal_state, q, k, v, slopes, scale, initial_state, cu_seqlens, block_size, num_splits, compute_dslopes
):
    B, L, H, Dk = q.shape
    Dv = v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    acc = _lightning_acc(q.dtype)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        q.new_empty((H,), dtype=acc),
        q.new_empty((N, H, Dk, Dv), dtype=acc),
    )


@torch.library.register_fake("attnkit::lightning_decode_")
def _lightning_decode_inplace_fake(q, k, v, state, slopes, scale):
    return q.new_empty((q.shape[0], 1, q.shape[2], v.shape[3]))


@torch.library.register_fake("attnkit::lightning_decode")
def _lightning_decode_fake(q, k, v, state, slopes, scale):
    o = q.new_empty((q.shape[0], 1, q.shape[2], v.shape[3]))
    return o, torch.empty_like(state, memory_format=torch.contiguous_format)
