"""Plain-PyTorch float64 implementations of every attnkit op, written from the papers' formulas and
independent of the kernels. They are the test oracle (and a readable statement of the semantics),
not fast paths. One section per op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# Sparse Query Attention
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Routing attention (Routing Transformer, Roy et al. 2020)
# ------------------------------------------------------------------------------------------------
# Layout: q, k, v [B, L, H, D]; centroids [H, C, D] (unit norm); index lists [B, H, C, w].

ROUTING_SELF_SCORE = -5e4


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-12)


def routing_scores_ref(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """r[b, h, c, l] = normalize(x[b, l, h]) . centroids[h, c], in float64."""
    xn = _unit(x.double())
    return torch.einsum("blhd,hcd->bhcl", xn, centroids.double())


def routing_topw_ref(scores: torch.Tensor, window: int) -> torch.Tensor:
    """For every row of scores [..., L]: the `window` positions with the largest score, ties to the
    lower position, returned sorted by position (int64)."""
    # A stable descending sort keeps equal scores in position order, so ties go to the lower position.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :window], dim=-1).values


def routing_assign_ref(q, k, centroids, window, shared_qk=True, key_padding_mask=None):
    """Balanced routing: for cluster c the queries are the `window` tokens with the largest
    normalize(q).mu_c, the keys those with the largest normalize(k).mu_c. Returns int64 lists
    [B, H, C, window] sorted by position. shared_qk: keys are normalize(q), so both lists are the same.
    key_padding_mask [B, L] (True = padded): padded tokens score -inf (rank last)."""

    def scores(x):
        s = routing_scores_ref(x, centroids)
        if key_padding_mask is not None:
            s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return s

    q_idx = routing_topw_ref(scores(q), window)
    if shared_qk:
        return q_idx, q_idx.clone()
    return q_idx, routing_topw_ref(scores(k), window)


def routing_membership_ref(idx: torch.Tensor, L: int) -> torch.Tensor:
    """Dense membership [B, H, C, L] bool: token l is in cluster c's list."""
    B, H, C, _ = idx.shape
    m = torch.zeros(B, H, C, L, dtype=torch.bool, device=idx.device)
    m.scatter_(-1, idx.long(), True)
    return m


