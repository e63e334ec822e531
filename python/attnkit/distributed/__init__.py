"""Context parallelism for attnkit over ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

The sequence dimension (dim 1 of ``[B, L, H, D]``) is split over the ranks of a process group;
each function takes this rank's shard and returns this rank's shard of the result:

- :func:`shard_sequence` / :func:`unshard_sequence`: split a full tensor / gather the shards back
  (layouts ``"contiguous"`` and ``"zigzag"``);
- :func:`ring_sparse_query_attention`: :func:`attnkit.sparse_query_attention` by ring attention
  (K/V shards passed around the ring, partial outputs merged by their lse);
- :func:`lightning_attention_cp`: :func:`attnkit.lightning_attention` by state passing (LASP-2:
  the ranks all-gather their [B, H, Dk, Dv] state contributions);
- :class:`CommCounter`, :func:`ring_sqa_comm_bytes`, :func:`lightning_cp_comm_bytes`: the bytes a
  rank sends, counted and predicted.

Nothing here gathers the whole sequence's q, k or v on one rank. Import it explicitly:
``import attnkit.distributed``.
"""

from __future__ import annotations

import math

import torch

import attnkit

from . import _lightning, _ring
from ._comm import CommCounter, group_rank_size
from ._shard import LAYOUTS, check_layout, shard_sequence, unshard_sequence

__all__ = [
    "LAYOUTS",
    "CommCounter",
    "lightning_attention_cp",
    "lightning_cp_comm_bytes",
    "ring_sparse_query_attention",
    "ring_sqa_comm_bytes",
    "shard_sequence",
    "unshard_sequence",
]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {t.dim()} (shape {tuple(t.shape)})")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_scale(scale, default):
    if scale is None:
        return default
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _check_same(name, t, q):
    if t.dtype != q.dtype:
        raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")


def _contig_last(t):
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


# ------------------------------------------------------------------------------------------------
# Ring attention for the SQA core
# ------------------------------------------------------------------------------------------------


