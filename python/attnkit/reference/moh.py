"""Float64 oracle of Mixture-of-Head attention (Jin et al. 2024, "MoH: Multi-Head Attention as
Mixture-of-Head Attention"): every head computed densely, then gated by the router's selection."""

from __future__ import annotations

import torch


def moh_gate_dense(head_idx: torch.Tensor, head_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The dense gate ``g [B, L, Hq]`` (float64): ``g[b, t, h] = w`` when token t selected head h with
    weight w (slot -1: nothing), else 0. Differentiable in ``head_weight``."""
    B, L, K = head_idx.shape
    idx = head_idx.long()
    valid = idx >= 0
    w = torch.where(valid, head_weight.double(), torch.zeros((), dtype=torch.float64, device=head_weight.device))
    g = torch.zeros(B, L, num_heads + 1, dtype=torch.float64, device=head_weight.device)
    # empty slots land in an extra column that is dropped
    g = g.scatter_add(2, torch.where(valid, idx, torch.full_like(idx, num_heads)), w)
    return g[..., :num_heads]


def mixture_of_heads_attention_ref(q, k, v, head_idx, head_weight, causal=True, scale=None, return_lse=False):
    """Mixture-of-Head attention in float64, dense: every head computed, then gated.

    q ``[B, L, Hq, D]``, k and v ``[B, L, Hkv, D]`` (query head h reads KV head ``h // (Hq / Hkv)``).
    For token t and head h: ``o[t, h] = softmax_j(scale * q[t, h] . k[j, h']) v[j, h']`` over keys
    ``j <= t`` (``causal``) or all keys; ``out[t, h] = g[t, h] * o[t, h]`` with g from
    :func:`moh_gate_dense` (0 for heads the token did not select). With ``return_lse`` also
    ``lse [B, Hq, L]``: the head's log-sum-exp where selected, ``-inf`` elsewhere.
    """
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    if scale is None:
        scale = D**-0.5
    grp = Hq // Hkv
    kx = k.double().repeat_interleave(grp, dim=2)
    vx = v.double().repeat_interleave(grp, dim=2)
    s = scale * torch.einsum("bihd,bjhd->bhij", q.double(), kx)
    if causal:
        mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, Hq, L]
    o = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, dim=-1), vx)
    g = moh_gate_dense(head_idx, head_weight, Hq)
    out = o * g.unsqueeze(-1)
    if not return_lse:
        return out
    sel = moh_gate_dense(head_idx, torch.ones_like(head_weight, dtype=torch.float64), Hq) > 0
    lse = torch.where(sel.transpose(1, 2), lse, torch.full_like(lse, float("-inf")))
    return out, lse
