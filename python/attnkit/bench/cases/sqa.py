"""Benchmark cases of Sparse Query Attention."""

from __future__ import annotations

import torch

from . import (
    attnkit_module, Case, Impl, MODES, SuiteConfig, _gen, _randn, bl, causal_pairs,
    register, sdpa_impls, seqlens, _elt,
)

# (query heads, kv heads) as fractions of H, from the SQA paper's variants


SQA_VARIANTS = {
    "mha": (1, 1),
    "gqa": (1, 1 / 4),
    "mqa": (1, 0),
    "sqa": (1 / 2, 1 / 4),
    "ssqa": (1 / 2, 1 / 2),
    "xsqa": (1 / 4, 1 / 4),
    "xsmqa": (1 / 4, 0),
    "rsqa": (1 / 4, 1 / 2),
}


def sqa_heads(variant: str, h: int) -> tuple[int, int]:
    fq, fk = SQA_VARIANTS[variant]
    return max(1, int(h * fq)), max(1, int(h * fk))


def sqa_case(variant: str, *, H: int, B: int, L: int, D: int, causal: bool, dtype, device: str, mode: str,
             cfg: SuiteConfig | None = None) -> Case:
    hq, hkv = sqa_heads(variant, H)
    hout = max(hq, hkv)
    scale = D ** -0.5
    cfg = cfg or SuiteConfig(device=device, dtype=dtype)
    elt = _elt(dtype)
    rg_names = ("q", "k", "v")

    def make_inputs(requires_grad: bool):
        g = _gen(case.seed)
        return {
            "q": _randn((B, L, hq, D), g, device, dtype, requires_grad),
            "k": _randn((B, L, hkv, D), g, device, dtype, requires_grad),
            "v": _randn((B, L, hkv, D), g, device, dtype, requires_grad),
            "scale": scale,
        }

    def op_make(inp):
        ak = attnkit_module()
        q, k, v = inp["q"], inp["k"], inp["v"]
        return lambda: ak.sparse_query_attention(q, k, v, causal=causal, scale=scale)

    def oracle_available():
        try:
            from attnkit import reference
        except Exception as e:
            return f"attnkit.reference not importable ({type(e).__name__})"
        if not hasattr(reference, "sqa_reference"):
            return "attnkit.reference.sqa_reference missing"
        if B * hout * L * L > (1 << 24):
            return "float64 oracle used for small cases only"
        return None

    def oracle_make(inp):
        from attnkit import reference

        q, k, v = inp["q"], inp["k"], inp["v"]
        return lambda: reference.sqa_reference(q.double(), k.double(), v.double(), causal, scale)

    def eager_make(inp):
        q, k, v = inp["q"], inp["k"], inp["v"]
        return lambda: bl.eager_attention(q, k, v, causal=causal, scale=scale)

    def dense_mem(mode):
        return bl.eager_attention_bytes(B, hout, L, L, elt, mode)

    impls = [
        Impl("attnkit", "attnkit", op_make),
        Impl("reference-fp64", "oracle", oracle_make, available=oracle_available,
             note="attnkit.reference in float64 (gate only)"),
    ]
    for imp in sdpa_impls(cfg, dtype, hq, hkv, D, causal, comparable=True):
        if imp.name == "sdpa-math":
            imp.mem_bytes = dense_mem
        impls.append(imp)
    if device == "cuda":
        def fa_available():
            return bl.module_available("flash_attn")

        def fa_make(inp):
            from flash_attn import flash_attn_func

            q, k, v = inp["q"], inp["k"], inp["v"]
            if hkv > hq:
                q = q.repeat_interleave(hkv // hq, dim=2)
            return lambda: flash_attn_func(q, k, v, causal=causal, softmax_scale=scale)

        impls.append(Impl("flash-attn", "baseline", fa_make, available=fa_available))
    impls.append(Impl("torch-eager", "baseline", eager_make, mem_bytes=dense_mem,
                      note="plain PyTorch, scores materialised"))

    pairs = causal_pairs(L, L, causal)

    def flops(inp):
        return 4.0 * B * hout * D * pairs, 4.0 * B * H * D * pairs

    label = f"{variant} {hq}/{hkv}" + (" causal" if causal else "")
    case = Case("sqa", label, L, mode, dtype, device,
                {"B": B, "L": L, "H": H, "Hq": hq, "Hkv": hkv, "D": D, "causal": causal},
                make_inputs, rg_names, impls, flops,
                tags={"family": variant, "dense_eq": f"MHA {H}/{H}"})
    return case


@register("sqa", "Sparse Query Attention", ("sparse_query_attention",))


def sqa_cases(cfg: SuiteConfig) -> list[Case]:
    H = cfg.heads or (16 if cfg.gpu else 8)
    D = cfg.head_dim or (128 if cfg.gpu else 64)
    tokens = 32768 if cfg.gpu else 1  # GPU: B*L = 32k tokens; CPU: B = 1
    Ls = seqlens(cfg, gpu=[1024, 4096, 16384, 32768, 65536], cpu=[256, 1024, 2048],
                 gpu_quick=[1024, 4096], cpu_quick=[128, 256])
    variants = ["mha", "sqa", "xsqa"] if cfg.gpu and not cfg.quick else ["mha", "xsqa"]
    out = []
    for variant in variants:
        for L in Ls:
            B = cfg.batch or max(1, tokens // L)
            for mode in cfg.modes:
                out.append(sqa_case(variant, H=H, B=B, L=L, D=D, causal=True, dtype=cfg.dtype,
                                    device=cfg.device, mode=mode, cfg=cfg))
    return out


def sqa_perf_cases(device: str = "cuda", dtype=torch.bfloat16) -> list[Case]:
    """The GPU performance cases: bf16, D=128, B*L = 32k tokens, MHA 16/16 vs xSQA 4/4, fwd and fwd+bwd."""
    cfg = SuiteConfig(device=device, dtype=dtype)
    out = []
    for causal in (False, True):
        for variant in ("mha", "xsqa"):
            for L in (4096, 8192, 16384, 32768):
                for mode in MODES:
                    out.append(sqa_case(variant, H=16, B=max(1, 32768 // L), L=L, D=128, causal=causal,
                                        dtype=dtype, device=device, mode=mode, cfg=cfg))
    return out
