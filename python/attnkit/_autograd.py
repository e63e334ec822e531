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
