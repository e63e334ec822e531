"""Dynamic Mask Attention (DMA): the public functions, fake implementations and autograd formulas."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._checks import FLOAT_DTYPES, check_attention_inputs, check_scale, check_tensor

__all__ = ["DynamicMask", "dynamic_mask_attention", "dynamic_mask_select", "masked_bias_attention"]


class DynamicMask(NamedTuple):
    """The compact mask of :func:`dynamic_mask_select` (no ``L x L`` tensor anywhere).

    ``thr`` (float32) and ``tie`` (int32), both ``[B, Hkv, Lq]``: query row ``i`` keeps the visible key
    ``j`` iff ``bias[j] > thr[i]`` or (``bias[j] == thr[i]`` and ``j <= tie[i]``). ``fwd_list[b, g, m]``
    lists (ascending, padded with -1) the 64-key blocks holding a key that some row of the 64-row
    query block ``m`` keeps, ``fwd_count[b, g, m]`` of them; ``bwd_list[b, g, n]`` / ``bwd_count`` list
    the query blocks for each key block ``n``.
    """

    thr: torch.Tensor
    tie: torch.Tensor
    fwd_list: torch.Tensor
    fwd_count: torch.Tensor
    bwd_list: torch.Tensor
    bwd_count: torch.Tensor


def _check_keep(keep):
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be an int (got {type(keep).__name__})")
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep})")


def _check_bias_select(bias):
    check_tensor("bias", bias)
    if bias.dim() != 3:
        raise ValueError(f"bias must be 3-D [B, Hkv, Lk] (got {bias.dim()} dims)")
    if bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"bias must be a floating tensor (got {bias.dtype})")


def dynamic_mask_select(bias, *, keep, lq, causal):
    """Mask selection of Dynamic Mask Attention, without attention: returns a :class:`DynamicMask`.

    ``bias`` ``[B, Hkv, Lk]``; query row ``i`` (of ``lq``) sees keys ``j <= i + (Lk - lq)`` when
    ``causal``, all keys otherwise; it keeps all its visible keys if there are at most ``keep``, else
    the ``keep`` visible keys with the largest bias (ties to the lower ``j``). No gradient.
    """
    _check_bias_select(bias)
    _check_keep(keep)
    if isinstance(lq, bool) or not isinstance(lq, int) or lq < 0:
        raise ValueError(f"lq must be an int >= 0 (got {lq!r})")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (got {type(causal).__name__})")
    return DynamicMask(*torch.ops.attnkit.dma_select(bias.detach(), keep, lq, causal))


def dynamic_mask_attention(q, k, v, bias, *, keep, causal=True, scale=None, return_lse=False, deterministic=False,
                           _tile_skip=True):
    """Dynamic Mask Attention (trainable top-``keep`` sparse attention), fused mask selection + flash core.

    Args:
        q: ``[B, Lq, H, D]``; k, v: ``[B, Lk, Hkv, D]`` (GQA: H a multiple of Hkv; SQA: the reverse).
        bias: ``[B, Hkv, Lk]``, float32 or the dtype of q: one score per key and KV head, shared by
            all query rows (DMA's value-derived gate). It is added to the scores of kept keys and
            decides which keys are kept.
        keep: number of keys each query row keeps (DMA's window size).
        causal: bottom-right aligned causal masking (key j visible to row i iff j <= i + Lk - Lq).
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, max(H, Hkv), Lq]`` (float32, not differentiable).
        deterministic: CUDA backward with a bitwise repeatable dq (as flash-attn's flag): every key
            block writes its dq contribution into its own fp32 slice and the slices are summed in a
            fixed order, at the cost of ``ceil(Lk / 64) * max(1, Hkv / H)`` fp32 copies of dq. False
            adds them with fp32 atomics (run-to-run bit differences). The CPU path always is.

    Row ``i`` keeps its visible keys if there are at most ``keep`` of them, else the ``keep`` visible
    keys with the largest bias, ties going to the lower key index. Scores are
    ``scale * q_i . k_j + bias[j]`` on kept keys, ``-inf`` elsewhere. A row with no kept key
    outputs 0 (lse ``-inf``). Gradients flow to q, k, v and bias (``dbias[b, g, j]`` sums over the rows
    and the query heads of KV head g); the selection itself has no gradient. The mask is never
    materialised: the selection costs O(Lk log Lk) per (batch, KV head) and O(Lq + Lk) memory.
    """
    check_attention_inputs(q, k, v)
    check_tensor("bias", bias)
    if bias.dim() != 3 or tuple(bias.shape) != (q.shape[0], k.shape[2], k.shape[1]):
        raise ValueError(
            f"bias must have shape [B, Hkv, Lk] = {[q.shape[0], k.shape[2], k.shape[1]]}, got {list(bias.shape)}"
        )
    if bias.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"bias must be float32 or the dtype of q ({q.dtype}), got {bias.dtype}")
    if bias.device != q.device:
        raise ValueError(f"bias must be on the device of q ({q.device}), got {bias.device}")
    _check_keep(keep)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (got {type(causal).__name__})")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool (got {type(deterministic).__name__})")
    scale = check_scale(scale, 1.0 / math.sqrt(q.shape[3]))
    sel = torch.ops.attnkit.dma_select(bias.detach(), keep, q.shape[1], causal)
    thr, tie, fl, fc, bl, bc = sel
    if not _tile_skip:
        fl = fc = bl = bc = None
    out, lse = torch.ops.attnkit.dma_fwd(q, k, v, bias, thr, tie, fl, fc, bl, bc, causal, scale, deterministic)
    return (out, lse) if return_lse else out


def _check_broadcast(x, name, q, k):
    b, lq, hq = q.shape[0], q.shape[1], q.shape[2]
    lk, hkv = k.shape[1], k.shape[2]
    if x.dim() > 4:
        raise ValueError(f"{name} must have at most 4 dims (got {x.dim()})")
    shape = (1,) * (4 - x.dim()) + tuple(x.shape)
    ok = shape[0] in (1, b) and shape[1] in (1, hq, hkv) and shape[2] in (1, lq) and shape[3] in (1, lk)
    if not ok:
        raise ValueError(
            f"{name} of shape {list(x.shape)} does not broadcast to [B, H|Hkv|1, Lq|1, Lk] = "
            f"[{b}, {hq}|{hkv}|1, {lq}|1, {lk}]"
        )
    if x.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")


def masked_bias_attention(q, k, v, *, attn_mask=None, attn_bias=None, causal=False, scale=None, return_lse=False):
    """Attention with a dense boolean mask and/or additive bias (flash-dmattn's interface), on the flash core.

    ``attn_mask`` (bool, True = attend) and ``attn_bias`` (float) broadcast to
    ``[B, H|Hkv|1, Lq|1, Lk]`` (fewer leading dims are padded with 1). Scores are
    ``scale * q.k + attn_bias`` where the mask is true (and causal visibility holds), ``-inf``
    elsewhere; rows with nothing visible output 0. On CUDA, tiles whose mask is all false are skipped
    in the forward and the backward. The gradient of ``attn_bias`` has its own (broadcast) shape.
    """
    check_attention_inputs(q, k, v)
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask)
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be a bool tensor (got {attn_mask.dtype})")
        _check_broadcast(attn_mask, "attn_mask", q, k)
    if attn_bias is not None:
        check_tensor("attn_bias", attn_bias)
        if attn_bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"attn_bias must be a floating tensor (got {attn_bias.dtype})")
        _check_broadcast(attn_bias, "attn_bias", q, k)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (got {type(causal).__name__})")
    scale = check_scale(scale, 1.0 / math.sqrt(q.shape[3]))
    out, lse = torch.ops.attnkit.masked_bias_fwd(q, k, v, attn_mask, attn_bias, causal, scale)
    return (out, lse) if return_lse else out


# Fake implementations (torch.compile / FakeTensor)


_BLOCK = 64  # tile size of the lists (the flash core's kFwdBlockM / kBwdBlockN)


@torch.library.register_fake("attnkit::dma_select")


def _dma_select_fake(bias, keep, lq, causal, seqused_k=None):
    b, h, lk = bias.shape
    nqb = (lq + _BLOCK - 1) // _BLOCK
    nkb = (lk + _BLOCK - 1) // _BLOCK
    width = torch.sym_min(nkb, keep + 2)
    f32, i32 = torch.float32, torch.int32
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
    return q.new_empty((b, lq, hout, d)), q.new_empty((b, hout, lq), dtype=torch.float32)


@torch.library.register_fake("attnkit::dma_fwd")


def _dma_fwd_fake(q, k, v, bias, thr, tie, fwd_list, fwd_count, bwd_list, bwd_count, causal, scale,
                  deterministic=False):
    return _dma_out_fake(q, k)


@torch.library.register_fake("attnkit::dma_bwd")


def _dma_bwd_fake(dout, q, k, v, bias, out, lse, thr, tie, bwd_list, bwd_count, causal, scale,
                  deterministic=False):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), bias.new_empty(bias.shape)


@torch.library.register_fake("attnkit::masked_bias_fwd")


def _masked_bias_fwd_fake(q, k, v, attn_mask, attn_bias, causal, scale):
    return _dma_out_fake(q, k)


@torch.library.register_fake("attnkit::masked_bias_bwd")


def _masked_bias_bwd_fake(dout, q, k, v, attn_mask, attn_bias, out, lse, causal, scale, need_dbias):
    if need_dbias and attn_bias is not None:
        dbias = attn_bias.new_empty(attn_bias.shape)
    else:
        dbias = q.new_empty((0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


# Autograd: dma_fwd -> dma_bwd, masked_bias_fwd -> masked_bias_bwd


def _dma_setup_context(ctx, inputs, output):
    q, k, v, bias, thr, tie, _fl, _fc, bl, bc, causal, scale = inputs[:12]
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse, thr, tie, bl, bc)
    ctx.causal = causal
    ctx.scale = scale
    ctx.deterministic = inputs[12] if len(inputs) > 12 else False
    ctx.mark_non_differentiable(lse)


def _dma_backward(ctx, dout, _dlse):
    q, k, v, bias, out, lse, thr, tie, bl, bc = ctx.saved_tensors
    dq, dk, dv, dbias = torch.ops.attnkit.dma_bwd(
        dout.contiguous(), q, k, v, bias, out, lse, thr, tie, bl, bc, ctx.causal, ctx.scale, ctx.deterministic
    )
    return dq, dk, dv, dbias, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("attnkit::dma_fwd", _dma_backward, setup_context=_dma_setup_context)


def _masked_bias_setup_context(ctx, inputs, output):
    q, k, v, attn_mask, attn_bias, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, attn_bias, out, lse)
    ctx.causal = causal
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _masked_bias_backward(ctx, dout, _dlse):
    q, k, v, attn_mask, attn_bias, out, lse = ctx.saved_tensors
    need_dbias = attn_bias is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dbias = torch.ops.attnkit.masked_bias_bwd(
        dout.contiguous(), q, k, v, attn_mask, attn_bias, out, lse, ctx.causal, ctx.scale, need_dbias
    )
    return dq, dk, dv, None, (dbias if need_dbias else None), None, None


torch.library.register_autograd(
    "attnkit::masked_bias_fwd", _masked_bias_backward, setup_context=_masked_bias_setup_context
)
