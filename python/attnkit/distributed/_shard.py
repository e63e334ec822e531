"""Splitting one sequence over the ranks of a process group, and putting it back together.

Layouts, for a group of W ranks and a sequence dimension of length L:

- ``"contiguous"``: the sequence is cut into W equal chunks; rank r holds chunk r.
- ``"zigzag"``: the sequence is cut into 2W equal chunks; rank r holds chunk r followed by chunk
  2W - 1 - r. Under a causal mask every rank then has the same amount of work.
"""

from __future__ import annotations

import torch

from ._comm import all_gather, group_rank_size

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _check_dim(x: torch.Tensor, dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim()}) for a {x.dim()}-d tensor, got {dim}")
    return dim % x.dim()


def _local_slices(length: int, rank: int, world: int, layout: str) -> list[tuple[int, int]]:
    """(start, length) of the pieces of a length-``length`` sequence that ``rank`` holds, in order."""
    if layout == "contiguous":
        c = length // world
        return [(rank * c, c)]
    c = length // (2 * world)
    return [(rank * c, c), ((2 * world - 1 - rank) * c, c)]


def _check_divisible(length: int, world: int, layout: str, what: str) -> None:
    parts = world if layout == "contiguous" else 2 * world
    if length % parts != 0:
        raise ValueError(
            f"{what} has length {length}, which the {layout!r} layout over {world} ranks cannot split: "
            f"it must be a multiple of {parts}" + (" (2 x the group size)" if layout == "zigzag" else "")
        )


def _take(x: torch.Tensor, dim: int, rank: int, world: int, layout: str) -> torch.Tensor:
    pieces = [x.narrow(dim, s, n) for s, n in _local_slices(x.shape[dim], rank, world, layout)]
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)).contiguous()


def shard_sequence(x, *, group=None, dim=1, layout="contiguous"):
    """This rank's shard of the full tensor ``x`` (the same on every rank) along ``dim``.

    Differentiable: the gradient of ``x`` is this rank's shard's gradient, zero elsewhere (so the
    gradients summed over the ranks are the full gradient).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    dim = _check_dim(x, dim)
    layout = check_layout(layout)
    rank, world = group_rank_size(group)
    _check_divisible(x.shape[dim], world, layout, f"x (dim {dim})")
    return _take(x, dim, rank, world, layout)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, group, dim, layout, rank, world):
        ctx.dims = (group, dim, layout, rank, world)
        parts = all_gather(x_local, group, world)
        if layout == "contiguous":
            return torch.cat(parts, dim)
        half = x_local.shape[dim] // 2
        first = [p.narrow(dim, 0, half) for p in parts]  # chunk j < W comes from rank j
        second = [p.narrow(dim, half, half) for p in reversed(parts)]  # chunk 2W-1-r from rank r
        return torch.cat(first + second, dim)

    @staticmethod
    def backward(ctx, grad):
        _group, dim, layout, rank, world = ctx.dims
        return _take(grad, dim, rank, world, layout), None, None, None, None, None


def unshard_sequence(x_local, *, group=None, dim=1, layout="contiguous"):
    """The full tensor from every rank's shard (all-gather), with the layout undone.

    Every rank must pass a shard of the same shape. Differentiable: the backward hands this rank's
    slice of the gathered tensor's gradient to ``x_local`` (no reduction over ranks), which is right
    when every rank computes the same function of the gathered tensor. Meant for tests, evaluation
    and small tensors: the attention functions of this package never gather q, k or v.
    """
    if not isinstance(x_local, torch.Tensor):
        raise TypeError(f"x_local must be a torch.Tensor, got {type(x_local).__name__}")
    dim = _check_dim(x_local, dim)
    layout = check_layout(layout)
    rank, world = group_rank_size(group)
    if layout == "zigzag" and x_local.shape[dim] % 2 != 0:
        raise ValueError(
            f"x_local has length {x_local.shape[dim]} along dim {dim}; a zigzag shard holds two equal "
            "chunks, so it must be even"
        )
    return _Unshard.apply(x_local, group, dim, layout, rank, world)
