"""Public, checked entry points of attnkit's ops.

Each function validates its inputs (``TypeError`` / ``ValueError`` naming the argument) and then
calls ``torch.ops.attnkit.*``; autograd and fake implementations are registered in ``_autograd.py``
and ``_meta.py``. Each op has its own section below.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

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


def _check_attention_inputs(q, k, v) -> None:
    """q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D]: the flash core's inputs (SQA, DMA)."""
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
    _check_attention_inputs(q, k, v)
    causal = _check_bool("causal", causal)
    return_lse = _check_bool("return_lse", return_lse)
    scale = _check_scale(scale, q.shape[-1] ** -0.5)
    out, lse = torch.ops.attnkit.sqa_fwd(q, k, v, causal, scale)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------------
# Routing attention (Routing Transformer: online k-means routing, attention inside clusters)
# ------------------------------------------------------------------------------------------------

import torch.nn.functional as _rt_F  # noqa: E402


def _rt_float(name, t):
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _rt_like_q(name, t, q):
    _check_tensor(name, t, 4)
    if t.dtype != q.dtype:
        raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if t.shape != q.shape:
        raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    _check_last_dim_contiguous(name, t)


def _rt_check_centroids(centroids, H, D, device):
    _check_tensor("centroids", centroids, 3)
    _rt_float("centroids", centroids)
    if centroids.device != device:
        raise ValueError(f"centroids must be on {device}, got {centroids.device}")
    if centroids.shape[0] != H or centroids.shape[2] != D or centroids.shape[1] < 1:
        raise ValueError(f"centroids must have shape [H={H}, C>=1, D={D}], got {tuple(centroids.shape)}")


def routing_assign(q, k, centroids, *, window, shared_qk=True, key_padding_mask=None):
    """Balanced routing of the Routing Transformer (no gradient).

    q, k: [B, L, H, D]; centroids: [H, C, D] (unit norm). For each (batch, head, cluster c) returns
    the ``window`` tokens with the largest normalize(q) . mu_c (queries) and normalize(k) . mu_c (keys),
    ties going to the lower position, each list sorted by position: ``(q_idx, k_idx)``, both int32
    [B, H, C, window]. ``shared_qk=True``: keys are normalize(q), k is not read (may be None) and the
    two lists are equal. Needs 1 <= window <= L.

    ``key_padding_mask`` [B, L] bool (True = padding): padded tokens rank below all others, so no list
    holds one as long as ``window`` <= the number of unpadded tokens of every sequence (which makes
    key padding exact inside :func:`routing_attention`).
    """
    _check_tensor("q", q, 4)
    _rt_float("q", q)
    _check_last_dim_contiguous("q", q)
    _check_bool("shared_qk", shared_qk)
    if not shared_qk:
        if k is None:
            raise ValueError("k must be given when shared_qk is False")
        _rt_like_q("k", k, q)
    B, L, H, D = q.shape
    _rt_check_centroids(centroids, H, D, q.device)
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if not 1 <= window <= L:
        raise ValueError(f"window must lie in [1, L={L}], got {window}")
    _rt_check_padding(key_padding_mask, B, L, q.device)
    q_idx, k_idx, _ = torch.ops.attnkit.routing_assign(
        q.detach(), None if shared_qk else k.detach(), centroids.detach(), window, shared_qk, False, key_padding_mask)
    return q_idx, k_idx


def _rt_check_index(name, idx, B, H, device):
    _check_tensor(name, idx, 4)
    if idx.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {idx.dtype}")
    if idx.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {idx.device}")
    if idx.shape[0] != B or idx.shape[1] != H:
        raise ValueError(f"{name} must have shape [B={B}, H={H}, C, w], got {tuple(idx.shape)}")


