"""Autograd formulas of attnkit's ops (``torch.library.register_autograd``), one section per op."""

from __future__ import annotations

import torch

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
