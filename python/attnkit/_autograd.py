"""Autograd formulas of attnkit's ops (``torch.library.register_autograd``), one section per op."""

from __future__ import annotations

import torch

# ------------------------------------------------------------------------------------------------
# Sparse Query Attention: sqa_fwd -> sqa_bwd. Gradients for q, k, v; lse is not differentiable.
# ------------------------------------------------------------------------------------------------


def _sqa_setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal = causal
    ctx.scale = scale


def _sqa_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # Autograd may hand over expanded or otherwise strided grads; the kernels need a unit last stride.
    grad_out = grad_out.contiguous()
    dq, dk, dv = torch.ops.attnkit.sqa_bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("attnkit::sqa_fwd", _sqa_backward, setup_context=_sqa_setup_context)


# ------------------------------------------------------------------------------------------------
# Routing attention: routing_fwd -> routing_bwd. Gradients for q, k, v only (never through the
# routing indices or the padding mask); out_seg and lse are saved, not differentiable.
# ------------------------------------------------------------------------------------------------


def _routing_setup_context(ctx, inputs, output):
    q, k, v, q_idx, k_idx, key_padding_mask, causal, window_left, self_mask, scale, deterministic = inputs
    out, out_seg, lse = output
    ctx.mark_non_differentiable(out_seg, lse)
    ctx.indexed = q_idx is not None
    # Without indices the core's output is `out` itself (out_seg is empty).
    ctx.save_for_backward(q, k, v, q_idx, k_idx, key_padding_mask, out_seg if ctx.indexed else out, lse)
    ctx.causal = causal
    ctx.window_left = window_left
    ctx.self_mask = self_mask
    ctx.scale = scale
    ctx.deterministic = deterministic


def _routing_backward(ctx, grad_out, grad_out_seg, grad_lse):
    q, k, v, q_idx, k_idx, key_padding_mask, o, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    grad_out = grad_out.contiguous()
    dq, dk, dv = torch.ops.attnkit.routing_bwd(grad_out, q, k, v, q_idx, k_idx, key_padding_mask, o, lse, ctx.causal,
                                               ctx.window_left, ctx.self_mask, ctx.scale, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("attnkit::routing_fwd", _routing_backward, setup_context=_routing_setup_context)
# =================================================================================================
# Dynamic Mask Attention (DMA)
# =================================================================================================
import torch as _torch


def _dma_setup_context(ctx, inputs, output):
    q, k, v, bias, thr, tie, _fl, _fc, bl, bc, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse, thr, tie, bl, bc)
    ctx.causal = causal
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _dma_backward(ctx, dout, _dlse):
    q, k, v, bias, out, lse, thr, tie, bl, bc = ctx.saved_tensors
    dq, dk, dv, dbias = _torch.ops.attnkit.dma_bwd(
        dout.contiguous(), q, k, v, bias, out, lse, thr, tie, bl, bc, ctx.causal, ctx.scale
    )
    return dq, dk, dv, dbias, None, None, None, None, None, None, None, None


_torch.library.register_autograd("attnkit::dma_fwd", _dma_backward, setup_context=_dma_setup_context)


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
    dq, dk, dv, dbias = _torch.ops.attnkit.masked_bias_bwd(
        dout.contiguous(), q, k, v, attn_mask, attn_bias, out, lse, ctx.causal, ctx.scale, need_dbias
    )
    return dq, dk, dv, None, (dbias if need_dbias else None), None, None


_torch.library.register_autograd(
    "attnkit::masked_bias_fwd", _masked_bias_backward, setup_context=_masked_bias_setup_context
)


# ------------------------------------------------------------------------------------------------
# Lightning attention: lightning_fwd -> lightning_bwd (dq, dk, dv, d slopes, d initial_state);
# lightning_decode (one step) -> lightning_bwd with L = 1. lightning_decode_ (in place) has none.
# ------------------------------------------------------------------------------------------------


def _lightning_setup_context(ctx, inputs, output):
    q, k, v, slopes, scale, initial_state, cu_seqlens, block_size, num_splits = inputs
    ctx.save_for_backward(q, k, v, slopes, initial_state, cu_seqlens)
    ctx.scale = scale
    ctx.block_size = block_size
    ctx.num_splits = num_splits


def _lightning_backward(ctx, grad_o, grad_final):
    q, k, v, slopes, initial_state, cu_seqlens = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros(v.shape, dtype=q.dtype, device=q.device)
    grad_o = grad_o.contiguous()
    if grad_final is not None:
        grad_final = grad_final.contiguous()
    dq, dk, dv, dslopes, dinit = torch.ops.attnkit.lightning_bwd(
        grad_o,
        grad_final,
        q,
        k,
        v,
        slopes,
        ctx.scale,
        initial_state,
        cu_seqlens,
        ctx.block_size,
        ctx.num_splits,
        bool(ctx.needs_input_grad[3]),
    )
    return (
        dq,
        dk,
        dv,
        dslopes if ctx.needs_input_grad[3] else None,
        None,
        dinit if initial_state is not None and ctx.needs_input_grad[5] else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "attnkit::lightning_fwd", _lightning_backward, setup_context=_lightning_setup_context
)


def _lightning_decode_setup_context(ctx, inputs, output):
    q, k, v, state, slopes, scale = inputs
    ctx.save_for_backward(q, k, v, state, slopes)
    ctx.scale = scale


def _lightning_decode_backward(ctx, grad_o, grad_state):
    q, k, v, state, slopes = ctx.saved_tensors
    if grad_o is None:
        grad_o = torch.zeros(v.shape, dtype=q.dtype, device=q.device)
    grad_o = grad_o.contiguous()
    if grad_state is not None:
        grad_state = grad_state.contiguous()
    # A step is the L = 1 case of the full op, with the state as initial state.
    dq, dk, dv, dslopes, dstate = torch.ops.attnkit.lightning_bwd(
        grad_o, grad_state, q, k, v, slopes, ctx.scale, state, None, 0, 1, bool(ctx.needs_input_grad[4])
    )
    return dq, dk, dv, dstate, (dslopes if ctx.needs_input_grad[4] else None), None


torch.library.register_autograd(
    "attnkit::lightning_decode", _lightning_decode_backward, setup_context=_lightning_decode_setup_context
)
