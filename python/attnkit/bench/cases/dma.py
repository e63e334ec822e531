"""Benchmark cases of Dynamic Mask Attention."""

from __future__ import annotations

import torch

from . import (
    attnkit_module, Case, Impl, MODES, SuiteConfig, _gen, _randn, bl, causal_pairs,
    kept_pairs, register, sdpa_impls, seqlens, _elt,
)


def dma_case(*, B, L, H, Hkv, D, keep, causal, dtype, device, mode, cfg=None) -> Case:
    scale = D ** -0.5
    cfg = cfg or SuiteConfig(device=device, dtype=dtype)
    elt = _elt(dtype)

    def make_inputs(requires_grad: bool):
        g = _gen(case.seed)
        return {
            "q": _randn((B, L, H, D), g, device, dtype, requires_grad),
            "k": _randn((B, L, Hkv, D), g, device, dtype, requires_grad),
            "v": _randn((B, L, Hkv, D), g, device, dtype, requires_grad),
            "bias": _randn((B, Hkv, L), g, device, torch.float32, requires_grad),
            "scale": scale,
        }

    def op_make(inp):
        ak = attnkit_module()
        q, k, v, bias = inp["q"], inp["k"], inp["v"], inp["bias"]
        return lambda: ak.dynamic_mask_attention(q, k, v, bias, keep=keep, causal=causal, scale=scale)

    def eager_make(inp):
        q, k, v, bias = inp["q"], inp["k"], inp["v"], inp["bias"]
        return lambda: bl.dma_eager(q, k, v, bias, keep=keep, causal=causal, scale=scale)

    def masked_mem(mode):
        return bl.dma_masked_sdpa_bytes(B, H, Hkv, L, L, elt, mode)

    def masked_make(inp):
        q, k, v, bias = inp["q"], inp["k"], inp["v"], inp["bias"]
        kept = bl.dma_dense_kept(bias, L, keep, causal)
        return lambda: bl.dma_masked_sdpa(q, k, v, bias, kept, scale=scale)

    def fdm_available():
        if device != "cuda":
            return "flash-dmattn needs CUDA"
        return bl.module_available("flash_dmattn")

    def fdm_make(inp):
        q, k, v, bias = inp["q"], inp["k"], inp["v"], inp["bias"]
        kept = bl.dma_dense_kept(bias, L, keep, causal)
        fn = bl.flash_dmattn_fn()
        return lambda: bl.flash_dmattn_attention(fn, q, k, v, bias, kept, causal=causal, scale=scale)

    impls = [
        Impl("attnkit", "attnkit", op_make),
        Impl("torch-eager", "baseline", eager_make, note="plain PyTorch, query blocks, O(block*L) memory"),
        Impl("sdpa-masked", "baseline", masked_make, mem_bytes=masked_mem,
             note="SDPA with a dense [B,H,L,L] float mask (mask built untimed)"),
        Impl("flash-dmattn", "baseline", fdm_make, available=fdm_available, mem_bytes=masked_mem),
    ]
    dense_backends = ("flash", "cudnn")
    for imp in sdpa_impls(cfg, dtype, H, Hkv, D, causal, comparable=False, backends=dense_backends,
                          flops_kind="dense", note="dense causal attention, no mask (timing only)"):
        impls.append(imp)

    pairs = kept_pairs(L, L, keep, causal)
    dense = causal_pairs(L, L, causal)

    def flops(inp):
        return 4.0 * B * H * D * pairs, 4.0 * B * H * D * dense

    case = Case("dma", f"{H}/{Hkv} keep={keep}" + (" causal" if causal else ""), L, mode, dtype, device,
                {"B": B, "L": L, "H": H, "Hkv": Hkv, "D": D, "keep": keep, "causal": causal},
                make_inputs, ("q", "k", "v", "bias"), impls, flops, tags={"dense_eq": "causal dense"})
    return case


@register("dma", "Dynamic Mask Attention", ("dynamic_mask_attention",))


def dma_cases(cfg: SuiteConfig) -> list[Case]:
    H = cfg.heads or (16 if cfg.gpu else 4)
    Hkv = max(1, H // 2)
    D = cfg.head_dim or (128 if cfg.gpu else 64)
    keep = 2048 if cfg.gpu else 128
    tokens = 32768 if cfg.gpu else 1
    Ls = seqlens(cfg, gpu=[1024, 4096, 16384, 32768, 65536], cpu=[256, 1024],
                 gpu_quick=[4096, 16384], cpu_quick=[128, 256])
    if cfg.quick and not cfg.gpu:
        keep = 64
    out = []
    for L in Ls:
        B = cfg.batch or max(1, tokens // L)
        for mode in cfg.modes:
            out.append(dma_case(B=B, L=L, H=H, Hkv=Hkv, D=D, keep=keep, causal=True, dtype=cfg.dtype,
                                device=cfg.device, mode=mode, cfg=cfg))
    if not cfg.gpu and not cfg.quick and not cfg.seqlens:  # the CPU target: L=2048, keep=256 vs dense SDPA
        out += [dma_case(B=cfg.batch or 1, L=2048, H=H, Hkv=Hkv, D=D, keep=256, causal=True, dtype=cfg.dtype,
                         device=cfg.device, mode=mode, cfg=cfg) for mode in cfg.modes]
    return out


def dma_perf_cases(device: str = "cuda", dtype=torch.bfloat16) -> list[Case]:
    """The GPU performance cases: bf16, H=16, Hkv=8, D=128, causal, keep=2048, B=1, fwd and fwd+bwd."""
    cfg = SuiteConfig(device=device, dtype=dtype)
    return [dma_case(B=1, L=L, H=16, Hkv=8, D=128, keep=2048, causal=True, dtype=dtype, device=device, mode=m,
                     cfg=cfg)
            for L in (1024, 4096, 16384, 32768, 65536) for m in MODES]
