"""Lightning attention (TransNormerLLM): the public functions, fake implementations and autograd formulas."""

from __future__ import annotations

import torch

from .._checks import FLOAT_DTYPES, check_scale, check_tensor

__all__ = ["lightning_attention", "lightning_attention_decode", "lightning_slopes"]


_CUDA_BLOCK_SIZES = (32, 64)


_CUDA_MAX_HEAD_DIM = 256


def _scale(scale) -> float:
    if scale is None:  # lightning's scale has a value default (1.0), never None
        raise TypeError("scale must be a float, got NoneType")
    return check_scale(scale, 1.0)


def _int_option(name, value, allowed_cuda, device) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (or None for automatic), got {value}")
    if allowed_cuda is not None and device.type == "cuda" and value not in allowed_cuda:
        raise ValueError(f"{name} must be one of {allowed_cuda} on CUDA, got {value}")
    return value


def _last_contiguous(t):
    return t if t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_qkv(q, k, v, steps_of_one=False):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if q.device.type == "cuda" and q.dtype == torch.float64:
        raise TypeError("q must be float16, bfloat16 or float32 on CUDA, got torch.float64")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, L, H, Dv] with B, L, H of q {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if q.shape[3] < 1:
        raise ValueError("q must have a head dim Dk >= 1")
    if v.shape[3] < 1:
        raise ValueError("v must have a head dim Dv >= 1")
    if q.device.type == "cuda":
        if q.shape[3] > _CUDA_MAX_HEAD_DIM:
            raise ValueError(f"q: head dim Dk must be <= {_CUDA_MAX_HEAD_DIM} on CUDA, got {q.shape[3]}")
        if v.shape[3] > _CUDA_MAX_HEAD_DIM:
            raise ValueError(f"v: head dim Dv must be <= {_CUDA_MAX_HEAD_DIM} on CUDA, got {v.shape[3]}")
    if steps_of_one and q.shape[1] != 1:
        raise ValueError(f"q must hold one step per sequence, [B, 1, H, Dk]; got {tuple(q.shape)}")


def _slopes(slopes, q):
    check_tensor("slopes", slopes, 1)
    if not slopes.is_floating_point():
        raise TypeError(f"slopes must be a floating-point tensor, got {slopes.dtype}")
    if slopes.shape[0] != q.shape[2]:
        raise ValueError(f"slopes must have shape [H] = [{q.shape[2]}], got {tuple(slopes.shape)}")
    if slopes.device != q.device:
        raise ValueError(f"slopes must be on the device of q ({q.device}), got {slopes.device}")
    return slopes.to(_acc_dtype(q.dtype))


def _state(name, s, shape, q):
    check_tensor(name, s, 4)
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [N, H, Dk, Dv] = {list(shape)}, got {tuple(s.shape)}")
    if not s.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {s.dtype}")
    if s.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {s.device}")


def _cu_seqlens(cu_seqlens, q):
    check_tensor("cu_seqlens", cu_seqlens, 1)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold at least one offset, [N + 1]")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on the device of q ({q.device}), got {cu_seqlens.device}")
    if q.shape[0] != 1:
        raise ValueError(f"q must have batch size 1 when cu_seqlens is given, got {q.shape[0]}")
    # The values are checked before any kernel runs, on every device (a CUDA tensor costs one copy of
    # the N + 1 offsets to the host, a sync). Under torch.compile the op checks them itself, with the
    # same messages, as a RuntimeError.
    if not torch.compiler.is_compiling():
        c = cu_seqlens.tolist()
        if c[0] != 0:
            raise ValueError(f"cu_seqlens[0] must be 0, got {c[0]}")
        if any(b < a for a, b in zip(c, c[1:])):
            raise ValueError("cu_seqlens must be non-decreasing")
        if c[-1] != q.shape[1]:
            raise ValueError(f"cu_seqlens[-1] must equal the number of rows L = {q.shape[1]}, got {c[-1]}")
    return cu_seqlens.numel() - 1


