"""Input checks shared by the ops: each raises ``TypeError`` / ``ValueError`` naming the argument."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


CUDA_DTYPES = (torch.float16, torch.bfloat16)


# Head dims with their own CUDA instantiation; the flash core also runs every other multiple of 8 up
# to 256 on the next larger one (zero-padded inside the kernel's loads).
CUDA_HEAD_DIMS = (32, 64, 96, 128, 256)


def cuda_head_dim_supported(D: int) -> bool:
    return 8 <= D <= 256 and D % 8 == 0


def check_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {t.dim()} (shape {tuple(t.shape)})")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)}); call .contiguous()")


def check_scale(scale, default: float) -> float:
    if scale is None:
        return default
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_window_size(window_size) -> tuple[int, int]:
    """``window_size = (left, right)``: two ints, each -1 (unbounded) or >= 0."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    out = []
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"window_size {side} must be an int, got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"window_size {side} must be -1 (unbounded) or >= 0, got {w}")
        out.append(int(w))
    return out[0], out[1]


def check_attention_inputs(q, k, v) -> None:
    """q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D]: the flash core's inputs (SQA, DMA)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4)
    if q.dtype not in FLOAT_DTYPES:
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
        check_last_dim_contiguous(name, t)
    if q.device.type == "cuda":
        if q.dtype not in CUDA_DTYPES:
            raise TypeError(f"q must be float16 or bfloat16 on CUDA, got {q.dtype}")
        if not cuda_head_dim_supported(D):
            raise ValueError(f"q has head dim {D}; on CUDA the head dim must be a multiple of 8 from 8 to 256")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def cache_seqlens_tensor(cache_seqlens, B, device):
    """cache_seqlens of the KV-cache ops as int32 [B] on device (an int applies to every batch row).
    The values of a tensor are checked by the ops, on the host, before anything is written."""
    if isinstance(cache_seqlens, bool):
        raise TypeError("cache_seqlens must be an int or an int32 tensor [B], got bool")
    if isinstance(cache_seqlens, int):
        if cache_seqlens < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {cache_seqlens}")
        return torch.full((B,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor [B], got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must have shape [B] = [{B}], got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens must be on the device of q ({device}), got {cache_seqlens.device}")
    return cache_seqlens
