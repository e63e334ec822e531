"""Float64 oracles of Dynamic Mask Attention: the dense top-keep mask and dense attention with it."""

from __future__ import annotations

import math

import torch


def _repeat_heads(x, n_out, dim):
    """Maps a head dim of size 1, n_out or a divisor of n_out to n_out heads (head h reads h // group)."""
    n = x.shape[dim]
    if n == n_out or n == 1:
        return x
    return x.repeat_interleave(n_out // n, dim=dim)


def _visible(lq, lk, causal, device):
    """[Lq, Lk] bool: key j visible to query row i (bottom-right aligned causal mask)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    if causal:
        return j <= i + (lk - lq)
    return torch.ones(lq, lk, dtype=torch.bool, device=device)


def dynamic_mask_dense(bias, keep, lq, causal):
    """Dense DMA mask, [B, Hkv, Lq, Lk] bool (for tests only: L x L memory).

    Row i keeps its visible keys when it has at most ``keep`` of them, else the ``keep`` visible keys
    with the largest bias, ties going to the lower key index. NaN biases are never kept.
    """
    b, h, lk = bias.shape
    x = bias.double() + 0.0  # -0.0 -> +0.0: they compare equal
    vis = _visible(lq, lk, causal, bias.device)  # [Lq, Lk]
    if lk == 0 or lq == 0:
        return vis.expand(b, h, lq, lk).clone()
    # Position of each key in the order (bias desc, index asc); NaN sorts last in ascending -x.
    order = torch.sort(-x, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(lk, device=bias.device).expand(b, h, lk))
    big = lk + 1
    r = torch.where(vis, rank[:, :, None, :], torch.full((), big, device=bias.device))  # [B, H, Lq, Lk]
    kk = min(keep, lk)
    kth = torch.kthvalue(r, kk, dim=-1).values  # keep-th smallest visible rank per row
    n_vis = vis.sum(-1)  # [Lq]
    keep_all = (n_vis <= keep)[None, None, :, None]
    kept = vis & (keep_all | (r <= kth[..., None]))
    return kept & ~torch.isnan(x)[:, :, None, :]


def _dense_attention(q, k, v, bias4, allowed4, scale):
    """Softmax attention over allowed keys. q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], bias4 / allowed4
    broadcastable to [B, Hout, Lq, Lk] (heads already mapped). Rows with nothing allowed (or only -inf
    scores) output 0 with lse -inf; no NaN in values or gradients."""
    hout = max(q.shape[2], k.shape[2])
    qh = _repeat_heads(q, hout, 2).transpose(1, 2)  # [B, Hout, Lq, D]
    kh = _repeat_heads(k, hout, 2).transpose(1, 2)
    vh = _repeat_heads(v, hout, 2).transpose(1, 2)
    s = scale * (qh @ kh.transpose(-1, -2))
    if bias4 is not None:
        s = s + bias4
    neg_inf = torch.full((), float("-inf"), dtype=s.dtype, device=s.device)
    s = torch.where(allowed4, s, neg_inf)
    # with no key at all (Lk = 0) the row statistics still have one column (s[..., :1] would have none)
    m = s.amax(dim=-1, keepdim=True).detach() if s.shape[-1] > 0 else s.new_zeros(s.shape[:-1] + (1,))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    pos = l > 0
    p = e / torch.where(pos, l, torch.ones_like(l))
    out = (p @ vh).transpose(1, 2)  # [B, Lq, Hout, D]
    lse = torch.where(pos, m + torch.log(torch.where(pos, l, torch.ones_like(l))), neg_inf)
    return out, lse.squeeze(-1)


def dynamic_mask_attention(q, k, v, bias, *, keep, causal=True, scale=None):
    """DMA from its definition, in the dtype of q: returns (out [B, Lq, Hout, D], lse [B, Hout, Lq]).

    The mask comes from ``dynamic_mask_dense`` (selection on the bias values; no gradient); the bias
    of KV head g is added to the scores of the query heads mapped to g."""
    lq, hout = q.shape[1], max(q.shape[2], k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    kept = dynamic_mask_dense(bias.detach(), keep, lq, causal)  # [B, Hkv, Lq, Lk]
    kept = _repeat_heads(kept, hout, 1)
    b4 = _repeat_heads(bias.to(q.dtype)[:, :, None, :], hout, 1)
    return _dense_attention(q, k, v, b4, kept, scale)


def masked_bias_attention(q, k, v, *, attn_mask=None, attn_bias=None, causal=False, scale=None):
    """Dense attention with a boolean mask and an additive bias broadcastable to [B, H|Hkv|1, Lq|1, Lk]
    (head h of the output reads head h // (Hout / n) of a tensor with n heads), in the dtype of q."""
    lq, lk, hout = q.shape[1], k.shape[1], max(q.shape[2], k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale

    def to4(x):
        while x.dim() < 4:
            x = x.unsqueeze(0)
        return _repeat_heads(x, hout, 1)

    allowed = _visible(lq, lk, causal, q.device)[None, None]
    if attn_mask is not None:
        allowed = allowed & to4(attn_mask)
    b4 = to4(attn_bias).to(q.dtype) if attn_bias is not None else None
    return _dense_attention(q, k, v, b4, allowed, scale)
