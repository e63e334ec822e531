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


# =================================================================================================
# Dynamic Mask Attention (DMA)
# =================================================================================================
import math as _math
from typing import NamedTuple as _NamedTuple, Optional as _Optional

import torch as _torch

_FLOAT_DTYPES = (_torch.float16, _torch.bfloat16, _torch.float32, _torch.float64)
_CUDA_HEAD_DIMS = (32, 64, 96, 128, 256)


class DynamicMask(_NamedTuple):
    """The compact mask of :func:`dynamic_mask_select` (no ``L x L`` tensor anywhere).

    ``thr`` (float32) and ``tie`` (int32), both ``[B, Hkv, Lq]``: query row ``i`` keeps the visible key
    ``j`` iff ``bias[j] > thr[i]`` or (``bias[j] == thr[i]`` and ``j <= tie[i]``). ``fwd_list[b, g, m]``
    lists (ascending, padded with -1) the 64-key blocks holding a key that some row of the 64-row
    query block ``m`` keeps, ``fwd_count[b, g, m]`` of them; ``bwd_list[b, g, n]`` / ``bwd_count`` list
    the query blocks for each key block ``n``.
    """

    thr: _torch.Tensor
    tie: _torch.Tensor
    fwd_list: _torch.Tensor
    fwd_count: _torch.Tensor
    bwd_list: _torch.Tensor
    bwd_count: _torch.Tensor


def _dma_check_tensor(x, name):
    if not isinstance(x, _torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {type(x).__name__})")


def _dma_check_qkv(q, k, v):
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        _dma_check_tensor(x, name)
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, L, H, D] (got {x.dim()} dims)")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64 (got {q.dtype})")
    for x, name in ((k, "k"), (v, "v")):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have the batch size of q ({q.shape[0]}), got {k.shape[0]}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have the head dim of q ({q.shape[3]}), got {k.shape[3]}")
    hq, hkv = q.shape[2], k.shape[2]
    if hq == 0 or hkv == 0 or (hq % hkv != 0 and hkv % hq != 0):
        raise ValueError(f"the head counts of q ({hq}) and k ({hkv}) must be positive and divide one another")
    if q.shape[3] == 0:
        raise ValueError("q must have a non-zero head dim")
    if q.is_cuda:
        if q.dtype not in (_torch.float16, _torch.bfloat16):
            raise TypeError(f"q must be float16 or bfloat16 on CUDA (got {q.dtype})")
        if q.shape[3] not in _CUDA_HEAD_DIMS:
            raise ValueError(f"q has head dim {q.shape[3]}; the CUDA kernels support {_CUDA_HEAD_DIMS}")
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def _dma_check_keep(keep):
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be an int (got {type(keep).__name__})")
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep})")


def _dma_scale(scale, head_dim):
    if scale is None:
        return 1.0 / _math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None (got {type(scale).__name__})")
    return float(scale)


def _dma_check_bias_select(bias):
    _dma_check_tensor(bias, "bias")
    if bias.dim() != 3:
        raise ValueError(f"bias must be 3-D [B, Hkv, Lk] (got {bias.dim()} dims)")
    if bias.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"bias must be a floating tensor (got {bias.dtype})")


def dynamic_mask_select(bias, *, keep, lq, causal):
    """Mask selection of Dynamic Mask Attention, without attention: returns a :class:`DynamicMask`.

    ``bias`` ``[B, Hkv, Lk]``; query row ``i`` (of ``lq``) sees keys ``j <= i + (Lk - lq)`` when
    ``causal``, all keys otherwise; it keeps all its visible keys if there are at most ``keep``, else
    the ``keep`` visible keys with the largest bias (ties to the lower ``j``). No gradient.
    """
    _dma_check_bias_select(bias)
    _dma_check_keep(keep)
    if isinstance(lq, bool) or not isinstance(lq, int) or lq < 0:
        raise ValueError(f"lq must be an int >= 0 (got {lq!r})")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (got {type(causal).__name__})")
    return DynamicMask(*_torch.ops.attnkit.dma_select(bias.detach(), keep, lq, causal))


def dynamic_mask_attention(q, k, v, bias, *, keep, causal=True, scale=None, return_lse=False, _tile_skip=True):
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

    Row ``i`` keeps its visible keys if there are at most ``keep`` of them, else the ``keep`` visible
    keys with the largest bias, ties going to the lower key index. Scores are
    ``scale * q_i . k_j + bias[j]`` on kept keys, ``-inf`` elsewhere. A row with no kept key
    outputs 0 (lse ``-inf``). Gradients flow to q, k, v and bias (``dbias[b, g, j]`` sums over the rows
    and the query heads of KV head g); the selection itself has no gradient. The mask is never
    materialised: the selection costs O(Lk log Lk) per (batch, KV head) and O(Lq + Lk) memory.
    """
    _dma_check_qkv(q, k, v)
    _dma_check_tensor(bias, "bias")
    if bias.dim() != 3 or tuple(bias.shape) != (q.shape[0], k.shape[2], k.shape[1]):
        raise ValueError(
            f"bias must have shape [B, Hkv, Lk] = {[q.shape[0], k.shape[2], k.shape[1]]}, got {list(bias.shape)}"
        )
    if bias.dtype not in (_torch.float32, q.dtype):
        raise TypeError(f"bias must be float32 or the dtype of q ({q.dtype}), got {bias.dtype}")
    if bias.device != q.device:
        raise ValueError(f"bias must be on the device of q ({q.device}), got {bias.device}")
    _dma_check_keep(keep)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (got {type(causal).__name__})")
    scale = _dma_scale(scale, q.shape[3])
    sel = _torch.ops.attnkit.dma_select(bias.detach(), keep, q.shape[1], causal)
    thr, tie, fl, fc, bl, bc = sel
    if not _tile_skip:
        fl = fc = bl = bc = None
    out, lse = _torch.ops.attnkit.dma_fwd(q, k, v, bias, thr, tie, fl, fc, bl, bc, causal, scale)
    return (out, lse) if return_lse else out


def _dma_check_broadcast(x, name, q, k):
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
    _dma_check_qkv(q, k, v)
    if attn_mask is not None:
        _dma_check_tensor(attn_mask, "attn_mask")
        if attn_mask.dtype != _torch.bool:
            raise TypeError(f"attn_mask must be a bool tensor (got {attn_mask.dtype})")
        _dma_check_broadcast(attn_mask, "attn_mask", q, k)
    if attn_bias is not None:
        _dma_check_tensor(attn_bias, "attn_bias")
        if attn_bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"attn_bias must be a floating tensor (got {attn_bias.dtype})")
        _dma_check_broadcast(attn_bias, "attn_bias", q, k)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (got {type(causal).__name__})")
    scale = _dma_scale(scale, q.shape[3])
    out, lse = _torch.ops.attnkit.masked_bias_fwd(q, k, v, attn_mask, attn_bias, causal, scale)
    return (out, lse) if return_lse else out
