"""Float64 oracle of Sparse Query Attention, written from the paper's definition."""

from __future__ import annotations

import math

import torch


def sqa_head_mapping(num_query_heads: int, num_kv_heads: int) -> tuple[list[int], list[int]]:
    """For each output head h (there are max(Hq, Hkv)), the query head and the KV head it reads.

    More query heads (Hq % Hkv == 0): output head h = query head h, KV head h // (Hq / Hkv).
    More KV heads (Hkv % Hq == 0, reverse SQA): output head h = KV head h, query head h // (Hkv / Hq).
    """
    hq, hkv = num_query_heads, num_kv_heads
    if hq % hkv != 0 and hkv % hq != 0:
        raise ValueError(f"head counts {hq} and {hkv} must divide one another")
    if hq >= hkv:
        group = hq // hkv
        return list(range(hq)), [h // group for h in range(hq)]
    group = hkv // hq
    return [h // group for h in range(hkv)], list(range(hkv))


def sqa_reference(q, k, v, causal=False, scale=None, return_lse=False):
    """Sparse Query Attention in float64.

    q ``[B, Lq, Hq, D]``, k and v ``[B, Lk, Hkv, D]``. For output head h with query head a(h) and
    KV head g(h) (see :func:`sqa_head_mapping`) and query row i:

        s_ij = scale * q[b, i, a(h)] . k[b, j, g(h)]      for visible keys j
        out[b, i, h] = sum_j softmax_j(s_ij) v[b, j, g(h)]

    Key j is visible unless ``causal`` and ``j > i + (Lk - Lq)`` (bottom-right alignment). A row
    with no visible key outputs 0 (lse = -inf). Returns float64 ``out`` ``[B, Lq, H, D]`` and, with
    ``return_lse``, ``lse`` ``[B, H, Lq]`` (natural log).
    """
    B, Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    if scale is None:
        scale = D**-0.5
    qh, kh = sqa_head_mapping(Hq, Hkv)
    dev = q.device
    # Gather each output head's query head and KV head: [B, L, H, D].
    qx = q.double().index_select(2, torch.tensor(qh, dtype=torch.long, device=dev))
    kx = k.double().index_select(2, torch.tensor(kh, dtype=torch.long, device=dev))
    vx = v.double().index_select(2, torch.tensor(kh, dtype=torch.long, device=dev))
    s = scale * torch.einsum("bihd,bjhd->bhij", qx, kx)  # [B, H, Lq, Lk]
    if causal:
        i = torch.arange(Lq, device=dev).unsqueeze(1)
        j = torch.arange(Lk, device=dev).unsqueeze(0)
        s = s.masked_fill(j > i + (Lk - Lq), float("-inf"))
    # Rows without a visible key: compute on zeros (keeps autograd free of inf - inf), then give
    # them p = 0 and lse = -inf.
    seen = torch.isfinite(s).any(dim=-1, keepdim=True)
    s_safe = torch.where(seen, s, 0.0)
    lse = torch.logsumexp(s_safe, dim=-1, keepdim=True)
    p = torch.where(seen, torch.exp(s_safe - lse), 0.0)
    out = torch.einsum("bhij,bjhd->bihd", p, vx)
    lse = torch.where(seen, lse, float("-inf")).squeeze(-1)  # [B, H, Lq]
    return (out, lse) if return_lse else out

def full_attention_ref(q, k, v, causal=False, scale=None, dtype=torch.float64):
    """Plain softmax attention, [B, L, H, D] layout."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qd, kd, vd = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    s = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    if causal:
        L = q.shape[1]
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.matmul(torch.softmax(s, -1), vd).transpose(1, 2)