def _rt_check_padding(mask, B, L, device):
    if mask is None:
        return
    _check_tensor("key_padding_mask", mask, 2)
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool, got {mask.dtype}")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"key_padding_mask must have shape [B={B}, L={L}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask must be on {device}, got {mask.device}")


def routing_attention(q, k, v, q_idx, k_idx, *, causal=True, shared_qk=True, scale=None, deterministic=True):
    """Attention inside routed clusters (Routing Transformer), on the flash core.

    q, k, v: [B, L, H, D]; q_idx, k_idx: int32 [B, H, C, w] (from :func:`routing_assign`). In cluster
    c, query token i of q_idx[b, h, c] attends to the key tokens of k_idx[b, h, c]:
    softmax(scale * q_i . k_j) v_j over the visible keys; ``causal``: only keys at positions <= i;
    ``shared_qk``: the score of a token with itself is -5e4 (it attends to itself only when nothing
    else is visible) and k may be None, meaning k = normalize(q) (the Reformer convention; pass
    k = F.normalize(q, dim=-1) yourself for the same). A query with no visible key in a cluster gets 0
    there. Key padding: route padded tokens out with ``routing_assign(..., key_padding_mask=...)``.

    Returns o [B, L, H, D]: a token's mean over the clusters its query was routed to, 0 when none.
    Gradients reach q, k, v (never the routing). ``deterministic=False`` lets the CUDA backward
    scatter with fp32 atomics (slightly faster, run-to-run bit differences); CPU is always deterministic.
    """
    _check_tensor("q", q, 4)
    _rt_float("q", q)
    _check_last_dim_contiguous("q", q)
    _check_bool("causal", causal)
    _check_bool("shared_qk", shared_qk)
    _check_bool("deterministic", deterministic)
    if k is None:
        if not shared_qk:
            raise ValueError("k must be given when shared_qk is False")
        k = _rt_F.normalize(q, dim=-1)
    _rt_like_q("k", k, q)
    _rt_like_q("v", v, q)
    B, L, H, D = q.shape
    if D == 0:
        raise ValueError("q must have a non-zero head dim")
    _rt_check_index("q_idx", q_idx, B, H, q.device)
    _rt_check_index("k_idx", k_idx, B, H, q.device)
    if k_idx.shape[2] != q_idx.shape[2]:
        raise ValueError(f"k_idx must have as many clusters as q_idx ({q_idx.shape[2]}), got {k_idx.shape[2]}")
    scale = _check_scale(scale, D ** -0.5)
    out, _, _ = torch.ops.attnkit.routing_fwd(q, k, v, q_idx, k_idx, None, causal, -1, shared_qk, scale,
                                                  deterministic)
    return out


def _routing_local_attention(q, k, v, *, window, causal=True, self_mask=False, scale=None, key_padding_mask=None):
    """Sliding-window attention through the core's window (the routing module's local heads): token i
    attends to keys j with i - window < j (and j <= i when causal), i.e. ``window`` keys including
    itself. q, k, v [B, L, H, D]."""
    _check_tensor("q", q, 4)
    _rt_float("q", q)
    _check_last_dim_contiguous("q", q)
    _rt_like_q("k", k, q)
    _rt_like_q("v", v, q)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    _rt_check_padding(key_padding_mask, q.shape[0], q.shape[1], q.device)
    scale = _check_scale(scale, q.shape[-1] ** -0.5)
    out, _, _ = torch.ops.attnkit.routing_fwd(q, k, v, None, None, key_padding_mask, causal, window - 1,
                                                  self_mask, scale, True)
    return out


def _rt_flat(x, centroids, name="x"):
    _check_tensor(name, x)
    _rt_float(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [..., H, D], got {tuple(x.shape)}")
    H, D = x.shape[-2], x.shape[-1]
    _rt_check_centroids(centroids, H, D, x.device)
    x3 = x.reshape(-1, H, D)
    _check_last_dim_contiguous(name, x3)
    return x3


def kmeans_assign(x, centroids):
    """The cluster of every vector: argmax_c normalize(x[..., h, :]) . centroids[h, c] (first maximum),
    int32 of shape x.shape[:-1]. x: [..., H, D]; centroids: [H, C, D]."""
    x3 = _rt_flat(x, centroids)
    a = torch.ops.attnkit.kmeans_assign(x3.detach(), centroids.detach())
    return a.reshape(x.shape[:-1])


@torch.no_grad()
def kmeans_ema_update_(centroids, x, *, decay, assign=None):
    """One online k-means step of the Routing Transformer, in place on ``centroids`` [H, C, D]:
    every vector x[..., h, :] goes to its argmax cluster (or ``assign``, int32 x.shape[:-1]);
    mu_c <- normalize(decay * mu_c + (1 - decay) * normalize(mean of the normalised vectors of c)).
    Clusters that got no vector keep their centroid. Returns ``centroids``."""
    x3 = _rt_flat(x, centroids)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"decay must be a float, got {type(decay).__name__}")
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    a = None
    if assign is not None:
        _check_tensor("assign", assign)
        if assign.dtype != torch.int32:
            raise TypeError(f"assign must be int32, got {assign.dtype}")
        if tuple(assign.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"assign must have shape {tuple(x.shape[:-1])}, got {tuple(assign.shape)}")
        a = assign.reshape(x3.shape[0], x3.shape[1])
    torch.ops.attnkit.kmeans_ema_update_(centroids, x3, a, float(decay))
    return centroids


def routing_commitment_loss(x, centroids, assign=None):
    """mean over the vectors x[..., h, :] of ||normalize(x) - mu_assigned||^2 (the k-means commitment
    loss; multiply by the commitment weight yourself). Differentiable in x; centroids are constants.
    ``assign`` (int32 x.shape[:-1]) skips recomputing the clusters."""
    x3 = _rt_flat(x, centroids)
    H, C, D = centroids.shape
    if assign is None:
        a = torch.ops.attnkit.kmeans_assign(x3.detach(), centroids.detach())
    else:
        _check_tensor("assign", assign)
        if tuple(assign.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"assign must have shape {tuple(x.shape[:-1])}, got {tuple(assign.shape)}")
        a = assign.reshape(x3.shape[0], H)
    dtype = torch.promote_types(x.dtype, torch.float32)
    xn = _rt_F.normalize(x3.to(dtype), dim=-1)
    flat = centroids.detach().to(dtype).reshape(H * C, D)
    offs = torch.arange(H, device=x.device) * C
    mu = flat[a.long() + offs]  # [N, H, D]
    if xn.numel() == 0:
        return xn.sum()
    return ((xn - mu) ** 2).sum(-1).mean()


@torch.no_grad()
def kmeans_init(x, num_clusters, *, iters=10, generator=None):
    """Initial centroids [H, num_clusters, D] (float32, unit norm) from a batch x [..., H, D]:
    greedy k-means++ seeding on the cosine distance (per head), then ``iters`` k-means iterations (each
    cluster moves to the normalised mean of its vectors; clusters that got none keep their centroid)."""
    _check_tensor("x", x)
    _rt_float("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape [..., H, D], got {tuple(x.shape)}")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive int, got {num_clusters!r}")
    H, D = x.shape[-2], x.shape[-1]
    x3 = x.reshape(-1, H, D)
    N = x3.shape[0]
    if N == 0:
        raise ValueError("x must hold at least one vector")
    xn = _rt_F.normalize(x3.float(), dim=-1).transpose(0, 1)  # [H, N, D]
    heads = torch.arange(H, device=x.device)
    first = torch.randint(0, N, (H,), generator=generator).to(x.device)
    mu = xn.new_zeros(H, num_clusters, D)
    mu[:, 0] = xn[heads, first]
    dist = (1 - torch.einsum("hnd,hd->hn", xn, mu[:, 0])).clamp_min(0)
    # greedy k-means++: of a few candidates drawn ~ distance, keep the one that lowers the potential most
    n_try = 2 + int(math.log(num_clusters))
    for c in range(1, num_clusters):
        w = dist.double().cpu()
        w[w.sum(1) <= 0] = 1.0  # every vector already is a centroid: pick any
        cand = torch.multinomial(w, n_try, replacement=True, generator=generator).to(x.device)  # [H, T]
        d_cand = (1 - torch.einsum("hnd,htd->htn", xn, xn[heads[:, None], cand])).clamp_min(0)
        new_dist = torch.minimum(dist[:, None, :], d_cand)  # [H, T, N]
        best = new_dist.sum(-1).argmin(-1)  # [H]
        pick = cand[heads, best]
        mu[:, c] = xn[heads, pick]
        dist = new_dist[heads, best]
    # an all-zero vector cannot seed a direction: replace by a random unit vector
    zero = mu.norm(dim=-1) == 0
    if zero.any():
        fill = _rt_F.normalize(torch.randn(int(zero.sum()), D, generator=generator), dim=-1).to(mu.device)
        mu[zero] = fill
    for _ in range(iters):
        torch.ops.attnkit.kmeans_ema_update_(mu, x3, None, 0.0)
    return mu
# =================================================================================================
# Dynamic Mask Attention (DMA)
# =================================================================================================

class DynamicMask(NamedTuple):
    """The compact mask of :func:`dynamic_mask_select` (no ``L x L`` tensor anywhere).

    ``thr`` (float32) and ``tie`` (int32), both ``[B, Hkv, Lq]``: query row ``i`` keeps the visible key
    ``j`` iff ``bias[j] > thr[i]`` or (``bias[j] == thr[i]`` and ``j <= tie[i]``). ``fwd_list[b, g, m]``
    lists (ascending, padded with -1) the 64-key blocks holding a key that some row of the 64-row
    query block ``m`` keeps, ``fwd_count[b, g, m]`` of them; ``bwd_list[b, g, n]`` / ``bwd_count`` list
    the query blocks for each key block ``n``.
    """

    thr: torch.Tensor
    tie: torch.Tensor
    fwd_list: torch.Tensor
    fwd_count: torch.Tensor
    bwd_list: torch.Tensor
    bwd_count: torch.Tensor


def _dma_check_keep(keep):
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be an int (got {type(keep).__name__})")
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep})")