def ring_sparse_query_attention(
    q, k, v, *, group=None, causal=False, scale=None, layout="contiguous", return_lse=False
):
    """:func:`attnkit.sparse_query_attention` of a sequence split over the ranks of ``group``.

    Args:
        q: this rank's shard ``[B, n, Hq, D]``; k, v: ``[B, n, Hkv, D]`` (the same rows). Every rank
            holds n rows, in the given ``layout`` (see :func:`shard_sequence`); Hq and Hkv divide one
            another, with the head mapping of :func:`attnkit.sparse_query_attention`.
        group: the process group (default: the default group).
        causal: causal mask over global positions (query and key sequences are the same sequence).
        scale: softmax scale, default ``D ** -0.5``.
        layout: ``"contiguous"`` or ``"zigzag"`` (n must then be even); zigzag balances causal work.
        return_lse: also return the float32 lse ``[B, H, n]`` of this rank's rows.

    Returns this rank's rows of the output, ``[B, n, max(Hq, Hkv), D]`` in q's dtype (and the lse).

    The K/V shards travel around the ring with ``batch_isend_irecv``, each transfer overlapping
    the core's work on the shard in hand; partials merge by their lse in float32. The backward
    sends K/V the same way together with float32 dK/dV accumulators. Memory per rank: the local
    shards, two K/V shards and two accumulators in flight, float32 output accumulators. Gradients
    flow to q, k and v.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    if q.dtype not in _FLOAT:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    _check_same("k", k, q)
    _check_same("v", v, q)
    B, n, Hq, D = q.shape
    if k.shape[0] != B or k.shape[1] != n:
        raise ValueError(
            f"k must have q's batch size and shard length ({B}, {n}) (one sequence, split alike), got "
            f"{tuple(k.shape[:2])}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"k must have the head dim of q ({D}), got {k.shape[3]}")
    Hkv = k.shape[2]
    if D == 0 or Hq == 0 or Hkv == 0:
        raise ValueError(f"q and k need non-zero heads and head dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hq % Hkv != 0 and Hkv % Hq != 0:
        raise ValueError(f"the head counts of q ({Hq}) and k ({Hkv}) must divide one another")
    if n == 0:
        raise ValueError("q must hold at least one row of the sequence")
    causal = _check_bool("causal", causal)
    return_lse = _check_bool("return_lse", return_lse)
    layout = check_layout(layout)
    scale = _check_scale(scale, D**-0.5)
    if layout == "zigzag" and n % 2 != 0:
        raise ValueError(f"q has {n} rows; a zigzag shard holds two equal chunks, so it must be even")
    if q.device.type == "cuda":
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"q must be float16 or bfloat16 on CUDA, got {q.dtype}")
        if D not in (32, 64, 96, 128, 256):
            raise ValueError(f"q has head dim {D}; on CUDA the supported head dims are (32, 64, 96, 128, 256)")
    rank, world = group_rank_size(group)
    q, k, v = (_contig_last(t) for t in (q, k, v))
    out, lse = _ring.RingSQA.apply(q, k, v, group, rank, world, causal, scale, layout)
    return (out, lse) if return_lse else out


def ring_sqa_comm_bytes(B, n, Hkv, D, world, dtype, *, backward=False):
    """Bytes one rank sends in one call of :func:`ring_sparse_query_attention` (P2P only).

    Forward: W - 1 hops of one K/V shard, 2 B n Hkv D e bytes each (e = element size).
    Backward: W - 1 hops of K/V again plus W hops of the float32 (float64 for float64 inputs)
    dK/dV accumulators, 2 B n Hkv D 4 bytes each. The layout and the causal mask change the work,
    not the traffic.
    """
    e = torch.empty((), dtype=dtype).element_size()
    shard = 2 * B * n * Hkv * D
    fwd = (world - 1) * shard * e
    if not backward:
        return fwd
    acc = 8 if dtype == torch.float64 else 4
    return fwd + (world - 1) * shard * e + (world if world > 1 else 0) * shard * acc


# ------------------------------------------------------------------------------------------------
# Lightning attention by state passing
# ------------------------------------------------------------------------------------------------


def lightning_attention_cp(
    q, k, v, slopes, *, group=None, scale=1.0, initial_state=None, output_final_state=False
):
    """:func:`attnkit.lightning_attention` of a sequence split in contiguous shards over ``group``.

    Args:
        q, k: this rank's rows ``[B, n, H, Dk]``; v: ``[B, n, H, Dv]``. Rank r holds rows
            [r n, (r + 1) n) (the ``"contiguous"`` layout; every rank the same n).
        slopes: ``[H]`` decay rates (lambda_h = exp(-slopes[h])), the same on every rank.
        scale: as in :func:`attnkit.lightning_attention`.
        initial_state: ``[B, H, Dk, Dv]``, the state before the first row of rank 0; pass the same
            tensor on every rank (or None for zeros).
        output_final_state: also return the state after the last row of the last rank, on every rank.

    Returns ``(o, final_state)``: o ``[B, n, H, Dv]`` (this rank's rows), final_state float32
    (float64 for float64 inputs) ``[B, H, Dk, Dv]`` or None.

    Communication: one all-gather of the ranks' ``[B, H, Dk, Dv]`` state contributions forward, one
    of two such tensors per rank backward; never q, k or v. Gradients flow to q, k, v, slopes and
    initial_state. The loss is taken as the sum of the ranks' losses (as in data parallelism):
    the final state's gradient on each rank is that rank's share, and the replicated inputs
    (slopes, initial_state) receive this rank's share of their gradient; summing them over the
    group (as DDP does for parameters) gives the full gradient.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    if q.dtype not in _FLOAT:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    _check_same("k", k, q)
    _check_same("v", v, q)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, n, H, Dv] with B, n, H of q {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    B, n, H, Dk = q.shape
    Dv = v.shape[3]
    _check_tensor("slopes", slopes, 1)
    if not slopes.is_floating_point():
        raise TypeError(f"slopes must be a floating-point tensor, got {slopes.dtype}")
    if slopes.shape[0] != H:
        raise ValueError(f"slopes must have shape [H] = [{H}], got {tuple(slopes.shape)}")
    if slopes.device != q.device:
        raise ValueError(f"slopes must be on the device of q ({q.device}), got {slopes.device}")
    if scale is None:
        raise TypeError("scale must be a float, got NoneType")
    scale = _check_scale(scale, 1.0)
    output_final_state = _check_bool("output_final_state", output_final_state)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4)
        if tuple(initial_state.shape) != (B, H, Dk, Dv):
            raise ValueError(
                f"initial_state must have shape [B, H, Dk, Dv] = {[B, H, Dk, Dv]}, got {tuple(initial_state.shape)}"
            )
        if not initial_state.is_floating_point():
            raise TypeError(f"initial_state must be a floating-point tensor, got {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state must be on the device of q ({q.device}), got {initial_state.device}")
        initial_state = initial_state.to(acc)
    rank, world = group_rank_size(group)
    s = slopes.to(acc)
    s_local = _lightning.local_state(k, v, s, acc)
    decay = torch.exp(-s * n)  # a = lambda^n
    s_in, final = _lightning.StatePass.apply(s_local, decay, initial_state, group, rank, world)
    # S_in is always handed to the kernel (zeros on rank 0 without an initial state): every rank's
    # backward then reaches the state pass, whose backward is a collective.
    o, _ = attnkit.lightning_attention(q, k, v, slopes, scale=scale, initial_state=s_in)
    return o, (final if output_final_state else None)


def lightning_cp_comm_bytes(B, H, Dk, Dv, world, dtype, *, backward=False):
    """Bytes one rank sends in one call of :func:`lightning_attention_cp`, with ring all-gathers.

    Forward: an all-gather of one float32 (float64 for float64 inputs) ``[B, H, Dk, Dv]`` state,
    (W - 1) B H Dk Dv 4 bytes; backward: an all-gather of two, twice that. Independent of n.
    """
    e = 8 if dtype == torch.float64 else 4
    state = B * H * Dk * Dv * e
    return (world - 1) * state * (3 if backward else 1)
