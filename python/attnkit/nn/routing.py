"""Routing attention layer (Roy et al. 2020, "Efficient Content-Based Sparse Attention with Routing
Transformers"): content-based sparse attention through online k-means, plus optional local heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.routing import (
    _routing_local_attention,
    kmeans_ema_update_,
    kmeans_init,
    routing_attention,
    routing_commitment_loss,
)


class RoutingAttention(nn.Module):
    """Multi-head routing attention, input and output [B, L, embed_dim].

    Heads ``0 .. local_heads-1`` run sliding-window attention over the ``local_window`` most recent
    keys (themselves included; causal when ``causal``, else the window is one-sided to the left too).
    The other ``num_heads - local_heads`` heads are routing heads: every head has ``num_clusters``
    unit-norm centroids (a buffer); each cluster takes the ``cluster_size`` tokens (default L // C, at
    least 1) whose normalised queries / keys are closest to its centroid, and attention runs inside
    each cluster (see :func:`attnkit.routing_attention`).

    ``shared_qk=True`` (the Routing Transformer default): keys are normalize(q), and a token attends to
    itself only when nothing else is visible. Training forwards update the centroids in place with the
    online k-means EMA (``ema_decay``); the first training forward initialises them with a few k-means
    iterations on its batch. ``forward`` returns ``(out, aux_loss)``: aux_loss is ``commitment`` times
    the k-means commitment loss (add it to the task loss).

    ``key_padding_mask`` [B, L] bool, True = padding: padded keys are never attended, padded tokens
    take no part in the k-means update or the commitment loss, and their outputs are 0. Routing heads
    keep padded tokens out of the clusters (they rank last), and the cluster size shrinks to the
    shortest unpadded length of the batch when that is smaller (sequences with no unpadded token
    excepted).
    """

    def __init__(self, embed_dim, num_heads, num_clusters, cluster_size=None, causal=True, local_heads=0, local_window=256,
                 shared_qk=True, ema_decay=0.999, commitment=1e-4, *, bias=True, kmeans_init_iters=10, device=None,
                 dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if not 0 <= local_heads <= num_heads:
            raise ValueError(f"local_heads must lie in [0, num_heads={num_heads}], got {local_heads}")
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        if cluster_size is not None and cluster_size < 1:
            raise ValueError(f"cluster_size must be None or >= 1, got {cluster_size}")
        if local_window < 1:
            raise ValueError(f"local_window must be >= 1, got {local_window}")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1], got {ema_decay}")
        if commitment < 0:
            raise ValueError(f"commitment must be >= 0, got {commitment}")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.num_clusters = num_clusters
        self.cluster_size = cluster_size
        self.causal = causal
        self.local_heads = local_heads
        self.routing_heads = num_heads - local_heads
        self.local_window = local_window
        self.shared_qk = shared_qk
        self.ema_decay = ema_decay
        self.commitment = commitment
        self.kmeans_init_iters = kmeans_init_iters
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = None if shared_qk else nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.o_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        mu = F.normalize(torch.randn(self.routing_heads, num_clusters, self.head_dim, device=device), dim=-1)
        self.register_buffer("centroids", mu)
        self.register_buffer("centroids_initialized", torch.tensor(False, device=device))

    def _apply(self, fn, *args, **kwargs):
        # module.half() / .to(bfloat16) cast every floating buffer: keep the centroids in float32,
        # an EMA step of (1 - 0.999) would be lost to 16-bit rounding
        out = super()._apply(fn, *args, **kwargs)
        if self.centroids.dtype != torch.float32:
            self.centroids = self.centroids.float()
        return out

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_clusters={self.num_clusters}, "
                f"cluster_size={self.cluster_size}, causal={self.causal}, local_heads={self.local_heads}, "
                f"local_window={self.local_window}, shared_qk={self.shared_qk}")

    def forward(self, x, key_padding_mask=None):
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have shape [B, L, {self.embed_dim}], got {tuple(x.shape)}")
        B, L, E = x.shape
        H, Dh, nl = self.num_heads, self.head_dim, self.local_heads
        pad = key_padding_mask
        if pad is not None and (pad.dtype != torch.bool or tuple(pad.shape) != (B, L)):
            raise ValueError(f"key_padding_mask must be bool of shape [{B}, {L}], got {pad.dtype} {tuple(pad.shape)}")
        q = self.q_proj(x).view(B, L, H, Dh)
        v = self.v_proj(x).view(B, L, H, Dh)
        k = F.normalize(q, dim=-1) if self.shared_qk else self.k_proj(x).view(B, L, H, Dh)
        aux = torch.zeros((), device=x.device, dtype=torch.float32)
        outs = []
        if nl > 0:
            outs.append(_routing_local_attention(q[:, :, :nl], k[:, :, :nl], v[:, :, :nl], window=self.local_window,
                                                 causal=self.causal, self_mask=self.shared_qk, key_padding_mask=pad))
        if self.routing_heads > 0 and L > 0:
            qr, kr, vr = q[:, :, nl:], k[:, :, nl:], v[:, :, nl:]
            # the vectors routed and clustered: queries (shared QK), else queries and keys
            xs = qr if self.shared_qk else torch.cat([qr, kr], 0)
            valid = None
            if pad is not None:
                valid = ~pad if self.shared_qk else torch.cat([~pad, ~pad], 0)
            if self.training and not bool(self.centroids_initialized):
                xi = xs.detach() if valid is None else xs.detach()[valid]
                if xi.shape[0] > 0:
                    self.centroids.copy_(kmeans_init(xi, self.num_clusters, iters=self.kmeans_init_iters))
                    self.centroids_initialized.fill_(True)
            w = min(self.cluster_size if self.cluster_size is not None else max(1, L // self.num_clusters), L)
            if pad is not None:
                n_valid = (~pad).sum(1)
                n_valid = n_valid[n_valid > 0]
                if n_valid.numel() > 0:  # keep every list free of padding
                    w = max(1, min(w, int(n_valid.min())))
            q_idx, k_idx, assign = torch.ops.attnkit.routing_assign(
                qr.detach(), None if self.shared_qk else kr.detach(), self.centroids, w, self.shared_qk, True, pad)
            outs.append(routing_attention(qr, kr, vr, q_idx, k_idx, causal=self.causal, shared_qk=self.shared_qk))
            if valid is not None:
                xs, assign = xs[valid], assign[valid]
            if self.commitment > 0:
                aux = aux + self.commitment * routing_commitment_loss(xs, self.centroids, assign).float()
            if self.training:
                kmeans_ema_update_(self.centroids, xs.detach(), decay=self.ema_decay, assign=assign)
        elif self.routing_heads > 0:
            outs.append(q.new_zeros((B, L, self.routing_heads, Dh)))
        o = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
        if pad is not None:
            o = o.masked_fill(pad[:, :, None, None], 0)
        return self.o_proj(o.reshape(B, L, E)), aux
