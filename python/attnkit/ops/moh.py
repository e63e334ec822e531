"""Mixture-of-Head attention: the public function, its fake implementation and its autograd formula."""

from __future__ import annotations

import torch

from .._checks import check_attention_inputs, check_bool, check_scale, check_tensor

__all__ = ["mixture_of_heads_attention"]


def mixture_of_heads_attention(q, k, v, head_idx, head_weight, *, causal=True, scale=None, return_lse=False):
    """Mixture-of-Head attention (Jin et al. 2024): each token uses only the heads its router picked.

    Args:
        q: ``[B, L, Hq, D]``.
        k, v: ``[B, L, Hkv, D]``, ``Hq`` a multiple of ``Hkv`` (query head h reads KV head
            ``h // (Hq / Hkv)``).
        head_idx: int32 / int64 ``[B, L, K]``: the query heads token t uses, distinct per token,
            ``-1`` for an empty slot.
        head_weight: ``[B, L, K]``, float32 or q's dtype: the router weight of each selection.
        causal: token t attends to keys ``j <= t``; else to every key. Keys are all tokens of the
            sequence, whichever heads they selected.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the fp32 log-sum-exp ``[B, Hq, L]`` (``-inf`` where not selected).

    Returns:
        ``out`` ``[B, L, Hq, D]``: row (t, h) is ``w * softmax(q_th K_h^T * scale) V_h`` when token t
        selected head h with weight w, else exactly 0. Only the selected (token, head) pairs are
        computed: the cost falls with the number of active heads.

    Gradients flow to q, k, v and head_weight (``d w = <dout_th, o_th>`` with o the unweighted head
    output). Dtypes: fp16, bf16, fp32, fp64 on CPU; fp16 and bf16 on CUDA with D in
    {32, 64, 96, 128, 256}. Bad ``head_idx`` (a head twice for a token, an index >= Hq or < -1)
    raises before any kernel runs.
    """
    check_attention_inputs(q, k, v)
    B, L, Hq, _ = q.shape
    Hkv = k.shape[2]
    if k.shape[1] != L:
        raise ValueError(f"k and v must have the sequence length of q ({L}), got {k.shape[1]}")
    if Hq % Hkv != 0:
        raise ValueError(f"the head count of q ({Hq}) must be a multiple of that of k and v ({Hkv})")
    check_tensor("head_idx", head_idx, 3)
    check_tensor("head_weight", head_weight, 3)
    if head_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"head_idx must be int32 or int64, got {head_idx.dtype}")
    if tuple(head_idx.shape[:2]) != (B, L):
        raise ValueError(f"head_idx must be [B, L, K] = [{B}, {L}, K], got {tuple(head_idx.shape)}")
    if head_weight.shape != head_idx.shape:
        raise ValueError(
            f"head_weight must have the shape of head_idx {tuple(head_idx.shape)}, got {tuple(head_weight.shape)}"
        )
    if head_weight.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"head_weight must be float32 or the dtype of q ({q.dtype}), got {head_weight.dtype}")
    for name, t in (("head_idx", head_idx), ("head_weight", head_weight)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    causal = check_bool("causal", causal)
    return_lse = check_bool("return_lse", return_lse)
    scale = check_scale(scale, q.shape[-1] ** -0.5)
    # the index values (range, duplicates) are checked by the op itself, before its kernels
    out, lse, *_ = torch.ops.attnkit.moh_fwd(q, k, v, head_idx, head_weight, causal, scale)
    return (out, lse) if return_lse else out


# Fake implementations (torch.compile / FakeTensor)


@torch.library.register_fake("attnkit::moh_fwd")
def _moh_fwd_fake(q, k, v, head_idx, head_weight, causal, scale):
    B, L, Hq, D = q.shape
    f32 = dict(dtype=torch.float32)
    i32 = dict(dtype=torch.int32)
    return (
        q.new_empty((B, L, Hq, D)),
        q.new_empty((B, Hq, L), **f32),
        q.new_empty((B, L, Hq, D)),
        q.new_empty((B, Hq, L), **f32),
        q.new_empty((B, Hq, L), **i32),
        q.new_empty((B, Hq), **i32),
        q.new_empty(tuple(head_idx.shape), **i32),
    )


@torch.library.register_fake("attnkit::moh_bwd")
def _moh_bwd_fake(dout, q, k, v, head_idx, head_weight, out_slot, lse_slot, q_index, q_count, slot, causal, scale):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        head_weight.new_empty(head_weight.shape),
    )


# Autograd: moh_fwd -> moh_bwd. Gradients for q, k, v, head_weight; lse and the residuals are not
# differentiable.


def _moh_setup_context(ctx, inputs, output):
    q, k, v, head_idx, head_weight, causal, scale = inputs
    out, lse, out_slot, lse_slot, q_index, q_count, slot = output
    ctx.mark_non_differentiable(lse, out_slot, lse_slot, q_index, q_count, slot)
    ctx.save_for_backward(q, k, v, head_idx, head_weight, out_slot, lse_slot, q_index, q_count, slot)
    ctx.causal = causal
    ctx.scale = scale


def _moh_backward(ctx, grad_out, *_):
    q, k, v, head_idx, head_weight, out_slot, lse_slot, q_index, q_count, slot = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    grad_out = grad_out.contiguous()
    dq, dk, dv, dw = torch.ops.attnkit.moh_bwd(
        grad_out, q, k, v, head_idx, head_weight, out_slot, lse_slot, q_index, q_count, slot, ctx.causal, ctx.scale
    )
    return dq, dk, dv, None, dw, None, None


torch.library.register_autograd("attnkit::moh_fwd", _moh_backward, setup_context=_moh_setup_context)
