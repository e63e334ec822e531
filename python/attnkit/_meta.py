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
# =================================================================================================
# Dynamic Mask Attention (DMA)
# =================================================================================================
import torch as _torch

_DMA_BLOCK = 64  # tile size of the lists (the flash core's kFwdBlockM / kBwdBlockN)


@_torch.library.register_fake("attnkit::dma_select")
def _dma_select_fake(bias, keep, lq, causal):
    b, h, lk = bias.shape
    nqb = (lq + _DMA_BLOCK - 1) // _DMA_BLOCK
    nkb = (lk + _DMA_BLOCK - 1) // _DMA_BLOCK
    width = _torch.sym_min(nkb, keep + 2)
    f32, i32 = _torch.float32, _torch.int32
    return (
        bias.new_empty((b, h, lq), dtype=f32),
        bias.new_empty((b, h, lq), dtype=i32),
        bias.new_empty((b, h, nqb, width), dtype=i32),
        bias.new_empty((b, h, nqb), dtype=i32),
        bias.new_empty((b, h, nkb, nqb), dtype=i32),
        bias.new_empty((b, h, nkb), dtype=i32),
    )


def _dma_out_fake(q, k):
    b, lq, hq, d = q.shape
    hout = max(hq, k.shape[2])
    return q.new_empty((b, lq, hout, d)), q.new_empty((b, hout, lq), dtype=_torch.float32)


@_torch.library.register_fake("attnkit::dma_fwd")
def _dma_fwd_fake(q, k, v, bias, thr, tie, fwd_list, fwd_count, bwd_list, bwd_count, causal, scale):
    return _dma_out_fake(q, k)


@_torch.library.register_fake("attnkit::dma_bwd")
def _dma_bwd_fake(dout, q, k, v, bias, out, lse, thr, tie, bwd_list, bwd_count, causal, scale):
    return _torch.empty_like(q), _torch.empty_like(k), _torch.empty_like(v), bias.new_empty(bias.shape)


@_torch.library.register_fake("attnkit::masked_bias_fwd")
def _masked_bias_fwd_fake(q, k, v, attn_mask, attn_bias, causal, scale):
    return _dma_out_fake(q, k)


@_torch.library.register_fake("attnkit::masked_bias_bwd")
def _masked_bias_bwd_fake(dout, q, k, v, attn_mask, attn_bias, out, lse, causal, scale, need_dbias):
    if need_dbias and attn_bias is not None:
        dbias = attn_bias.new_empty(attn_bias.shape)
    else:
        dbias = q.new_empty((0,), dtype=_torch.float32)
    return _torch.empty_like(q), _torch.empty_like(k), _torch.empty_like(v), dbias


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