def _dma_check_bias_select(bias):
    _check_tensor("bias", bias)
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
    return DynamicMask(*torch.ops.attnkit.dma_select(bias.detach(), keep, lq, causal))


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
    _check_attention_inputs(q, k, v)
    _check_tensor("bias", bias)
    if bias.dim() != 3 or tuple(bias.shape) != (q.shape[0], k.shape[2], k.shape[1]):
        raise ValueError(
            f"bias must have shape [B, Hkv, Lk] = {[q.shape[0], k.shape[2], k.shape[1]]}, got {list(bias.shape)}"
        )
    if bias.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"bias must be float32 or the dtype of q ({q.dtype}), got {bias.dtype}")
    if bias.device != q.device:
        raise ValueError(f"bias must be on the device of q ({q.device}), got {bias.device}")
    _dma_check_keep(keep)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (got {type(causal).__name__})")
    scale = _check_scale(scale, 1.0 / math.sqrt(q.shape[3]))
    sel = torch.ops.attnkit.dma_select(bias.detach(), keep, q.shape[1], causal)
    thr, tie, fl, fc, bl, bc = sel
    if not _tile_skip:
        fl = fc = bl = bc = None
    out, lse = torch.ops.attnkit.dma_fwd(q, k, v, bias, thr, tie, fl, fc, bl, bc, causal, scale)
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
    _check_attention_inputs(q, k, v)
    if attn_mask is not None:
        _check_tensor("attn_mask", attn_mask)
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be a bool tensor (got {attn_mask.dtype})")
        _dma_check_broadcast(attn_mask, "attn_mask", q, k)
    if attn_bias is not None:
        _check_tensor("attn_bias", attn_bias)
        if attn_bias.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"attn_bias must be a floating tensor (got {attn_bias.dtype})")
        _dma_check_broadcast(attn_bias, "attn_bias", q, k)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool (got {type(causal).__name__})")
    scale = _check_scale(scale, 1.0 / math.sqrt(q.shape[3]))
    out, lse = torch.ops.attnkit.masked_bias_fwd(q, k, v, attn_mask, attn_bias, causal, scale)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------------
