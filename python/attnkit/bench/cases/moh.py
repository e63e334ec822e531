"""Benchmark cases of Mixture-of-Head attention: the op (only the selected (token, head) pairs) against
dense MoH (every head through SDPA, then multiplied by the gate: what public MoH code does) and plain
MHA (every head, no gate), at several fractions of active heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import MODES, Case, Impl, SuiteConfig, _gen, _randn, attnkit_module, bl, causal_pairs, register, seqlens


def _selection(B, L, H, K, gen, device):
    """K distinct random heads per token (int32) and positive random weights (fp32)."""
    idx = torch.rand(B, L, H, generator=gen).argsort(-1)[..., :K].to(torch.int32)
    w = torch.rand(B, L, K, generator=gen) + 0.5
    return idx.to(device), w.to(device)


def dense_moh(q, k, v, head_idx, head_weight, causal, scale):
    """Every head through SDPA, then gated: out[t, h] = g[t, h] * attention head h at t."""
    H, Hkv = q.shape[2], k.shape[2]
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale,
        enable_gqa=H != Hkv,
    ).transpose(1, 2)
    gate = torch.zeros(q.shape[:3], device=q.device, dtype=head_weight.dtype)
    gate = gate.scatter(2, head_idx.long(), head_weight)
    return o * gate.unsqueeze(-1).to(o.dtype)


def moh_case(active: float, *, H: int, B: int, L: int, D: int, causal: bool, dtype, device: str, mode: str,
             cfg: SuiteConfig | None = None, Hkv: int | None = None) -> Case:
    Hkv = Hkv or H
    K = max(1, round(active * H))
    scale = D**-0.5
    cfg = cfg or SuiteConfig(device=device, dtype=dtype)

    def make_inputs(requires_grad: bool):
        g = _gen(case.seed)
        inp = {
            "q": _randn((B, L, H, D), g, device, dtype, requires_grad),
            "k": _randn((B, L, Hkv, D), g, device, dtype, requires_grad),
            "v": _randn((B, L, Hkv, D), g, device, dtype, requires_grad),
            "scale": scale,
        }
        idx, w = _selection(B, L, H, K, g, device)
        inp["head_idx"] = idx
        inp["head_weight"] = w.requires_grad_(requires_grad)
        return inp

    def op_make(inp):
        ak = attnkit_module()
        a = (inp["q"], inp["k"], inp["v"], inp["head_idx"], inp["head_weight"])
        return lambda: ak.mixture_of_heads_attention(*a, causal=causal, scale=scale)

    def dense_make(inp):
        a = (inp["q"], inp["k"], inp["v"], inp["head_idx"], inp["head_weight"])
        return lambda: dense_moh(*a, causal, scale)

    def oracle_available():
        try:
            from attnkit import reference
        except Exception as e:
            return f"attnkit.reference not importable ({type(e).__name__})"
        if not hasattr(reference, "mixture_of_heads_attention_ref"):
            return "attnkit.reference.mixture_of_heads_attention_ref missing"
        if B * H * L * L > (1 << 24):
            return "float64 oracle used for small cases only"
        return None

    def oracle_make(inp):
        from attnkit import reference

        a = (inp["q"], inp["k"], inp["v"], inp["head_idx"], inp["head_weight"])
        return lambda: reference.mixture_of_heads_attention_ref(*a, causal=causal, scale=scale)

    impls = [
        Impl("attnkit", "attnkit", op_make),
        Impl("reference-fp64", "oracle", oracle_make, available=oracle_available,
             note="attnkit.reference in float64 (gate only)"),
        Impl("dense-moh", "baseline", dense_make, flops_kind="dense",
             note="all heads through SDPA, then masked (public MoH code)"),
    ]
    # plain MHA: every head, no gate (a different function: timed, not compared)
    def mha_make(inp):
        q, k, v = inp["q"], inp["k"], inp["v"]
        return lambda: bl.sdpa_attention(q, k, v, causal=causal, scale=scale, native_gqa=Hkv != H)

    impls.append(Impl("mha-sdpa", "baseline", mha_make, comparable=False, flops_kind="dense",
                      note="plain MHA, all heads, torch SDPA"))

    pairs = causal_pairs(L, L, causal)

    def flops(inp):
        return 4.0 * B * K * D * pairs, 4.0 * B * H * D * pairs

    label = f"{round(100 * K / H)}% active {K}/{H}" + (" causal" if causal else "")
    case = Case("moh", label, L, mode, dtype, device,
                {"B": B, "L": L, "H": H, "Hkv": Hkv, "K": K, "D": D, "causal": causal},
                make_inputs, ("q", "k", "v", "head_weight"), impls, flops,
                tags={"family": f"{round(100 * K / H)}%", "dense_eq": f"MHA {H}/{H}"})
    return case


@register("moh", "Mixture-of-Head attention", ("mixture_of_heads_attention",))
def moh_cases(cfg: SuiteConfig) -> list[Case]:
    H = cfg.heads or (32 if cfg.gpu else 8)
    D = cfg.head_dim or (128 if cfg.gpu else 64)
    Ls = seqlens(cfg, gpu=[2048, 8192, 32768], cpu=[512, 2048], gpu_quick=[2048, 8192], cpu_quick=[256, 512])
    fracs = [0.5, 0.75, 0.9] if cfg.gpu else [0.25, 0.5, 1.0]
    out = []
    for frac in fracs:
        for L in Ls:
            B = cfg.batch or (max(1, 32768 // L) if cfg.gpu else 1)
            for mode in cfg.modes:
                out.append(moh_case(frac, H=H, B=B, L=L, D=D, causal=True, dtype=cfg.dtype, device=cfg.device,
                                    mode=mode, cfg=cfg))
    return out


def moh_perf_cases(device: str = "cuda", dtype=torch.bfloat16) -> list[Case]:
    """The GPU performance cases: Hq = 32, D = 128, 50 / 75 / 90% active, L 2k-32k (B * L = 32k
    tokens), causal, fwd and fwd+bwd."""
    cfg = SuiteConfig(device=device, dtype=dtype)
    return [
        moh_case(frac, H=32, B=max(1, 32768 // L), L=L, D=128, causal=True, dtype=dtype, device=device, mode=mode,
                 cfg=cfg)
        for frac in (0.5, 0.75, 0.9)
        for L in (2048, 4096, 8192, 16384, 32768)
        for mode in MODES
    ]
