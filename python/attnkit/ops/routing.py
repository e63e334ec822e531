"""Routing attention (Routing Transformer: online k-means routing, attention inside clusters): the public
functions, fake implementations and autograd formula."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import check_bool, check_float, check_last_dim_contiguous, check_scale, check_tensor

__all__ = [
    "kmeans_assign",
    "kmeans_ema_update_",
    "kmeans_init",
    "routing_assign",
    "routing_attention",
    "routing_commitment_loss",
]


def _check_like_q(name, t, q):
    check_tensor(name, t, 4)
    if t.dtype != q.dtype:
        raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if t.shape != q.shape:
        raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(t.shape)}")
    check_last_dim_contiguous(name, t)


def _check_centroids(centroids, H, D, device):
    check_tensor("centroids", centroids, 3)
    check_float("centroids", centroids)
    if centroids.device != device:
        raise ValueError(f"centroids must be on {device}, got {centroids.device}")
    if centroids.shape[0] != H or centroids.shape[2] != D or centroids.shape[1] < 1:
        raise ValueError(f"centroids must have shape [H={H}, C>=1, D={D}], got {tuple(centroids.shape)}")


def routing_assign(q, k, centroids, *, cluster_size, shared_qk=True, key_padding_mask=None):
    """Balanced routing of the Routing Transformer (no gradient).

    q, k: [B, L, H, D]; centroids: [H, C, D] (unit norm). For each (batch, head, cluster c) returns
    the ``cluster_size`` tokens with the largest normalize(q) . mu_c (queries) and normalize(k) . mu_c (keys),
    ties going to the lower position, each list sorted by position: ``(q_idx, k_idx)``, both int32
    [B, H, C, cluster_size]. ``shared_qk=True``: keys are normalize(q), k is not read (may be None) and the
    two lists are equal. Needs 1 <= cluster_size <= L.

    ``key_padding_mask`` [B, L] bool (True = padding): padded tokens rank below all others, so no list
    holds one as long as ``cluster_size`` <= the number of unpadded tokens of every sequence (which makes
    key padding exact inside :func:`routing_attention`).
    """
    check_tensor("q", q, 4)
    check_float("q", q)
    check_last_dim_contiguous("q", q)
    check_bool("shared_qk", shared_qk)
    if not shared_qk:
        if k is None:
            raise ValueError("k must be given when shared_qk is False")
        _check_like_q("k", k, q)
    B, L, H, D = q.shape
    _check_centroids(centroids, H, D, q.device)
    if isinstance(cluster_size, bool) or not isinstance(cluster_size, int):
        raise TypeError(f"cluster_size must be an int, got {type(cluster_size).__name__}")
    if not 1 <= cluster_size <= L:
        raise ValueError(f"cluster_size must lie in [1, L={L}], got {cluster_size}")
    _check_padding(key_padding_mask, B, L, q.device)
    q_idx, k_idx, _ = torch.ops.attnkit.routing_assign(
        q.detach(), None if shared_qk else k.detach(), centroids.detach(), cluster_size, shared_qk, False, key_padding_mask)
    return q_idx, k_idx


def _check_index(name, idx, B, H, device):
    check_tensor(name, idx, 4)
    if idx.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {idx.dtype}")
    if idx.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {idx.device}")
    if idx.shape[0] != B or idx.shape[1] != H:
        raise ValueError(f"{name} must have shape [B={B}, H={H}, C, w], got {tuple(idx.shape)}")


def _check_padding(mask, B, L, device):
    if mask is None:
        return
    check_tensor("key_padding_mask", mask, 2)
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool, got {mask.dtype}")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"key_padding_mask must have shape [B={B}, L={L}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask must be on {device}, got {mask.device}")


def routing_attention(q, k, v, q_idx, k_idx, *, causal=True, shared_qk=True, scale=None, deterministic=True):
    """Attention inside routed clusters (Routing Transformer), on the flash core.

    q, k, v: [B, L, H, D]; q_idx, k_idx: int32 [B, H, C, w] (from :func:`routing_assign`). In cluster
    c, query token i of q_idx[b, h, c] attends to the key tokens of k_idx[b, h, c]:
    softmax(scale * q_i . k_j) v_j over the visible keys; ``causal``: only keys at positions <= i;
    ``shared_qk``: the score of a token with itself is -5e4 (it attends to itself only when nothing
    else is visible) and k may be None, meaning k = normalize(q) (the Reformer convention; pass
    k = F.normalize(q, dim=-1) yourself for the same). A query with no visible key in a cluster gets 0
    there. Key padding: route padded tokens out with ``routing_assign(..., key_padding_mask=...)``.

    Returns o [B, L, H, D]: a token's mean over the clusters its query was routed to, 0 when none.
    Gradients reach q, k, v (never the routing). ``deterministic=False`` lets the CUDA backward
    scatter with fp32 atomics (slightly faster, run-to-run bit differences); CPU is always deterministic.
    """
    check_tensor("q", q, 4)
    check_float("q", q)
    check_last_dim_contiguous("q", q)
    check_bool("causal", causal)
    check_bool("shared_qk", shared_qk)
    check_bool("deterministic", deterministic)
    if k is None:
        if not shared_qk:
            raise ValueError("k must be given when shared_qk is False")
        k = F.normalize(q, dim=-1)
    _check_like_q("k", k, q)
    _check_like_q("v", v, q)
    B, L, H, D = q.shape
    if D == 0:
        raise ValueError("q must have a non-zero head dim")
    _check_index("q_idx", q_idx, B, H, q.device)
    _check_index("k_idx", k_idx, B, H, q.device)
    if k_idx.shape[2] != q_idx.shape[2]:
        raise ValueError(f"k_idx must have as many clusters as q_idx ({q_idx.shape[2]}), got {k_idx.shape[2]}")
    scale = check_scale(scale, D ** -0.5)
    out, _, _ = torch.ops.attnkit.routing_fwd(q, k, v, q_idx, k_idx, None, causal, -1, shared_qk, scale,
                                                  deterministic)
    return out


def _routing_local_attention(q, k, v, *, window, causal=True, self_mask=False, scale=None, key_padding_mask=None):
    """Sliding-window attention through the core's window (the routing module's local heads): token i
    attends to keys j with i - window < j (and j <= i when causal), i.e. ``window`` keys including
    itself. q, k, v [B, L, H, D]."""
    check_tensor("q", q, 4)
    check_float("q", q)
    check_last_dim_contiguous("q", q)
    _check_like_q("k", k, q)
    _check_like_q("v", v, q)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    _check_padding(key_padding_mask, q.shape[0], q.shape[1], q.device)
    scale = check_scale(scale, q.shape[-1] ** -0.5)
    out, _, _ = torch.ops.attnkit.routing_fwd(q, k, v, None, None, key_padding_mask, causal, window - 1,
                                                  self_mask, scale, True)
    return out


def _flat(x, centroids, name="x"):
    check_tensor(name, x)
    check_float(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [..., H, D], got {tuple(x.shape)}")
    H, D = x.shape[-2], x.shape[-1]
    _check_centroids(centroids, H, D, x.device)
    x3 = x.reshape(-1, H, D)
    check_last_dim_contiguous(name, x3)
    return x3


def kmeans_assign(x, centroids):
    """The cluster of every vector: argmax_c normalize(x[..., h, :]) . centroids[h, c] (first maximum),
    int32 of shape x.shape[:-1]. x: [..., H, D]; centroids: [H, C, D]."""
    x3 = _flat(x, centroids)
    a = torch.ops.attnkit.kmeans_assign(x3.detach(), centroids.detach())
    return a.reshape(x.shape[:-1])


@torch.no_grad()


def kmeans_ema_update_(centroids, x, *, decay, assign=None):
    """One online k-means step of the Routing Transformer, in place on ``centroids`` [H, C, D]:
    every vector x[..., h, :] goes to its argmax cluster (or ``assign``, int32 x.shape[:-1]);
    mu_c <- normalize(decay * mu_c + (1 - decay) * normalize(mean of the normalised vectors of c)).
    Clusters that got no vector keep their centroid. Returns ``centroids``."""
    x3 = _flat(x, centroids)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"decay must be a float, got {type(decay).__name__}")
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    a = None
    if assign is not None:
        check_tensor("assign", assign)
        if assign.dtype != torch.int32:
            raise TypeError(f"assign must be int32, got {assign.dtype}")
        if tuple(assign.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"assign must have shape {tuple(x.shape[:-1])}, got {tuple(assign.shape)}")
        a = assign.reshape(x3.shape[0], x3.shape[1])
    torch.ops.attnkit.kmeans_ema_update_(centroids, x3, a, float(decay))
    return centroids


def routing_commitment_loss(x, centroids, assign=None):
    """mean over the vectors x[..., h, :] of ||normalize(x) - mu_assigned||^2 (the k-means commitment
    loss; multiply by the commitment weight yourself). Differentiable in x; centroids are constants.
    ``assign`` (int32 x.shape[:-1]) skips recomputing the clusters."""
    x3 = _flat(x, centroids)
    H, C, D = centroids.shape
    if assign is None:
        a = torch.ops.attnkit.kmeans_assign(x3.detach(), centroids.detach())
    else:
        check_tensor("assign", assign)
        if tuple(assign.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"assign must have shape {tuple(x.shape[:-1])}, got {tuple(assign.shape)}")
        a = assign.reshape(x3.shape[0], H)
    dtype = torch.promote_types(x.dtype, torch.float32)
    xn = F.normalize(x3.to(dtype), dim=-1)
    flat = centroids.detach().to(dtype).reshape(H * C, D)
    offs = torch.arange(H, device=x.device) * C
    mu = flat[a.long() + offs]  # [N, H, D]
    if xn.numel() == 0:
        return xn.sum()
    return ((xn - mu) ** 2).sum(-1).mean()


@torch.no_grad()


def kmeans_init(x, num_clusters, *, iters=10, generator=None):
    """Initial centroids [H, num_clusters, D] (float32, unit norm) from a batch x [..., H, D]:
    greedy k-means++ seeding on the cosine distance (per head), then ``iters`` k-means iterations (each
    cluster moves to the normalised mean of its vectors; clusters that got none keep their centroid)."""
    check_tensor("x", x)
    check_float("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape [..., H, D], got {tuple(x.shape)}")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive int, got {num_clusters!r}")
    H, D = x.shape[-2], x.shape[-1]
    x3 = x.reshape(-1, H, D)
    N = x3.shape[0]
    if N == 0:
        raise ValueError("x must hold at least one vector")
    xn = F.normalize(x3.float(), dim=-1).transpose(0, 1)  # [H, N, D]
    heads = torch.arange(H, device=x.device)
    first = torch.randint(0, N, (H,), generator=generator).to(x.device)
    mu = xn.new_zeros(H, num_clusters, D)
    mu[:, 0] = xn[heads, first]
    dist = (1 - torch.einsum("hnd,hd->hn", xn, mu[:, 0])).clamp_min(0)
    # greedy k-means++: of a few candidates drawn ~ distance, keep the one that lowers the potential most
    n_try = 2 + int(math.log(num_clusters))
    for c in range(1, num_clusters):
        w = dist.double().cpu()
        w[w.sum(1) <= 0] = 1.0  # every vector already is a centroid: pick any
        cand = torch.multinomial(w, n_try, replacement=True, generator=generator).to(x.device)  # [H, T]
        d_cand = (1 - torch.einsum("hnd,htd->htn", xn, xn[heads[:, None], cand])).clamp_min(0)
        new_dist = torch.minimum(dist[:, None, :], d_cand)  # [H, T, N]
        best = new_dist.sum(-1).argmin(-1)  # [H]
        pick = cand[heads, best]
        mu[:, c] = xn[heads, pick]
        dist = new_dist[heads, best]
    # an all-zero vector cannot seed a direction: replace by a random unit vector
    zero = mu.norm(dim=-1) == 0
    if zero.any():
        fill = F.normalize(torch.randn(int(zero.sum()), D, generator=generator), dim=-1).to(mu.device)
        mu[zero] = fill
    for _ in range(iters):
        torch.ops.attnkit.kmeans_ema_update_(mu, x3, None, 0.0)
    return mu


# Fake implementations (torch.compile / FakeTensor)


@torch.library.register_fake("attnkit::routing_assign")


def _routing_assign_fake(q, k, centroids, cluster_size, shared_qk, with_assign=False, key_padding_mask=None):
    B, L, H, _ = q.shape
    C = centroids.shape[1]
    q_idx = q.new_empty((B, H, C, cluster_size), dtype=torch.int32)
    k_idx = q.new_empty((B, H, C, cluster_size), dtype=torch.int32)
    nx = 1 if shared_qk else 2
    assign = q.new_empty((nx * B, L, H) if with_assign else (0,), dtype=torch.int32)
    return q_idx, k_idx, assign


@torch.library.register_fake("attnkit::routing_fwd")


def _routing_fwd_fake(q, k, v, q_idx, k_idx, key_padding_mask, causal, window_left, self_mask, scale,
                      deterministic=True):
    B, L, H, D = q.shape
    out = q.new_empty((B, L, H, D))
    if q_idx is None:
        return out, q.new_empty((0,)), q.new_empty((B, H, L), dtype=torch.float32)
    rows = q_idx.shape[2] * q_idx.shape[3]
    return out, q.new_empty((B, rows, H, D)), q.new_empty((B, H, rows), dtype=torch.float32)


@torch.library.register_fake("attnkit::routing_bwd")


def _routing_bwd_fake(dout, q, k, v, q_idx, k_idx, key_padding_mask, out_seg, lse, causal, window_left, self_mask,
                      scale, deterministic):
    B, L, H, D = q.shape
    return q.new_empty((B, L, H, D)), q.new_empty((B, L, H, D)), q.new_empty((B, L, H, D))


@torch.library.register_fake("attnkit::kmeans_assign")


def _kmeans_assign_fake(x, centroids):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.int32)


@torch.library.register_fake("attnkit::kmeans_ema_update_")


def _kmeans_ema_update_fake(centroids, x, assign, decay):
    return None


# Autograd: routing_fwd -> routing_bwd. Gradients for q, k, v only (never through the routing indices
# or the padding mask); out_seg and lse are saved, not differentiable.


def _routing_setup_context(ctx, inputs, output):
    q, k, v, q_idx, k_idx, key_padding_mask, causal, window_left, self_mask, scale, deterministic = inputs
    out, out_seg, lse = output
    ctx.mark_non_differentiable(out_seg, lse)
    ctx.indexed = q_idx is not None
    # Without indices the core's output is `out` itself (out_seg is empty).
    ctx.save_for_backward(q, k, v, q_idx, k_idx, key_padding_mask, out_seg if ctx.indexed else out, lse)
    ctx.causal = causal
    ctx.window_left = window_left
    ctx.self_mask = self_mask
    ctx.scale = scale
    ctx.deterministic = deterministic


def _routing_backward(ctx, grad_out, grad_out_seg, grad_lse):
    q, k, v, q_idx, k_idx, key_padding_mask, o, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    grad_out = grad_out.contiguous()
    dq, dk, dv = torch.ops.attnkit.routing_bwd(grad_out, q, k, v, q_idx, k_idx, key_padding_mask, o, lse, ctx.causal,
                                               ctx.window_left, ctx.self_mask, ctx.scale, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("attnkit::routing_fwd", _routing_backward, setup_context=_routing_setup_context)
