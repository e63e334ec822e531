"""Ring attention over the SQA flash core (``torch.ops.attnkit.sqa_fwd`` / ``sqa_bwd``).

Rank r holds the queries, keys and values of its shard. The K/V shards travel around the ring
(rank r sends to r + 1, receives from r - 1); at step i rank r holds the shard of rank
src = (r - i) mod W, and the transfer of the next shard runs while the core works on this one.

Forward: each step gives a partial output and lse for the rows it touched; partials merge by their
lse in float32 (float64 for float64 inputs):
    lse = log(exp(lse_a) + exp(lse_b)),  out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b.

Backward: with the merged (global) out and lse, ``sqa_bwd`` on one block gives that block's exact
share of dq, dk and dv (the softmax probabilities and rowsum(dout * out) it recomputes are the
global ones). dq accumulates locally; dk and dv accumulate in float32 buffers that travel with
the K/V shard and, after W steps, arrive back at the shard's owner.

Causal blocks (shards of equal length n; the query and key of a pair of chunks compare by their
global positions):
- contiguous: src < r full block, src == r causal diagonal, src > r nothing;
- zigzag (r holds chunks r and 2W-1-r): src == r causal over the local 2 chunks (the local
  order is the global order); src < r all local queries against the first half of the incoming
  keys (chunk src); src > r the second half of the local queries (chunk 2W-1-r) against all the
  incoming keys. Every step other than the first does half a block on every rank.
"""

from __future__ import annotations

import torch

from ._comm import Ring

ALL = slice(None)


def blocks(rank: int, src: int, n: int, causal: bool, layout: str):
    """The (query rows, key rows, causal) sub-blocks rank ``rank`` computes against ``src``'s keys."""
    if not causal:
        return [(ALL, ALL, False)]
    if src == rank:
        return [(ALL, ALL, True)]
    if layout == "contiguous":
        return [(ALL, ALL, False)] if src < rank else []
    half = n // 2
    if src < rank:
        return [(ALL, slice(0, half), False)]
    return [(slice(half, n), ALL, False)]


def _merge(out_acc, lse_acc, rows, out, lse):
    """Fold one partial (out [B, m, H, D], lse [B, H, m]) into the accumulators' ``rows``."""
    acc_dtype = out_acc.dtype
    la = lse_acc[:, :, rows]
    lb = lse.to(acc_dtype)
    new = torch.logaddexp(la, lb)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))  # rows with no key so far
    wa = torch.exp(la - safe).transpose(1, 2).unsqueeze(-1)
    wb = torch.exp(lb - safe).transpose(1, 2).unsqueeze(-1)
    out_acc[:, rows] = out_acc[:, rows] * wa + out.to(acc_dtype) * wb
    lse_acc[:, :, rows] = new


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def ring_forward(q, k, v, group, rank, world, causal, scale, layout):
    B, n, Hq, D = q.shape
    Hkv = k.shape[2]
    H = max(Hq, Hkv)
    acc = _acc_dtype(q.dtype)
    out_acc = torch.zeros(B, n, H, D, dtype=acc, device=q.device)
    lse_acc = torch.full((B, H, n), float("-inf"), dtype=acc, device=q.device)
    ring = Ring(group, rank, world)
    kv = torch.stack([k, v])
    for i in range(world):
        src = (rank - i) % world
        pending = ring.start(kv) if i + 1 < world else None
        for rows, cols, c in blocks(rank, src, n, causal, layout):
            o, lse = torch.ops.attnkit.sqa_fwd(q[:, rows], kv[0][:, cols], kv[1][:, cols], c, scale)
            _merge(out_acc, lse_acc, rows, o, lse)
        if pending is not None:
            kv = ring.wait(pending)
    return out_acc.to(q.dtype), lse_acc.float()


def ring_backward(dout, q, k, v, out, lse, group, rank, world, causal, scale, layout):
    n = q.shape[1]
    acc = _acc_dtype(q.dtype)
    ring = Ring(group, rank, world)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    dkv = None  # accumulator of the K/V shard in hand
    pending_dkv = None
    for i in range(world):
        src = (rank - i) % world
        pending_kv = ring.start(kv) if i + 1 < world else None
        part = torch.zeros(kv.shape, dtype=acc, device=q.device)
        for rows, cols, c in blocks(rank, src, n, causal, layout):
            dq_b, dk_b, dv_b = torch.ops.attnkit.sqa_bwd(
                dout[:, rows], q[:, rows], kv[0][:, cols], kv[1][:, cols], out[:, rows], lse[:, :, rows], c, scale
            )
            dq[:, rows] += dq_b
            part[0][:, cols] += dk_b
            part[1][:, cols] += dv_b
        if pending_dkv is not None:
            dkv = ring.wait(pending_dkv)  # the previous ranks' share for shard src
            dkv += part
        else:
            dkv = part
        if world > 1:
            # Hand the accumulator on with its shard: after the last step it reaches the owner.
            pending_dkv = ring.start(dkv, tag=1)
        if pending_kv is not None:
            kv = ring.wait(pending_kv)
    if pending_dkv is not None:
        dkv = ring.wait(pending_dkv)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingSQA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, rank, world, causal, scale, layout):
        out, lse = ring_forward(q, k, v, group, rank, world, causal, scale, layout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, rank, world, causal, scale, layout)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None
