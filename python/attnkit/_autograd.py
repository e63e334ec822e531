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