def lightning_slopes(num_heads: int, layer_idx: int | None = None, num_layers: int | None = None, *, device=None):
    """TransNormerLLM's decay rates s_h (lambda_h = exp(-s_h)), float32 ``[num_heads]``.

    s_h = 2^(-8 (h+1) / H) for H a power of two (ALiBi's slopes); for other H, the slopes of the largest
    power of two p < H followed by the odd-numbered slopes 2^(-8 (2i+1) / (2p)), i < H - p (ALiBi's
    rule). With ``layer_idx`` (and ``num_layers``) each slope is multiplied by
    ``1 - layer_idx / (num_layers - 1) + 1e-5`` (``1 + 1e-5`` for a single layer): strong decay in the
    first layer, almost none in the last, as in TransNormerLLM.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if (layer_idx is None) != (num_layers is None):
        raise ValueError("layer_idx and num_layers must be given together")
    if layer_idx is not None:
        for name, x in (("layer_idx", layer_idx), ("num_layers", num_layers)):
            if isinstance(x, bool) or not isinstance(x, int):
                raise TypeError(f"{name} must be an int, got {type(x).__name__}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"layer_idx must be in [0, num_layers) = [0, {num_layers}), got {layer_idx}")
    p = 1 << (num_heads.bit_length() - 1)  # largest power of two <= H
    exps = [8.0 * (h + 1) / p for h in range(p)]
    exps += [8.0 * (2 * i + 1) / (2 * p) for i in range(num_heads - p)]
    slopes = torch.tensor([2.0**-e for e in exps], dtype=torch.float64)
    if layer_idx is not None:
        frac = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
        slopes = slopes * (1.0 - frac + 1e-5)
    return slopes.to(device=device, dtype=torch.float32)


def lightning_attention(
    q,
    k,
    v,
    slopes,
    *,
    scale=1.0,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    block_size=None,
    num_splits=None,
):
    """Lightning attention (TransNormerLLM): causal linear attention with a per-head decay.

    Per batch b (or sequence of ``cu_seqlens``) and head h, with lambda_h = exp(-slopes[h]):

        S_t = lambda_h * S_{t-1} + k_t^T v_t,    S_{-1} = initial_state[b, h], or 0 when None
        o_t = scale * q_t S_t

    i.e. o_t = scale * sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s + scale * lambda^(t+1) q_t S_{-1}.
    No normalisation happens inside the op.

    Args:
        q, k: ``[B, L, H, Dk]``; v: ``[B, L, H, Dv]``; float16, bfloat16, float32 (or float64 on CPU).
            Dk and Dv are independent (<= 256 on CUDA); any L.
        slopes: ``[H]`` decay rates s_h >= 0 (see :func:`lightning_slopes`); used in float32.
        scale: multiplies q . S (1.0 as in TransNormerLLM; flash-linear-attention users pass Dk**-0.5).
        initial_state: ``[N, H, Dk, Dv]`` (N = B, or the number of sequences), float32.
        output_final_state: also return the final state ``[N, H, Dk, Dv]`` (float32).
        cu_seqlens: int32/int64 ``[N + 1]`` offsets of N packed sequences (then B must be 1). Each
            sequence runs on its own, with its own initial / final state (flash-linear-attention's
            convention); sequences may be empty.
        block_size: chunk length of the kernels (a tuning knob; any value >= 1 on CPU, 32 or 64 on
            CUDA). The result does not depend on it beyond rounding.
        num_splits: segments each sequence is split into for parallelism (None: automatic).

    Returns ``(o, final_state)``: o ``[B, L, H, Dv]`` in q's dtype; final_state, or None unless
    ``output_final_state``. Differentiable in q, k, v, slopes and initial_state. State and accumulation
    are float32 (float64 for float64 inputs).

    Kernels: chunks of ``block_size`` rows; within a chunk (Q K^T * decay) V on tensor cores, across
    chunks Q S with the float32 state S carried from chunk to chunk (rounded to q's dtype for the
    tensor-core product; for float16 it is first scaled by a power of two into float16's range).
    The backward runs three such sweeps (dq forward in time; dk and dv backward in time, which also
    give d initial_state) and, only when slopes require grad, a fourth: the forward-mode derivative
    of the state in lambda (T = dS/dlambda), contracted with the output gradient.
    """
    _check_qkv(q, k, v)
    slopes = _slopes(slopes, q)
    scale = _scale(scale)
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    n_seq = q.shape[0]
    if cu_seqlens is not None:
        n_seq = _cu_seqlens(cu_seqlens, q)
    if initial_state is not None:
        _state("initial_state", initial_state, (n_seq, q.shape[2], q.shape[3], v.shape[3]), q)
        initial_state = initial_state.to(_acc_dtype(q.dtype))
    block = _int_option("block_size", block_size, _CUDA_BLOCK_SIZES, q.device)
    splits = _int_option("num_splits", num_splits, None, q.device)
    q, k, v = (_last_contiguous(t) for t in (q, k, v))
    o, final_state = torch.ops.attnkit.lightning_fwd(
        q, k, v, slopes, scale, initial_state, cu_seqlens, block, splits
    )
    return o, (final_state if output_final_state else None)


def lightning_attention_decode(q, k, v, state, slopes, *, scale=1.0, inplace=True):
    """One generation step of :func:`lightning_attention`.

    q, k ``[B, 1, H, Dk]``, v ``[B, 1, H, Dv]``, state ``[B, H, Dk, Dv]`` float32 (the final state of
    the prompt, or of the previous step). Computes S = lambda * S + k^T v and o = scale * q S.

    Returns ``(o, state)``: o ``[B, 1, H, Dv]``; with ``inplace`` (the default) ``state`` itself, updated
    in place (not differentiable: it needs a contiguous float32 ``state``); otherwise a new tensor, and
    the step is differentiable in q, k, v, state and slopes.
    """
    _check_qkv(q, k, v, steps_of_one=True)
    slopes = _slopes(slopes, q)
    scale = _scale(scale)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    _state("state", state, (q.shape[0], q.shape[2], q.shape[3], v.shape[3]), q)
    q, k, v = (_last_contiguous(t) for t in (q, k, v))
    acc = _acc_dtype(q.dtype)
    if inplace:
        if state.dtype != acc:
            raise TypeError(f"state must be {acc} for an in-place step, got {state.dtype}")
        if not state.is_contiguous():
            raise ValueError("state must be contiguous for an in-place step (or pass inplace=False)")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, state, slopes)):
            raise ValueError("the in-place decode step is not differentiable; pass inplace=False")
        o = torch.ops.attnkit.lightning_decode_(q, k, v, state, slopes, scale)
        return o, state
    return torch.ops.attnkit.lightning_decode(q, k, v, state.to(acc), slopes, scale)


# Fake implementations (torch.compile / FakeTensor)


@torch.library.register_fake("attnkit::lightning_fwd")


def _lightning_fwd_fake(q, k, v, slopes, scale, initial_state, cu_seqlens, block_size, num_splits):
    B, L, H, Dk = q.shape
    Dv = v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty((B, L, H, Dv))
    final_state = q.new_empty((N, H, Dk, Dv), dtype=_acc_dtype(q.dtype))
    return o, final_state


@torch.library.register_fake("attnkit::lightning_bwd")


def _lightning_bwd_fake(
    dout, dfinal_state, q, k, v, slopes, scale, initial_state, cu_seqlens, block_size, num_splits, compute_dslopes
):
    B, L, H, Dk = q.shape
    Dv = v.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    acc = _acc_dtype(q.dtype)
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


# Autograd: lightning_fwd -> lightning_bwd (dq, dk, dv, d slopes, d initial_state); lightning_decode (one
# step) -> lightning_bwd with L = 1. lightning_decode_ (in place) has none.


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
