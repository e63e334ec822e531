"""Float64 oracles of routing attention (Routing Transformer, Roy et al. 2020)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# Layout: q, k, v [B, L, H, D]; centroids [H, C, D] (unit norm); index lists [B, H, C, w].

ROUTING_SELF_SCORE = -5e4


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-12)


def routing_scores_ref(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """r[b, h, c, l] = normalize(x[b, l, h]) . centroids[h, c], in float64."""
    xn = _unit(x.double())
    return torch.einsum("blhd,hcd->bhcl", xn, centroids.double())


def routing_topw_ref(scores: torch.Tensor, cluster_size: int) -> torch.Tensor:
    """For every row of scores [..., L]: the `cluster_size` positions with the largest score, ties to the
    lower position, returned sorted by position (int64)."""
    # A stable descending sort keeps equal scores in position order, so ties go to the lower position.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :cluster_size], dim=-1).values


def routing_assign_ref(q, k, centroids, cluster_size, shared_qk=True, key_padding_mask=None):
    """Balanced routing: for cluster c the queries are the `cluster_size` tokens with the largest
    normalize(q).mu_c, the keys those with the largest normalize(k).mu_c. Returns int64 lists
    [B, H, C, cluster_size] sorted by position. shared_qk: keys are normalize(q), so both lists are the same.
    key_padding_mask [B, L] (True = padded): padded tokens score -inf (rank last)."""

    def scores(x):
        s = routing_scores_ref(x, centroids)
        if key_padding_mask is not None:
            s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return s

    q_idx = routing_topw_ref(scores(q), cluster_size)
    if shared_qk:
        return q_idx, q_idx.clone()
    return q_idx, routing_topw_ref(scores(k), cluster_size)


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
