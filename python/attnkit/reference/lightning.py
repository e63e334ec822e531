"""Float64 oracles of lightning attention (TransNormerLLM): the step-by-step recurrence."""

from __future__ import annotations

import math

import torch


def lightning_slopes_reference(num_heads: int, layer_idx: int | None = None, num_layers: int | None = None):
    """ALiBi's head slopes as TransNormerLLM uses them, as a list of Python floats.

    For H a power of two the slopes are the geometric sequence 2^(-8/H), 2^(-16/H), ..., 2^(-8);
    otherwise (ALiBi's rule) the slopes of the largest power of two p < H, followed by every other
    slope of the 2p sequence (its 1st, 3rd, ...) until there are H. With ``layer_idx`` given each slope
    is multiplied by 1 - layer_idx / (num_layers - 1) + 1e-5 (with num_layers = 1, by 1 + 1e-5), so the
    decay fades towards the last layer.
    """

    def geometric(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    n = num_heads
    if n & (n - 1) == 0:
        slopes = geometric(n)
    else:
        p = 2 ** int(math.floor(math.log2(n)))
        slopes = geometric(p) + geometric(2 * p)[0::2][: n - p]
    if layer_idx is not None:
        frac = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
        slopes = [s * (1.0 - frac + 1e-5) for s in slopes]
    return slopes


def _lightning_recurrence(q, k, v, lam, scale, state):
    """One sequence, straight from the state equations. q, k [L, H, Dk], v [L, H, Dv], lam [H],
    state [H, Dk, Dv]; every tensor already in the computation dtype."""
    outs = []
    for t in range(q.shape[0]):
        # S_t = lambda * S_{t-1} + k_t^T v_t
        state = lam[:, None, None] * state + k[t][:, :, None] * v[t][:, None, :]
        # o_t = scale * q_t S_t
        outs.append(scale * torch.einsum("hd,hde->he", q[t], state))
    o = torch.stack(outs) if outs else v.new_zeros((0,) + tuple(v.shape[1:]))
    return o, state


def lightning_attention_reference(
    q, k, v, slopes, scale=1.0, initial_state=None, cu_seqlens=None, dtype=torch.float64, state_dtype=None
):
    """Lightning attention by its recurrence, in ``dtype`` (float64 by default).

    Per batch b (or sequence of ``cu_seqlens``) and head h, with lambda_h = exp(-slopes[h]):

        S_t = lambda_h * S_{t-1} + k_t^T v_t,   S_{-1} = initial_state[b, h] (0 when None)
        o_t = scale * q_t S_t

    q, k ``[B, L, H, Dk]``, v ``[B, L, H, Dv]``. Returns ``o`` ``[B, L, H, Dv]`` and the final state
    ``[N, H, Dk, Dv]``. ``state_dtype`` (default ``dtype``) is the state's dtype: the products are taken
    there and ``o`` is rounded to ``dtype`` (float32 state with float16 ``dtype`` is what the kernels'
    contract promises at float16). Differentiable with autograd.
    """
    sdt = state_dtype or dtype
    B, L, H, Dk = q.shape
    Dv = v.shape[-1]
    qc, kc, vc = (t.to(dtype).to(sdt) for t in (q, k, v))
    lam = torch.exp(-slopes.to(torch.float64)).to(sdt)
    if cu_seqlens is None:
        bounds = [(b, 0, L) for b in range(B)]
    else:
        cu = [int(x) for x in cu_seqlens.tolist()]
        bounds = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]
    outs = []
    finals = []
    for n, (b, s, e) in enumerate(bounds):
        if initial_state is None:
            init = torch.zeros(H, Dk, Dv, dtype=sdt, device=q.device)
        else:
            init = initial_state[n].to(sdt)
        o, fin = _lightning_recurrence(qc[b, s:e], kc[b, s:e], vc[b, s:e], lam, scale, init)
        outs.append(o)
        finals.append(fin)
    if cu_seqlens is None:
        o = torch.stack(outs) if outs else torch.zeros(B, L, H, Dv, dtype=sdt, device=q.device)
    else:  # sequences tile the rows in order
        o = torch.cat(outs, dim=0)[None] if outs else torch.zeros(1, 0, H, Dv, dtype=sdt, device=q.device)
    final = torch.stack(finals) if finals else torch.zeros(0, H, Dk, Dv, dtype=sdt, device=q.device)
    return o.to(dtype), final


def lightning_attention_decode_reference(q, k, v, state, slopes, scale=1.0, dtype=torch.float64):
    """One step of the recurrence: q, k ``[B, 1, H, Dk]``, v ``[B, 1, H, Dv]``, state ``[B, H, Dk, Dv]``.
    Returns (o ``[B, 1, H, Dv]``, new state), computed in ``dtype``."""
    lam = torch.exp(-slopes.to(torch.float64)).to(dtype)
    q, k, v = (t.to(dtype)[:, 0] for t in (q, k, v))
    new_state = lam[None, :, None, None] * state.to(dtype) + k[..., :, None] * v[..., None, :]
    o = scale * torch.einsum("bhd,bhde->bhe", q, new_state)
    return o[:, None], new_state
