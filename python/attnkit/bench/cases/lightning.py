"""Benchmark cases of lightning attention."""

from __future__ import annotations

import torch

from . import (
    attnkit_module, Case, Impl, MODES, SuiteConfig, _gen, _randn, bl, causal_pairs,
    register, sdpa_impls, seqlens,
)


LIGHTNING_CHUNK = 64  # block size assumed by the FLOP count


def lightning_case(*, B, L, H, D, dtype, device, mode, cfg=None) -> Case:
    scale = D ** -0.5  # flash-linear-attention's convention, keeps outputs O(1) for the comparison
    cfg = cfg or SuiteConfig(device=device, dtype=dtype)

    def slopes():
        ak = attnkit_module()
        if hasattr(ak, "lightning_slopes"):
            return torch.as_tensor(ak.lightning_slopes(H), dtype=torch.float32).to(device)
        return bl.lightning_slopes(H).to(device)

    def make_inputs(requires_grad: bool):
        g = _gen(case.seed)
        return {
            "q": _randn((B, L, H, D), g, device, dtype, requires_grad),
            "k": _randn((B, L, H, D), g, device, dtype, requires_grad),
            "v": _randn((B, L, H, D), g, device, dtype, requires_grad),
            "slopes": slopes(),
            "scale": scale,
        }

    def op_make(inp):
        ak = attnkit_module()
        q, k, v, s = inp["q"], inp["k"], inp["v"], inp["slopes"]
        def run():
            out = ak.lightning_attention(q, k, v, s, scale=scale)
            return out[0] if isinstance(out, (tuple, list)) else out  # (o, final_state)

        return run

    def eager_make(inp):
        q, k, v, s = inp["q"], inp["k"], inp["v"], inp["slopes"]
        return lambda: bl.lightning_eager(q, k, v, s, scale=scale)

    def fla_available():
        if device != "cuda":
            return "flash-linear-attention needs CUDA"
        return bl.module_available("fla.ops.simple_gla")

    def fla_make(inp):
        q, k, v, s = inp["q"], inp["k"], inp["v"], inp["slopes"]
        return lambda: bl.fla_simple_gla(q, k, v, s, scale=scale)

    impls = [
        Impl("attnkit", "attnkit", op_make),
        Impl("torch-eager", "baseline", eager_make, note="plain PyTorch, chunked, fp32 state"),
        Impl("fla-simple-gla", "baseline", fla_make, available=fla_available,
             note="flash-linear-attention chunk_simple_gla"),
    ]
    dense_backends = ("flash", "cudnn")
    impls += sdpa_impls(cfg, dtype, H, H, D, True, comparable=False, backends=dense_backends, flops_kind="dense",
                        note="causal softmax attention (timing only)")

    c = LIGHTNING_CHUNK

    def flops(inp):
        per_token = c * (D + D) + 4.0 * D * D
        return B * H * L * per_token, 4.0 * B * H * D * causal_pairs(L, L, True)

    case = Case("lightning", f"H={H}", L, mode, dtype, device, {"B": B, "L": L, "H": H, "D": D},
                make_inputs, ("q", "k", "v"), impls, flops, tags={"dense_eq": "causal softmax attention"})
    return case


@register("lightning", "Lightning attention", ("lightning_attention",))


def lightning_cases(cfg: SuiteConfig) -> list[Case]:
    H = cfg.heads or (32 if cfg.gpu else 4)
    D = cfg.head_dim or (128 if cfg.gpu else 64)
    B = cfg.batch or (4 if cfg.gpu else 1)
    Ls = seqlens(cfg, gpu=[2048, 4096, 8192, 16384, 32768, 65536], cpu=[256, 1024],
                 gpu_quick=[2048, 8192], cpu_quick=[128, 256])
    out = [lightning_case(B=B, L=L, H=H, D=D, dtype=cfg.dtype, device=cfg.device, mode=m, cfg=cfg)
           for L in Ls for m in cfg.modes]
    if not cfg.gpu and not cfg.quick and not cfg.seqlens:  # the CPU target: L=4096, H=8 vs torch-eager
        out += [lightning_case(B=B, L=4096, H=cfg.heads or 8, D=D, dtype=cfg.dtype, device=cfg.device, mode=m,
                               cfg=cfg) for m in cfg.modes]
    return out


def lightning_perf_cases(device: str = "cuda", dtype=torch.bfloat16) -> list[Case]:
    """The GPU performance cases: bf16, B=4, H=32, D=128, L 2k..64k, fwd and fwd+bwd."""
    cfg = SuiteConfig(device=device, dtype=dtype)
    return [lightning_case(B=4, L=L, H=32, D=128, dtype=dtype, device=device, mode=m, cfg=cfg)
            for L in (2048, 4096, 8192, 16384, 32768, 65536) for m in MODES]
