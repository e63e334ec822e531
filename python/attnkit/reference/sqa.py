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


def sqa_reference(q, k, v, causal=False, scale=None, return_lse=False, window_size=(-1, -1)):
    """Sparse Query Attention in float64.

    q ``[B, Lq, Hq, D]``, k and v ``[B, Lk, Hkv, D]``. For output head h with query head a(h) and
    KV head g(h) (see :func:`sqa_head_mapping`) and query row i:

        s_ij = scale * q[b, i, a(h)] . k[b, j, g(h)]      for visible keys j
        out[b, i, h] = sum_j softmax_j(s_ij) v[b, j, g(h)]

    Key j is visible unless ``causal`` and ``j > i + (Lk - Lq)`` (bottom-right alignment), or it
    lies outside ``window_size = (left, right)`` (-1: unbounded): with ``i' = i + Lk - Lq``, key j
    needs ``i' - left <= j <= i' + right``. A row
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
    i = torch.arange(Lq, device=dev).unsqueeze(1) + (Lk - Lq)  # aligned query positions
    j = torch.arange(Lk, device=dev).unsqueeze(0)
    left, right = window_size
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    if left >= 0:
        s = s.masked_fill(j < i - left, float("-inf"))
    if right >= 0:
        s = s.masked_fill(j > i + right, float("-inf"))
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


def sqa_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, scale=None, window_size=(-1, -1),
                         return_lse=False):
    """Packed sequences in float64: sequence b is :func:`sqa_reference` on query rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q ``[total_q, Hq, D]`` and key rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k / v ``[total_k, Hkv, D]``. Rows outside every sequence
    output 0 (lse -inf). Returns ``out`` ``[total_q, H, D]`` and, with ``return_lse``, lse ``[H, total_q]``."""
    H = max(q.shape[1], k.shape[1])
    if scale is None:
        scale = q.shape[-1] ** -0.5
    cq, ck = [int(x) for x in cu_seqlens_q.tolist()], [int(x) for x in cu_seqlens_k.tolist()]
    outs, lses, row = [], [], 0
    for b in range(len(cq) - 1):
        if cq[b] > row:  # rows before this sequence
            outs.append(q.new_zeros((cq[b] - row, H, q.shape[2]), dtype=torch.float64))
            lses.append(torch.full((H, cq[b] - row), float("-inf"), dtype=torch.float64, device=q.device))
        qb = q[cq[b]:cq[b + 1]].unsqueeze(0)
        kb, vb = k[ck[b]:ck[b + 1]].unsqueeze(0), v[ck[b]:ck[b + 1]].unsqueeze(0)
        o, lse = sqa_reference(qb, kb, vb, causal=causal, scale=scale, return_lse=True, window_size=window_size)
        outs.append(o[0])
        lses.append(lse[0])
        row = cq[b + 1]
    if q.shape[0] > row:
        outs.append(q.new_zeros((q.shape[0] - row, H, q.shape[2]), dtype=torch.float64))
        lses.append(torch.full((H, q.shape[0] - row), float("-inf"), dtype=torch.float64, device=q.device))
    out = torch.cat(outs, 0)
    lse = torch.cat(lses, 1)
    return (out, lse) if return_lse else out


def sqa_kvcache_reference(q, k_cache, v_cache, k=None, v=None, cache_seqlens=0, causal=False, scale=None,
                          window_size=(-1, -1), return_lse=False):
    """KV-cache attention in float64, without touching the inputs: batch row b appends k[b], v[b]
    (``[Lnew, Hkv, D]``) after its first ``cache_seqlens[b]`` cached rows and runs :func:`sqa_reference`
    of q[b] against those ``cache_seqlens[b] + Lnew`` keys. Returns ``(out, k_cache', v_cache')`` (the
    appended caches, float64), plus lse when ``return_lse``: out ``[B, Lq, H, D]``, lse ``[B, H, Lq]``."""
    B = q.shape[0]
    if isinstance(cache_seqlens, int):
        cache_seqlens = [cache_seqlens] * B
    else:
        cache_seqlens = [int(x) for x in cache_seqlens.tolist()]
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    lnew = 0 if k is None else k.shape[1]
    outs, lses = [], []
    for b in range(B):
        s = cache_seqlens[b]
        if lnew:
            kc[b, s:s + lnew] = k[b].double()
            vc[b, s:s + lnew] = v[b].double()
        o, lse = sqa_reference(q[b:b + 1], kc[b:b + 1, :s + lnew], vc[b:b + 1, :s + lnew], causal=causal, scale=scale,
                               return_lse=True, window_size=window_size)
        outs.append(o)
        lses.append(lse)
    out, lse = torch.cat(outs, 0), torch.cat(lses, 0)
    return (out, kc, vc, lse) if return_lse else (out, kc, vc)
