"""What attnkit is measured against: plain-PyTorch paths of each mechanism and thin wrappers of the
public libraries (torch SDPA backends, flash-attn, flash-dmattn, flash-linear-attention,
routing-transformer).

The plain-PyTorch paths compute at the input dtype (softmax and recurrent state in fp32, as careful
eager code does). They double as the correctness gate's comparator where no library computes the
same function. All tensors use attnkit's layout: ``[B, L, H, D]``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------


def causal_visible(lq: int, lk: int, device, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [rows, lk]: key j visible from query i when j <= i + (lk - lq) (bottom-right aligned)."""
    if rows is None:
        rows = torch.arange(lq, device=device)
    cols = torch.arange(lk, device=device)
    return cols[None, :] <= (rows[:, None] + (lk - lq))


def safe_softmax(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that gives 0 (not NaN) on rows where every score is -inf."""
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    z = e.sum(dim=-1, keepdim=True)
    return e / z.clamp_min(torch.finfo(z.dtype).tiny)


def _expand_heads(q, k, v):
    """[B, L, H, D] -> [B, H, L, D] with the head mapping of attnkit's SQA made explicit (MHA shapes)."""
    hq, hkv = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if hq > hkv:
        kt = kt.repeat_interleave(hq // hkv, dim=1)
        vt = vt.repeat_interleave(hq // hkv, dim=1)
    elif hkv > hq:
        qt = qt.repeat_interleave(hkv // hq, dim=1)
    return qt, kt, vt


def module_available(name: str) -> str | None:
    """None when ``name`` imports, else a one-line reason."""
    try:
        importlib.import_module(name)
        return None
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"{name} not importable ({type(e).__name__})"


# ----------------------------------------------------------------------------------------------
# torch SDPA
# ----------------------------------------------------------------------------------------------

SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


def _backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def sdpa_attention(q, k, v, *, causal: bool, scale: float, backend: str | None = None, native_gqa: bool = True,
                   attn_mask: torch.Tensor | None = None):
    """torch SDPA on attnkit-layout tensors. ``backend`` None lets torch choose.

    GQA goes through ``enable_gqa=True`` when ``native_gqa``; otherwise K/V heads are repeated. More KV
    heads than query heads (reverse SQA) repeats the query heads, which is what that mapping means.
    Causal masking is SDPA's, aligned top-left: callers use Lq == Lk.
    """
    hq, hkv = q.shape[2], k.shape[2]
    if hq > hkv and native_gqa:
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = True
    else:
        qt, kt, vt = _expand_heads(q, k, v)
        gqa = False
    ctx = contextlib.nullcontext()
    if backend is not None:
        from torch.nn.attention import sdpa_kernel

        ctx = sdpa_kernel([_backend_enum(backend)])
    with ctx:
        kw = {"enable_gqa": True} if gqa else {}
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, is_causal=causal, scale=scale, **kw)
    return o.transpose(1, 2)


_PROBES: dict = {}


def probe_sdpa(backend: str, device: str, dtype: torch.dtype, hq: int, hkv: int, d: int, causal: bool,
               dv: int | None = None) -> tuple[str | None, bool]:
    """Can ``backend`` run this problem kind? Returns (reason or None, native_gqa).

    Tries a tiny problem with the same dtype, head dim and head mapping; when native GQA is refused,
    tries again with repeated K/V heads.
    """
    key = (backend, device, dtype, hq, hkv, d, dv, causal)
    if key in _PROBES:
        return _PROBES[key]
    dv = dv or d
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, 8, hq, d, generator=g).to(device, dtype)
    k = torch.randn(1, 8, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(1, 8, hkv, dv, generator=g).to(device, dtype)
    result: tuple[str | None, bool] = ("not available", True)
    errors = []
    for native in ((True, False) if hq > hkv else (True,)):
        try:
            sdpa_attention(q, k, v, causal=causal, scale=d ** -0.5, backend=backend, native_gqa=native)
            result = (None, native)
            break
        except Exception as e:
            errors.append(e)
    if result[0] is not None and errors:
        result = (f"SDPA {backend} not available for {device}/{str(dtype).replace('torch.', '')}/D={d}", True)
    _PROBES[key] = result
    return result


# ----------------------------------------------------------------------------------------------
# SQA: plain PyTorch
# ----------------------------------------------------------------------------------------------


def eager_attention(q, k, v, *, causal: bool, scale: float, bias: torch.Tensor | None = None):
    """Materialises the [B, H, Lq, Lk] scores; matmuls at the input dtype, softmax in fp32."""
    qt, kt, vt = _expand_heads(q, k, v)
    s = torch.matmul(qt, kt.transpose(-1, -2)).float() * scale
    if bias is not None:
        s = s + bias
    if causal:
        s = s.masked_fill(~causal_visible(q.shape[1], k.shape[1], q.device), float("-inf"))
    p = safe_softmax(s)
    return torch.matmul(p.to(v.dtype), vt).transpose(1, 2)


def eager_attention_bytes(b, h, lq, lk, elt: int, mode: str) -> int:
    """Rough peak of eager_attention / SDPA-math: the scores in fp32 and in the input dtype."""
    n = b * h * lq * lk
    per = 3 * 4 + elt  # scores, exp, probabilities (fp32) + cast
    return int(n * per * (1.0 if mode == "fwd" else 2.0))


# ----------------------------------------------------------------------------------------------
# DMA: top-k selection and masked attention in plain PyTorch
# ----------------------------------------------------------------------------------------------


def dma_order(bias: torch.Tensor) -> torch.Tensor:
    """Key indices of each (b, g) by decreasing bias, ties by increasing position."""
    return torch.sort(bias.detach(), dim=-1, descending=True, stable=True).indices


def dma_kept(order: torch.Tensor, lq: int, keep: int, causal: bool, rows: torch.Tensor) -> torch.Tensor:
    """Bool [B, G, len(rows), Lk]: the keys each query row keeps.

    Row i keeps the ``keep`` visible keys with the largest bias (all of them if fewer are visible).
    Walking the keys in ``order``, a visible key is kept while fewer than ``keep`` visible keys came
    before it.
    """
    lk = order.shape[-1]
    if causal:
        lim = rows + (lk - lq)
    else:
        lim = torch.full_like(rows, lk - 1)
    vis_sorted = order[:, :, None, :] <= lim[None, None, :, None]
    rank = vis_sorted.cumsum(dim=-1, dtype=torch.int32)
    kept_sorted = vis_sorted & (rank <= keep)
    kept = torch.zeros_like(kept_sorted)
    kept.scatter_(-1, order[:, :, None, :].expand_as(kept_sorted), kept_sorted)
    return kept


def dma_dense_kept(bias: torch.Tensor, lq: int, keep: int, causal: bool, chunk: int = 1024) -> torch.Tensor:
    """The whole [B, G, Lq, Lk] kept mask (what users of dense-mask kernels must build)."""
    order = dma_order(bias)
    parts = []
    for r0 in range(0, lq, chunk):
        rows = torch.arange(r0, min(r0 + chunk, lq), device=bias.device)
        parts.append(dma_kept(order, lq, keep, causal, rows))
    return torch.cat(parts, dim=2)


def _dma_rows(q_rows, k, v, bias, order, rows, lq, keep, causal, scale):
    b, n, hq, d = q_rows.shape
    g = k.shape[2]
    r = hq // g
    kept = dma_kept(order, lq, keep, causal, rows)  # [B, G, n, Lk]
    qg = q_rows.transpose(1, 2).reshape(b, g, r, n, d)
    kt = k.transpose(1, 2)[:, :, None]
    vt = v.transpose(1, 2)[:, :, None]
    s = torch.matmul(qg, kt.transpose(-1, -2)).float() * scale + bias[:, :, None, None, :].float()
    s = s.masked_fill(~kept[:, :, None], float("-inf"))
    p = safe_softmax(s)
    o = torch.matmul(p.to(v.dtype), vt)  # [B, G, r, n, D]
    return o.reshape(b, hq, n, -1).transpose(1, 2)


def dma_eager(q, k, v, bias, *, keep: int, causal: bool, scale: float, chunk: int | None = None):
    """Plain-PyTorch DMA, a block of query rows at a time so memory stays O(block * Lk).

    With gradients, each block is checkpointed (recomputed in backward), so the backward does not
    keep all blocks' probabilities either.
    """
    b, lq, hq, d = q.shape
    lk, g = k.shape[1], k.shape[2]
    if hq % g:
        raise ValueError("dma_eager: query heads must be a multiple of KV heads")
    if chunk is None:
        budget = (2 << 30) if q.is_cuda else (128 << 20)
        chunk = max(16, min(lq, budget // max(1, b * hq * lk * 12)))
    order = dma_order(bias)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
    outs = []
    for r0 in range(0, lq, chunk):
        rows = torch.arange(r0, min(r0 + chunk, lq), device=q.device)
        qr = q[:, r0:r0 + len(rows)]
        if need_grad:
            from torch.utils.checkpoint import checkpoint

            o = checkpoint(_dma_rows, qr, k, v, bias, order, rows, lq, keep, causal, scale, use_reentrant=False)
        else:
            o = _dma_rows(qr, k, v, bias, order, rows, lq, keep, causal, scale)
        outs.append(o)
    if not outs:
        return q.new_zeros(b, 0, hq, v.shape[-1])
    return torch.cat(outs, dim=1)


def dma_masked_sdpa(q, k, v, bias, kept, *, scale: float):
    """Dense SDPA with a float mask: bias on kept keys, -inf elsewhere ([B, Hq, Lq, Lk] in memory).

    ``kept`` (from dma_dense_kept) is built outside the timed region: this baseline gets the
    selection for free and pays only for the dense masked attention.
    """
    b, lq, hq, _ = q.shape
    g, lk = k.shape[2], k.shape[1]
    mask = bias[:, :, None, :].expand(b, g, lq, lk).masked_fill(~kept, float("-inf")).to(q.dtype)
    mask = mask.repeat_interleave(hq // g, dim=1)
    return sdpa_attention(q, k, v, causal=False, scale=scale, native_gqa=False, attn_mask=mask)


def dma_masked_sdpa_bytes(b, hq, g, lq, lk, elt, mode) -> int:
    n = b * lq * lk
    fwd = n * g * (1 + 4 + elt) + n * hq * elt * 2
    return int(fwd * (1.0 if mode == "fwd" else 2.5))


def flash_dmattn_attention(fn, q, k, v, bias, kept, *, causal: bool, scale: float):
    """flash-dmattn's dense-mask interface: bool mask and bias as [B, Hkv, Lq, Lk]."""
    b, lq, _, _ = q.shape
    g, lk = k.shape[2], k.shape[1]
    attn_bias = bias[:, :, None, :].to(q.dtype).expand(b, g, lq, lk)
    return fn(q, k, v, attn_mask=kept, attn_bias=attn_bias, is_causal=causal, scale=scale)


def flash_dmattn_fn():
    mod = importlib.import_module("flash_dmattn")
    if hasattr(mod, "flash_dmattn_func_auto"):
        return mod.flash_dmattn_func_auto()
    return mod.flash_dmattn_func


# ----------------------------------------------------------------------------------------------
# Lightning: chunked linear attention with decay in plain PyTorch
# ----------------------------------------------------------------------------------------------


def lightning_slopes(h: int) -> torch.Tensor:
    """ALiBi / TransNormerLLM slopes s_h (used when attnkit.lightning_slopes is missing)."""

    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(h).is_integer():
        s = pow2(h)
    else:
        c = 2 ** math.floor(math.log2(h))
        s = pow2(c) + pow2(2 * c)[0::2][: h - c]
    return torch.tensor(s, dtype=torch.float32)


def lightning_eager(q, k, v, slopes, *, scale: float, chunk: int = 64):
    """o_t = scale * q_t S_t with S_t = exp(-s_h) S_{t-1} + k_t^T v_t, computed chunk by chunk.

    Inside a chunk: (Q K^T * decay) V at the input dtype; across chunks: Q S with the state in fp32.
    """
    b, l, h, dk = q.shape
    dv = v.shape[-1]
    c = chunk
    n = -(-l // c) if l else 0
    pad = n * c - l
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if pad:
        qt, kt, vt = (F.pad(t, (0, 0, 0, pad)) for t in (qt, kt, vt))
    qc = qt.reshape(b, h, n, c, dk)
    kc = kt.reshape(b, h, n, c, dk)
    vc = vt.reshape(b, h, n, c, dv)
    s = slopes.to(device=q.device, dtype=torch.float32)
    pos = torch.arange(c, device=q.device, dtype=torch.float32)
    diff = pos[:, None] - pos[None, :]
    decay = torch.exp(-s[:, None, None] * diff.clamp_min(0)) * (diff >= 0)  # [H, C, C]
    att = torch.matmul(qc, kc.transpose(-1, -2)).float() * decay[None, :, None]
    o = torch.matmul(att.to(v.dtype), vc).float()  # intra-chunk, [B, H, n, C, Dv]
    q_dec = torch.exp(-s[:, None] * (pos + 1))[None, :, :, None]  # lambda^(i+1), [1, H, C, 1]
    k_dec = torch.exp(-s[:, None] * (c - 1 - pos))[None, :, :, None]  # lambda^(C-1-j)
    c_dec = torch.exp(-s * c)[None, :, None, None]  # lambda^C
    state = q.new_zeros(b, h, dk, dv, dtype=torch.float32)
    inter = []
    for i in range(n):
        inter.append(torch.matmul(qc[:, :, i].float() * q_dec, state))
        kv = torch.matmul((kc[:, :, i].float() * k_dec).transpose(-1, -2), vc[:, :, i].float())
        state = c_dec * state + kv
    if n:
        o = o + torch.stack(inter, dim=2)
    o = (o * scale).reshape(b, h, n * c, dv)[:, :, :l]
    return o.transpose(1, 2).to(v.dtype)


def fla_simple_gla(q, k, v, slopes, *, scale: float):
    """flash-linear-attention's chunk_simple_gla with the same per-head decay (log decay -s_h)."""
    from fla.ops.simple_gla import chunk_simple_gla

    params = inspect.signature(chunk_simple_gla).parameters
    kw = {"scale": scale, "output_final_state": False}
    neg = -slopes.to(device=q.device, dtype=torch.float32)
    if "g_gamma" in params:
        kw["g_gamma"] = neg
    else:
        b, l, h, _ = q.shape
        kw["g"] = neg.expand(b, l, h).contiguous()
    if "head_first" in params:
        kw["head_first"] = False
    o, _ = chunk_simple_gla(q, k, v, **kw)
    return o


# ----------------------------------------------------------------------------------------------
# Routing: balanced top-w routing and per-cluster attention in plain PyTorch
# ----------------------------------------------------------------------------------------------


def routing_assign_eager(q, k, centroids, *, cluster_size: int, shared_qk: bool = True):
    """q_idx, k_idx [B, H, C, w] int64: per centroid, the w tokens with the largest normalised score
    (ties to the lower position), sorted by position."""

    def top(x):
        xn = F.normalize(x.float(), dim=-1)
        r = torch.einsum("blhd,hcd->bhcl", xn, centroids.float())
        idx = torch.sort(r, dim=-1, descending=True, stable=True).indices[..., :cluster_size]
        return torch.sort(idx, dim=-1).values

    with torch.no_grad():
        qi = top(q)
        ki = qi if shared_qk else top(k)
    return qi, ki


def routing_attention_eager(q, k, v, q_idx, k_idx, *, causal: bool, shared_qk: bool, scale: float):
    """Gathers each cluster's w queries and w keys into dense [B, H, C, w, w] scores."""
    b, l, h, d = q.shape
    dv = v.shape[-1]
    _, _, c, w = q_idx.shape
    qi, ki = q_idx.long(), k_idx.long()
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def gather(x, idx, dim_):
        return x.gather(2, idx.reshape(b, h, c * w, 1).expand(b, h, c * w, dim_)).reshape(b, h, c, w, dim_)

    qg, kg, vg = gather(qt, qi, d), gather(kt, ki, d), gather(vt, ki, dv)
    s = torch.matmul(qg, kg.transpose(-1, -2)).float() * scale
    if shared_qk:
        s = s.masked_fill(qi[..., :, None] == ki[..., None, :], -5e4)
    if causal:
        s = s.masked_fill(ki[..., None, :] > qi[..., :, None], float("-inf"))
    p = safe_softmax(s)
    og = torch.matmul(p.to(v.dtype), vg).float().reshape(b, h, c * w, dv)
    flat = qi.reshape(b, h, c * w)
    out = torch.zeros(b, h, l, dv, device=q.device, dtype=torch.float32)
    out = out.scatter_add(2, flat[..., None].expand(b, h, c * w, dv), og)
    cnt = torch.zeros(b, h, l, device=q.device, dtype=torch.float32)
    cnt = cnt.scatter_add(2, flat, torch.ones_like(flat, dtype=torch.float32))
    out = out / cnt.clamp_min(1.0)[..., None]
    return out.transpose(1, 2).to(v.dtype)


def routing_pairs(q_idx: torch.Tensor, k_idx: torch.Tensor, causal: bool) -> int:
    """(query, key) pairs the clusters' attention really computes (visible ones when causal)."""
    if not causal:
        return int(q_idx.shape[0] * q_idx.shape[1] * q_idx.shape[2] * q_idx.shape[3] * k_idx.shape[3])
    qi = q_idx.long().contiguous()
    ki = k_idx.long().contiguous()
    # keys are sorted by position: visible keys of a query are a prefix
    return int(torch.searchsorted(ki, qi, right=True).sum().item())


def routing_transformer_module(num_clusters: int, window: int, heads: int, head_dim: int, causal: bool,
                               device) -> Callable:
    """The routing-transformer package's KmeansAttention (shared QK), on [B, H, L, D] tensors."""
    from routing_transformer import KmeansAttention

    mod = KmeansAttention(num_clusters, window, heads, head_dim, causal=causal, shared_qk=True).to(device)

    def run(q, v):
        qt, vt = q.transpose(1, 2), v.transpose(1, 2)
        out = mod(qt, qt, vt)
        if isinstance(out, tuple):
            out = out[0]
        return out.transpose(1, 2)

    return run