# Lightning attention (TransNormerLLM)
# ------------------------------------------------------------------------------------------------

_LT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LT_CUDA_BLOCK_SIZES = (32, 64)
_LT_CUDA_MAX_HEAD_DIM = 256


def _lt_scale(scale) -> float:
    if scale is None:  # lightning's scale has a value default (1.0), never None
        raise TypeError("scale must be a float, got NoneType")
    return _check_scale(scale, 1.0)


def _lt_int_option(name, value, allowed_cuda, device) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (or None for automatic), got {value}")
    if allowed_cuda is not None and device.type == "cuda" and value not in allowed_cuda:
        raise ValueError(f"{name} must be one of {allowed_cuda} on CUDA, got {value}")
    return value


def _lt_last_contiguous(t):
    return t if t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _lt_acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lt_check_qkv(q, k, v, steps_of_one=False):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    if q.dtype not in _LT_DTYPES:
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
        if q.shape[3] > _LT_CUDA_MAX_HEAD_DIM:
            raise ValueError(f"q: head dim Dk must be <= {_LT_CUDA_MAX_HEAD_DIM} on CUDA, got {q.shape[3]}")
        if v.shape[3] > _LT_CUDA_MAX_HEAD_DIM:
            raise ValueError(f"v: head dim Dv must be <= {_LT_CUDA_MAX_HEAD_DIM} on CUDA, got {v.shape[3]}")
    if steps_of_one and q.shape[1] != 1:
        raise ValueError(f"q must hold one step per sequence, [B, 1, H, Dk]; got {tuple(q.shape)}")


