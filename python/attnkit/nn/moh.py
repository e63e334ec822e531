"""Mixture-of-Head attention layer (Jin et al. 2024, "MoH: Multi-Head Attention as Mixture-of-Head
Attention", arXiv 2410.11842): attention heads as experts. Every token uses the shared heads plus the
top-k of the routed heads; head outputs are summed through Wo with router weights. The attention is
:func:`attnkit.mixture_of_heads_attention`, which computes only the selected (token, head) pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.moh import mixture_of_heads_attention

# (fraction of shared heads, fraction of active heads) of the paper's settings. MoH-LLaMA3: half the
# heads shared, 75% active. MoH-ViT: 75% active, MoH-DiT: 90% active; for those two the shared
# fraction (half the heads) is this module's choice.
MOH_PRESETS: dict[str, tuple[float, float]] = {
    "moh-llama3": (0.5, 0.75),
    "moh-vit": (0.5, 0.75),
    "moh-dit": (0.5, 0.90),
}


def preset_heads(name: str, num_heads: int) -> tuple[int, int]:
    """(num_shared_heads, top_k routed heads) of preset ``name`` for ``num_heads`` query heads."""
    if not isinstance(name, str) or name.lower() not in MOH_PRESETS:
        raise ValueError(f"name must be one of {sorted(MOH_PRESETS)}, got {name!r}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 2:
        raise ValueError(f"num_heads must be an int >= 2, got {num_heads!r}")
    shared_frac, active_frac = MOH_PRESETS[name.lower()]
    shared = max(1, min(num_heads - 1, round(shared_frac * num_heads)))
    active = max(shared + 1, min(num_heads, round(active_frac * num_heads)))
    return shared, active - shared


class MoHAttention(nn.Module):
    """Self-attention whose heads are experts chosen per token by a router.

    Heads ``0 .. num_shared_heads - 1`` are always active; of the ``Hr = num_heads - num_shared_heads``
    routed heads each token uses the ``top_k`` with the largest router scores. Router weights for
    token x (paper, eq. 5-6):

        shared head i:  g_i = a1 * softmax(Ws x)_i
        routed head i:  g_i = a2 * softmax(Wr x)_i / sum over the top-k j of softmax(Wr x)_j  (top-k only)
        [a1, a2] = softmax(Wh x)

    (``renormalize=False`` drops the division by the top-k sum, the paper's literal form.) Without
    shared heads the routed weights are not scaled by a2.

    ``forward(x, rotary=None)``: x ``[B, L, embed_dim]``; ``rotary`` an optional callable
    ``(q, k) -> (q, k)`` on ``q [B, L, Hq, D]`` and ``k [B, L, Hkv, D]`` (the caller's positional
    rotation). Returns ``(y, aux_loss)``: y ``[B, L, embed_dim]`` and the load-balance loss
    ``Hr * sum_i f_i P_i`` over routed heads (f_i: fraction of the token selections that chose head i,
    divided by top_k; P_i: mean router probability of head i), 1.0 when perfectly balanced; multiply
    it by a coefficient and add it to the training loss. ``self.last_head_idx`` / ``last_head_weight``
    keep the latest routing.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_shared_heads: int,
        top_k: int,
        num_kv_heads: int | None = None,
        *,
        causal: bool = True,
        bias: bool = False,
        renormalize: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0 <= num_shared_heads < num_heads:
            raise ValueError(f"num_shared_heads must be in [0, {num_heads}), got {num_shared_heads}")
        if not 1 <= top_k <= num_heads - num_shared_heads:
            raise ValueError(f"top_k must be in [1, {num_heads - num_shared_heads}] (routed heads), got {top_k}")
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        fk = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.num_shared_heads, self.top_k = num_shared_heads, top_k
        self.num_routed_heads = num_heads - num_shared_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.renormalize = causal, renormalize
        D = self.head_dim
        self.q_proj = nn.Linear(embed_dim, num_heads * D, bias=bias, **fk)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * D, bias=bias, **fk)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * D, bias=bias, **fk)
        self.out_proj = nn.Linear(num_heads * D, embed_dim, bias=bias, **fk)
        self.router_routed = nn.Linear(embed_dim, self.num_routed_heads, bias=False, **fk)
        self.router_shared = nn.Linear(embed_dim, num_shared_heads, bias=False, **fk) if num_shared_heads else None
        self.router_balance = nn.Linear(embed_dim, 2, bias=False, **fk) if num_shared_heads else None
        self.last_head_idx = None
        self.last_head_weight = None

    @classmethod
    def from_preset(cls, name: str, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, **kw):
        """The paper's settings (see MOH_PRESETS): 'moh-llama3', 'moh-vit', 'moh-dit'."""
        shared, k = preset_heads(name, num_heads)
        return cls(embed_dim, num_heads, shared, k, num_kv_heads, **kw)

    def route(self, x: torch.Tensor):
        """head_idx int32 ``[B, L, hs + top_k]``, head_weight fp32 of the same shape, aux loss."""
        B, L, _ = x.shape
        hs, hr, k = self.num_shared_heads, self.num_routed_heads, self.top_k
        xf = x.float()
        p_r = torch.softmax(F.linear(xf, self.router_routed.weight.float()), dim=-1)  # [B, L, Hr]
        top_p, top_i = p_r.topk(k, dim=-1)
        if self.renormalize:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        if hs:
            alpha = torch.softmax(F.linear(xf, self.router_balance.weight.float()), dim=-1)
            p_s = torch.softmax(F.linear(xf, self.router_shared.weight.float()), dim=-1)
            shared_idx = torch.arange(hs, device=x.device).expand(B, L, hs)
            idx = torch.cat([shared_idx, top_i + hs], dim=-1)
            w = torch.cat([alpha[..., :1] * p_s, alpha[..., 1:] * top_p], dim=-1)
        else:
            idx, w = top_i, top_p
        # load balance over the routed heads: f_i from the (non-differentiable) choices, P_i the mean prob
        f = torch.zeros(hr, device=x.device, dtype=torch.float32)
        f = f.scatter_add(0, top_i.reshape(-1), torch.ones(top_i.numel(), device=x.device)) / max(1, B * L * k)
        aux = hr * (f * p_r.reshape(-1, hr).mean(0)).sum()
        return idx.to(torch.int32), w, aux

    def forward(self, x: torch.Tensor, rotary=None):
        B, L, _ = x.shape
        D = self.head_dim
        q = self.q_proj(x).view(B, L, self.num_heads, D)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, D)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, D)
        if rotary is not None:
            q, k = rotary(q, k)
        idx, w, aux = self.route(x)
        self.last_head_idx, self.last_head_weight = idx.detach(), w.detach()
        o = mixture_of_heads_attention(q, k, v, idx, w, causal=self.causal)
        return self.out_proj(o.reshape(B, L, self.num_heads * D)), aux