def routing_attention_ref(q, k, v, q_idx, k_idx, causal=True, shared_qk=True, scale=None,
                          window_left=-1, key_padding_mask=None, dtype=torch.float64):
    """Routing attention with dense masks (O(C L^2) memory per head: tests only).

    For every cluster c a dense [L, L] mask says which (query token, key token) pairs interact:
    query token i in c's query list, key token j in c's key list, j <= i when causal,
    j >= i - window_left when window_left >= 0. Scores scale * q_i.k_j; with shared_qk the score of
    i == j is ROUTING_SELF_SCORE. Softmax over the visible keys (a query with none gets 0). The
    output of a token is the mean of its outputs over the clusters whose query list holds it, 0 when
    there are none. Computed in `dtype` (float64 for the oracle; the tests also run it at the
    kernel's dtype for the error baseline).
    """
    B, L, H, D = q.shape
    if k is None:
        k = _unit(q)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qd, kd, vd = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    in_q = routing_membership_ref(q_idx, L)
    in_k = routing_membership_ref(k_idx, L)
    if key_padding_mask is not None:
        in_k = in_k & ~key_padding_mask[:, None, None, :]
    pos = torch.arange(L, device=q.device)
    allowed = torch.ones(L, L, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
    if window_left >= 0:
        allowed &= pos[None, :] >= pos[:, None] - window_left
    eye = torch.eye(L, dtype=torch.bool, device=q.device)
    s = torch.matmul(qd, kd.transpose(-1, -2)) * scale  # [B, H, L, L]
    if shared_qk:
        s = s.masked_fill(eye, ROUTING_SELF_SCORE)
    acc = torch.zeros_like(qd)
    cnt = in_q.sum(2).to(dtype)  # [B, H, L]
    for c in range(q_idx.shape[2]):
        mask = in_q[:, :, c, :, None] & in_k[:, :, c, None, :] & allowed  # [B, H, L, L]
        sc = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(sc, dim=-1)
        p = torch.where(mask.any(-1, keepdim=True), p, torch.zeros_like(p))  # rows with no key: 0
        acc = acc + torch.matmul(p, vd) * in_q[:, :, c, :, None]
    out = torch.where(cnt[..., None] > 0, acc / cnt.clamp(min=1)[..., None], torch.zeros_like(acc))
    return out.transpose(1, 2)


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


def kmeans_assign_ref(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Cluster of each vector x[..., h, :]: argmax_c normalize(x).mu[h, c] (first maximum)."""
    xn = _unit(x.double())
    sim = torch.einsum("...hd,hcd->...hc", xn, centroids.double())
    return sim.argmax(-1)


def kmeans_ema_update_ref(centroids: torch.Tensor, x: torch.Tensor, decay: float,
                          assign: torch.Tensor | None = None) -> torch.Tensor:
    """One online k-means step (returns the new centroids, float64):
    new_mean_c = normalize(sum of the normalised vectors assigned to c / count);
    mu_c <- normalize(decay * mu_c + (1 - decay) * new_mean_c); clusters that got nothing keep mu_c."""
    H, C, D = centroids.shape
    xn = _unit(x.double()).reshape(-1, H, D)
    a = kmeans_assign_ref(x, centroids) if assign is None else assign
    a = a.reshape(-1, H).long()
    mu = centroids.double().clone()
    for h in range(H):
        for c in range(C):
            sel = xn[a[:, h] == c, h]
            if sel.shape[0] == 0:
                continue
            mean = _unit(sel.sum(0) / sel.shape[0])
            mu[h, c] = _unit(decay * mu[h, c] + (1 - decay) * mean)
    return mu


def routing_commitment_loss_ref(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """mean over vectors of || normalize(x) - mu_assigned ||^2 (float64, no commitment weight)."""
    H, C, D = centroids.shape
    xn = _unit(x.double()).reshape(-1, H, D)
    a = kmeans_assign_ref(x, centroids).reshape(-1, H)
    mu = centroids.double()[torch.arange(H)[None, :], a]  # [N, H, D]
    return ((xn - mu) ** 2).sum(-1).mean()
# =================================================================================================
# Dynamic Mask Attention (DMA)
# =================================================================================================
import math as _math

import torch as _torch


def _dma_repeat_heads(x, n_out, dim):
    """Maps a head dim of size 1, n_out or a divisor of n_out to n_out heads (head h reads h // group)."""
    n = x.shape[dim]
    if n == n_out or n == 1:
        return x
    return x.repeat_interleave(n_out // n, dim=dim)


def _dma_visible(lq, lk, causal, device):
    """[Lq, Lk] bool: key j visible to query row i (bottom-right aligned causal mask)."""
    i = _torch.arange(lq, device=device)[:, None]
    j = _torch.arange(lk, device=device)[None, :]
    if causal:
        return j <= i + (lk - lq)
    return _torch.ones(lq, lk, dtype=_torch.bool, device=device)


def dynamic_mask_dense(bias, keep, lq, causal):
    """Dense DMA mask, [B, Hkv, Lq, Lk] bool (for tests only: L x L memory).

    Row i keeps its visible keys when it has at most ``keep`` of them, else the ``keep`` visible keys
    with the largest bias, ties going to the lower key index. NaN biases are never kept.
    """
    b, h, lk = bias.shape
    x = bias.double() + 0.0  # -0.0 -> +0.0: they compare equal
    vis = _dma_visible(lq, lk, causal, bias.device)  # [Lq, Lk]
    if lk == 0 or lq == 0:
        return vis.expand(b, h, lq, lk).clone()
    # Position of each key in the order (bias desc, index asc); NaN sorts last in ascending -x.
    order = _torch.sort(-x, dim=-1, stable=True).indices
    rank = _torch.empty_like(order)
    rank.scatter_(-1, order, _torch.arange(lk, device=bias.device).expand(b, h, lk))
    big = lk + 1
    r = _torch.where(vis, rank[:, :, None, :], _torch.full((), big, device=bias.device))  # [B, H, Lq, Lk]
    kk = min(keep, lk)
    kth = _torch.kthvalue(r, kk, dim=-1).values  # keep-th smallest visible rank per row
    n_vis = vis.sum(-1)  # [Lq]
    keep_all = (n_vis <= keep)[None, None, :, None]
    kept = vis & (keep_all | (r <= kth[..., None]))
    return kept & ~_torch.isnan(x)[:, :, None, :]


def _dma_dense_attention(q, k, v, bias4, allowed4, scale):
    """Softmax attention over allowed keys. q [B, Lq, Hq, D], k/v [B, Lk, Hkv, D], bias4 / allowed4
    broadcastable to [B, Hout, Lq, Lk] (heads already mapped). Rows with nothing allowed (or only -inf
    scores) output 0 with lse -inf; no NaN in values or gradients."""
    hout = max(q.shape[2], k.shape[2])
    qh = _dma_repeat_heads(q, hout, 2).transpose(1, 2)  # [B, Hout, Lq, D]
    kh = _dma_repeat_heads(k, hout, 2).transpose(1, 2)
    vh = _dma_repeat_heads(v, hout, 2).transpose(1, 2)
    s = scale * (qh @ kh.transpose(-1, -2))
    if bias4 is not None:
        s = s + bias4
    neg_inf = _torch.full((), float("-inf"), dtype=s.dtype, device=s.device)
    s = _torch.where(allowed4, s, neg_inf)
    m = s.amax(dim=-1, keepdim=True).detach() if s.shape[-1] > 0 else _torch.zeros_like(s[..., :1])
    m = _torch.where(_torch.isfinite(m), m, _torch.zeros_like(m))
    e = _torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    pos = l > 0
    p = e / _torch.where(pos, l, _torch.ones_like(l))
    out = (p @ vh).transpose(1, 2)  # [B, Lq, Hout, D]
    lse = _torch.where(pos, m + _torch.log(_torch.where(pos, l, _torch.ones_like(l))), neg_inf)
    return out, lse.squeeze(-1)


def dynamic_mask_attention(q, k, v, bias, *, keep, causal=True, scale=None):
    """DMA from its definition, in the dtype of q: returns (out [B, Lq, Hout, D], lse [B, Hout, Lq]).

    The mask comes from ``dynamic_mask_dense`` (selection on the bias values; no gradient); the bias
    of KV head g is added to the scores of the query heads mapped to g."""
    lq, hout = q.shape[1], max(q.shape[2], k.shape[2])
    scale = 1.0 / _math.sqrt(q.shape[3]) if scale is None else scale
    kept = dynamic_mask_dense(bias.detach(), keep, lq, causal)  # [B, Hkv, Lq, Lk]
    kept = _dma_repeat_heads(kept, hout, 1)
    b4 = _dma_repeat_heads(bias.to(q.dtype)[:, :, None, :], hout, 1)
    return _dma_dense_attention(q, k, v, b4, kept, scale)


def masked_bias_attention(q, k, v, *, attn_mask=None, attn_bias=None, causal=False, scale=None):
    """Dense attention with a boolean mask and an additive bias broadcastable to [B, H|Hkv|1, Lq|1, Lk]
    (head h of the output reads head h // (Hout / n) of a tensor with n heads), in the dtype of q."""
    lq, lk, hout = q.shape[1], k.shape[1], max(q.shape[2], k.shape[2])
    scale = 1.0 / _math.sqrt(q.shape[3]) if scale is None else scale

    def to4(x):
        while x.dim() < 4:
            x = x.unsqueeze(0)
        return _dma_repeat_heads(x, hout, 1)

    allowed = _dma_visible(lq, lk, causal, q.device)[None, None]
    if attn_mask is not None:
        allowed = allowed & to4(attn_mask)
    b4 = to4(attn_bias).to(q.dtype) if attn_bias is not None else None
    return _dma_dense_attention(q, k, v, b4, allowed, scale)


# ------------------------------------------------------------------------------------------------
# Lightning attention (TransNormerLLM): causal linear attention with a per-head exponential decay
# ------------------------------------------------------------------------------------------------


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
