"""Lightning attention over a sequence split in contiguous shards (LASP-2's state all-gather).

With lambda_h = exp(-slopes[h]) and rank r holding rows [r n, (r + 1) n) of the sequence:

- its state contribution S_r = sum_{t<n} lambda^(n-1-t) k_t^T v_t (the state its rows leave behind
  when they start from zero), and a = lambda^n, the decay across one shard;
- the state entering rank r, by Horner over the gathered contributions:
      S_in(0) = initial_state (0 when None),  S_in(j + 1) = a S_in(j) + S_j;
  the final state is S_in(W);
- its output: lightning_attention on its rows with initial_state = S_in(r), which is exact
  (the recurrence is linear in the state).

Backward, the reverse chain over the gathered state gradients (every rank contributes
g_r = dL/dS_in(r) and f_r = dL/dS_in(W) from its own use of the final state):
      A_W = sum_r f_r,   A_j = g_j + a A_{j+1},
so dL/dS_r = A_{r+1}, dL/d initial_state = A_0 and dL/da = sum_j <A_{j+1}, S_in(j)>.
"""

from __future__ import annotations

import torch

from ._comm import all_gather


class StatePass(torch.autograd.Function):
    """(S_r, a, initial_state) -> (S_in(r), S_in(W)), one all-gather each way.

    Replicated inputs (``a`` and ``initial_state``) get this rank's share of the gradient: rank r
    takes the term j = r of dL/da, rank 0 all of dL/d initial_state; the shares sum to the total.
    """

    @staticmethod
    def forward(ctx, s_local, a, initial_state, group, rank, world):
        a4 = a[None, :, None, None]
        states = all_gather(s_local, group, world)
        state = initial_state if initial_state is not None else torch.zeros_like(s_local)
        s_in = None
        for j in range(world):
            if j == rank:
                s_in = state.clone()
            state = a4 * state + states[j]
        ctx.save_for_backward(a, s_in)
        ctx.args = (group, rank, world, initial_state is not None)
        return s_in, state

    @staticmethod
    def backward(ctx, d_in, d_final):
        a, s_in = ctx.saved_tensors
        group, rank, world, has_init = ctx.args
        d_in = torch.zeros_like(s_in) if d_in is None else d_in
        d_final = torch.zeros_like(s_in) if d_final is None else d_final
        grads = all_gather(torch.stack([d_in, d_final]), group, world)
        a4 = a[None, :, None, None]
        adj = sum(g[1] for g in grads)  # A_W
        d_local = None
        for j in range(world - 1, -1, -1):
            if j == rank:
                d_local = adj  # A_{rank+1}
            adj = grads[j][0] + a4 * adj  # A_j
        d_a = (d_local * s_in).sum(dim=(0, 2, 3)) if ctx.needs_input_grad[1] else None
        d_init = None
        if has_init and ctx.needs_input_grad[2]:
            d_init = adj if rank == 0 else torch.zeros_like(adj)
        return d_local, d_a, d_init, None, None, None


def local_state(k, v, slopes_acc, acc):
    """S = sum_t lambda^(n-1-t) k_t^T v_t over this shard's rows: [B, H, Dk, Dv] in ``acc``."""
    n = k.shape[1]
    age = torch.arange(n - 1, -1, -1, device=k.device, dtype=acc)  # n-1-t
    w = torch.exp(-age[:, None] * slopes_acc[None, :])  # [n, H]
    return torch.einsum("bthd,bthe->bhde", k.to(acc) * w[None, :, :, None], v.to(acc))
