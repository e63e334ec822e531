"""TransNormerLLM's gated linear attention block on attnkit's lightning attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lightning import lightning_attention, lightning_attention_decode, lightning_slopes


class LightningAttention(nn.Module):
    """TransNormerLLM's token mixer, "Gated Linear Attention" (Qin et al., 2023, arXiv:2307.14995).

    For x ``[B, L, embed_dim]`` and H heads of size d (hidden = H * d):

        q, k, v, u = split(x W_qkvu)                  one fused projection embed_dim -> 4 * hidden
        q = SiLU(q), k = SiLU(k)                      the kernel feature map (Swish); v and u stay linear
        o = lightning_attention(q, k, v, slopes)      scale 1, fixed per-layer decays (no learned decay)
        o = SRMSNorm(o) * u                           over the whole hidden dim, no learned gain
        y = o W_o                                     hidden -> embed_dim

    with SRMSNorm(x) = x / sqrt(mean(x^2) + eps) (TransNormerLLM's "SimpleRMSNorm") and the slopes
    of :func:`attnkit.lightning_slopes` for this layer: s_h = 2^(-8 (h+1) / H) (ALiBi's rule for other
    H) times 1 - layer_idx / (num_layers - 1) + 1e-5, so the decay lambda_h = exp(-s_h) is strongest in
    the first layer and almost 1 in the last. Projections have no bias by default (as in the paper).
    The surrounding pre-norm residual block and the SGLU channel mixer are not part of this module.

    ``forward(x, past_state=None, use_cache=False)`` returns ``(y, state)``; ``state`` is the float32
    ``[B, H, d, d]`` recurrent state after x when ``use_cache`` (else None). ``past_state`` continues
    from an earlier call: one token at a time (L = 1) runs the decode kernel, longer inputs the full
    op with ``past_state`` as initial state. ``cu_seqlens`` passes packed sequences (B = 1) through.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        layer_idx: int = 0,
        num_layers: int = 1,
        *,
        head_dim: int | None = None,
        bias: bool = False,
        eps: float = 1e-6,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if head_dim is None:
            if embed_dim % num_heads != 0:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
            head_dim = embed_dim // num_heads
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self.eps = eps
        hidden = num_heads * head_dim
        self.qkvu_proj = nn.Linear(embed_dim, 4 * hidden, bias=bias, device=device, dtype=dtype)
        self.o_proj = nn.Linear(hidden, embed_dim, bias=bias, device=device, dtype=dtype)
        # Fixed, not learned; kept in float32 whatever the module's dtype (see forward).
        self.register_buffer("slopes", lightning_slopes(num_heads, layer_idx, num_layers, device=device), persistent=False)

    def _norm(self, o):
        o32 = o.float()
        return (o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + self.eps)).to(o.dtype)

    def forward(self, x, past_state=None, use_cache: bool = False, cu_seqlens=None):
        B, L, _ = x.shape
        H, d = self.num_heads, self.head_dim
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)
        q = F.silu(q).reshape(B, L, H, d)
        k = F.silu(k).reshape(B, L, H, d)
        v = v.reshape(B, L, H, d)
        slopes = self.slopes.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        if past_state is not None and L == 1 and cu_seqlens is None:
            o, state = lightning_attention_decode(q, k, v, past_state, slopes, inplace=False)
        else:
            o, state = lightning_attention(
                q, k, v, slopes, initial_state=past_state, output_final_state=use_cache, cu_seqlens=cu_seqlens
            )
        o = self._norm(o.reshape(B, L, H * d)) * u
        y = self.o_proj(o)
        return y, (state if use_cache else None)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"layer_idx={self.layer_idx}, num_layers={self.num_layers}"
        )