def _lt_slopes(slopes, q):
    _check_tensor("slopes", slopes, 1)
    if not slopes.is_floating_point():
        raise TypeError(f"slopes must be a floating-point tensor, got {slopes.dtype}")
    if slopes.shape[0] != q.shape[2]:
        raise ValueError(f"slopes must have shape [H] = [{q.shape[2]}], got {tuple(slopes.shape)}")
    if slopes.device != q.device:
        raise ValueError(f"slopes must be on the device of q ({q.device}), got {slopes.device}")
    return slopes.to(_lt_acc_dtype(q.dtype))


def _lt_state(name, s, shape, q):
    _check_tensor(name, s, 4)
    if tuple(s.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [N, H, Dk, Dv] = {list(shape)}, got {tuple(s.shape)}")
    if not s.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {s.dtype}")
    if s.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {s.device}")


def _lt_cu_seqlens(cu_seqlens, q):
    _check_tensor("cu_seqlens", cu_seqlens, 1)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must hold at least one offset, [N + 1]")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on the device of q ({q.device}), got {cu_seqlens.device}")
    if q.shape[0] != 1:
        raise ValueError(f"q must have batch size 1 when cu_seqlens is given, got {q.shape[0]}")
    # Values are checked where that needs no device sync (the CUDA kernels clamp them instead).
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
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
    _lt_check_qkv(q, k, v)
    slopes = _lt_slopes(slopes, q)
    scale = _lt_scale(scale)
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    n_seq = q.shape[0]
    if cu_seqlens is not None:
        n_seq = _lt_cu_seqlens(cu_seqlens, q)
    if initial_state is not None:
        _lt_state("initial_state", initial_state, (n_seq, q.shape[2], q.shape[3], v.shape[3]), q)
        initial_state = initial_state.to(_lt_acc_dtype(q.dtype))
    block = _lt_int_option("block_size", block_size, _LT_CUDA_BLOCK_SIZES, q.device)
    splits = _lt_int_option("num_splits", num_splits, None, q.device)
    q, k, v = (_lt_last_contiguous(t) for t in (q, k, v))
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
    _lt_check_qkv(q, k, v, steps_of_one=True)
    slopes = _lt_slopes(slopes, q)
    scale = _lt_scale(scale)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    _lt_state("state", state, (q.shape[0], q.shape[2], q.shape[3], v.shape[3]), q)
    q, k, v = (_lt_last_contiguous(t) for t in (q, k, v))
    acc = _lt_acc_dtype(q.dtype)
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
