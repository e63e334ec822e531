"""Sparse Query Attention: the public function, its fake implementation and its autograd formula."""

from __future__ import annotations

import torch

from .._checks import check_attention_inputs, check_bool, check_scale

__all__ = ["sparse_query_attention"]


def sparse_query_attention(q, k, v, *, causal=False, scale=None, return_lse=False):
    """Sparse Query Attention: softmax attention with independent query and key/value head counts.

    Args:
        q: ``[B, Lq, Hq, D]``.
        k, v: ``[B, Lk, Hkv, D]``. ``Hq`` and ``Hkv`` must divide one another.
        causal: mask key ``j`` of query row ``i`` unless ``j <= i + Lk - Lq`` (bottom-right aligned,
            as FlashAttention). A row that sees no key outputs 0 (and its lse is ``-inf``).
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the fp32 log-sum-exp of each row.

    Head mapping, with ``H = max(Hq, Hkv)`` output heads:
        - ``Hq >= Hkv`` (MHA / GQA / MQA / SQA): output head ``h`` uses query head ``h`` and KV head
          ``h // (Hq / Hkv)``;
        - ``Hkv > Hq`` (reverse SQA): output head ``h`` uses query head ``h // (Hkv / Hq)`` and KV
          head ``h``.

    Returns:
        ``out`` ``[B, Lq, H, D]`` in the dtype of q, or ``(out, lse)`` with lse ``[B, H, Lq]`` fp32.

    Dtypes: fp16, bf16, fp32 and fp64 on CPU; fp16 and bf16 on CUDA with D in {32, 64, 96, 128, 256}.
    Gradients flow to q, k and v (not through lse).
    """
    check_attention_inputs(q, k, v)
    causal = check_bool("causal", causal)
    return_lse = check_bool("return_lse", return_lse)
    scale = check_scale(scale, q.shape[-1] ** -0.5)
    out, lse = torch.ops.attnkit.sqa_fwd(q, k, v, causal, scale)
    return (out, lse) if return_lse else out


# Fake implementations (torch.compile / FakeTensor)


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


# Autograd: sqa_fwd -> sqa_bwd. Gradients for q, k, v; lse is not differentiable.


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
