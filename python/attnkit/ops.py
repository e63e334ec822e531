"""Public, checked entry points of attnkit's ops.

Each function validates its inputs (``TypeError`` / ``ValueError`` naming the argument) and then
calls ``torch.ops.attnkit.*``; autograd and fake implementations are registered in ``_autograd.py``
and ``_meta.py``. Each op has its own section below.
"""

from __future__ import annotations

import math

import torch

# ------------------------------------------------------------------------------------------------
# Shared validation helpers
# ------------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_HEAD_DIMS = (32, 64, 96, 128, 256)


def _check_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {t.dim()} (shape {tuple(t.shape)})")


def _check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)}); call .contiguous()")


def _check_scale(scale, default: float) -> float:
    if scale is None:
        return default
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------------
# Sparse Query Attention
# ------------------------------------------------------------------------------------------------


def _check_sqa_inputs(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    B, _, Hq, D = q.shape
    _, _, Hkv, Dk = k.shape
    if k.shape[0] != B:
        raise ValueError(f"k must have the batch size of q ({B}), got {k.shape[0]}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if Dk != D:
        raise ValueError(f"k must have the head dim of q ({D}), got {Dk}")
    if D == 0:
        raise ValueError("q must have a non-zero head dim")
    if Hq == 0:
        raise ValueError("q must have at least one head")
    if Hkv == 0:
        raise ValueError("k must have at least one head")
    if Hq % Hkv != 0 and Hkv % Hq != 0:
        raise ValueError(f"the head counts of q ({Hq}) and k ({Hkv}) must divide one another")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_last_dim_contiguous(name, t)
    if q.device.type == "cuda":
        if q.dtype not in _CUDA_DTYPES:
            raise TypeError(f"q must be float16 or bfloat16 on CUDA, got {q.dtype}")
        if D not in _CUDA_HEAD_DIMS:
            raise ValueError(f"q has head dim {D}; on CUDA the supported head dims are {_CUDA_HEAD_DIMS}")


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
    _check_sqa_inputs(q, k, v)
    causal = _check_bool("causal", causal)
    return_lse = _check_bool("return_lse", return_lse)
    scale = _check_scale(scale, q.shape[-1] ** -0.5)
    out, lse = torch.ops.attnkit.sqa_fwd(q, k, v, causal, scale)
    return (out, lse) if return_lse else out
