"""Process-group helpers shared by the context-parallel ops: group lookup, the ring exchange
(asynchronous point-to-point through ``torch.distributed.batch_isend_irecv``) and a byte counter.

Every call goes through ``torch.distributed`` attributes looked up at call time, so
:class:`CommCounter` can wrap them (``isend`` / ``irecv`` themselves are left alone: ``P2POp``
accepts only the originals).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_rank_size(group) -> tuple[int, int]:
    """(rank in ``group``, size of ``group``); a clear error without an initialised process group."""
    if not dist.is_available():
        raise RuntimeError("attnkit.distributed needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(
            "attnkit.distributed needs an initialised process group: call "
            "torch.distributed.init_process_group (torchrun sets up the environment for it)"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


class Ring:
    """Each rank sends to rank + 1 and receives from rank - 1 (ranks of ``group``, modulo its size)."""

    def __init__(self, group, rank: int, world: int):
        self.group = group
        self.next = (rank + 1) % world
        self.prev = (rank - 1) % world

    def start(self, send: torch.Tensor, tag: int = 0):
        """Start sending ``send`` to the next rank and receiving the previous rank's tensor of the same
        shape and dtype. ``send`` must stay untouched until :meth:`wait` returns. Transfers of
        different streams that may be in flight together use different ``tag`` s."""
        send = send.contiguous()
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, group=self.group, tag=tag, group_peer=self.next),
            dist.P2POp(dist.irecv, recv, group=self.group, tag=tag, group_peer=self.prev),
        ]
        return recv, dist.batch_isend_irecv(ops), send

    @staticmethod
    def wait(handle) -> torch.Tensor:
        recv, works, _send = handle
        for w in works:
            w.wait()
        return recv


def all_gather(t: torch.Tensor, group, world: int) -> list[torch.Tensor]:
    """Plain (not differentiable) all-gather of one tensor per rank, in rank order."""
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return out


class CommCounter:
    """Counts the bytes this rank hands to ``torch.distributed`` while the context is open.

    It wraps ``torch.distributed.batch_isend_irecv`` (bytes of every ``isend`` in the batch),
    ``all_gather``, ``all_gather_into_tensor``, ``all_reduce`` and
    ``reduce_scatter_tensor``. Point-to-point sends are counted exactly (``p2p_bytes``). For a
    collective the bytes a rank sends depend on the backend's algorithm; ``sent_bytes`` models them
    with the ring algorithms: an all-gather of an m-byte contribution sends (W - 1) m, an all-reduce
    of m bytes 2 (W - 1) m / W, a reduce-scatter of m bytes (W - 1) m / W. ``collectives`` lists
    ``(name, bytes of this rank's contribution, group size)``. Counting, not timing: nothing here is
    measured with a clock.
    """

    _WRAPPED = (
        "batch_isend_irecv",
        "all_gather",
        "all_gather_into_tensor",
        "all_reduce",
        "reduce_scatter_tensor",
    )

    def __init__(self):
        self.p2p_bytes = 0
        self.p2p_messages = 0
        self.collectives: list[tuple[str, int, int]] = []
        self._saved = {}

    @property
    def collective_bytes(self) -> float:
        total = 0.0
        for name, m, w in self.collectives:
            if name in ("all_gather", "all_gather_into_tensor"):
                total += (w - 1) * m
            elif name == "all_reduce":
                total += 2 * (w - 1) * m / w
            else:
                total += (w - 1) * m / w
        return total

    @property
    def sent_bytes(self) -> float:
        return self.p2p_bytes + self.collective_bytes

    def _p2p(self, t):
        self.p2p_bytes += t.numel() * t.element_size()
        self.p2p_messages += 1

    def __enter__(self):
        orig = {name: getattr(dist, name) for name in self._WRAPPED}
        self._saved = orig
        counter = self

        def batch_isend_irecv(ops):
            for op in ops:
                if getattr(op.op, "__name__", "") == "isend":
                    counter._p2p(op.tensor)
            return orig["batch_isend_irecv"](ops)

        def _size(kw, a):
            group = kw.get("group", a[0] if a else None)
            return dist.get_world_size(group)

        def all_gather(tensor_list, tensor, *a, **kw):
            counter.collectives.append(("all_gather", tensor.numel() * tensor.element_size(), _size(kw, a)))
            return orig["all_gather"](tensor_list, tensor, *a, **kw)

        def all_gather_into_tensor(out, tensor, *a, **kw):
            counter.collectives.append(
                ("all_gather_into_tensor", tensor.numel() * tensor.element_size(), _size(kw, a))
            )
            return orig["all_gather_into_tensor"](out, tensor, *a, **kw)

        def all_reduce(tensor, *a, **kw):
            group = kw.get("group", a[1] if len(a) > 1 else None)
            counter.collectives.append(
                ("all_reduce", tensor.numel() * tensor.element_size(), dist.get_world_size(group))
            )
            return orig["all_reduce"](tensor, *a, **kw)

        def reduce_scatter_tensor(out, tensor, *a, **kw):
            group = kw.get("group", a[1] if len(a) > 1 else None)
            counter.collectives.append(
                ("reduce_scatter_tensor", tensor.numel() * tensor.element_size(), dist.get_world_size(group))
            )
            return orig["reduce_scatter_tensor"](out, tensor, *a, **kw)

        wrappers = dict(
            batch_isend_irecv=batch_isend_irecv,
            all_gather=all_gather,
            all_gather_into_tensor=all_gather_into_tensor,
            all_reduce=all_reduce,
            reduce_scatter_tensor=reduce_scatter_tensor,
        )
        for name, fn in wrappers.items():
            setattr(dist, name, fn)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved = {}
        return False
