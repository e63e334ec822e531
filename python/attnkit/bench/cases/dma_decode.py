"""Benchmark cases of Dynamic Mask Attention's KV-cache decode (``dynamic_mask_attention_with_kvcache``).

B = 1 and 8, one new query token per step (no append: the step reads the cache as it is), keep = 256
of the valid keys, forward only. Caches of 4k valid keys on CPU, 4k to 32k on GPU. As for SQA's
decode, ``params["kv_bytes"]`` is the K/V bytes of the valid cache (what a dense step reads; the
kept keys are a subset). Baselines: SDPA over the whole valid cache (dense attention, a different
function, so it is timed but not compared) and plain-PyTorch DMA on the valid slice (the same
function: the gate compares it).
"""

from __future__ import annotations

from . import Case, Impl, SuiteConfig, _elt, attnkit_module, decode_batches, decode_inputs, register, seqlens
from .. import baselines as bl

KEEP = 256


def dma_decode_case(*, B: int, Lk: int, Hq: int, Hkv: int, D: int, keep: int, dtype, device: str,
                    cfg: SuiteConfig | None = None) -> Case:
    cfg = cfg or SuiteConfig(device=device, dtype=dtype)
    scale = D ** -0.5

    def make_inputs(requires_grad: bool):
        return decode_inputs(case.seed, B=B, Lk=Lk, Hq=Hq, Hkv=Hkv, D=D, device=device, dtype=dtype, bias=True)

    def op_make(inp):
        ak = attnkit_module()
        q, kc, vc, bc, cs = inp["q"], inp["k_cache"], inp["v_cache"], inp["bias_cache"], inp["cache_seqlens"]
        return lambda: ak.dynamic_mask_attention_with_kvcache(q, kc, vc, bc, cache_seqlens=cs, keep=keep, causal=True,
                                                              scale=scale)

    def eager_make(inp):
        q, kc, vc, bc = inp["q"], inp["k_cache"][:, :Lk], inp["v_cache"][:, :Lk], inp["bias_cache"][:, :, :Lk]
        return lambda: bl.dma_eager(q, kc, vc, bc, keep=keep, causal=True, scale=scale)

    def sdpa_make(inp):
        q, kc, vc = inp["q"], inp["k_cache"][:, :Lk], inp["v_cache"][:, :Lk]
        return lambda: bl.sdpa_attention(q, kc, vc, causal=False, scale=scale)

    impls = [
        Impl("attnkit", "attnkit", op_make),
        Impl("torch-eager", "baseline", eager_make, note="plain PyTorch DMA on the valid cache slice"),
        Impl("sdpa", "baseline", sdpa_make, comparable=False,
             note="dense SDPA over the whole valid cache (no selection: a different function)"),
    ]
    kv_bytes = 2 * B * Lk * Hkv * D * _elt(dtype)

    def flops(inp):
        # the kept keys only, and the dense step's count for comparison
        return 4.0 * B * max(Hq, Hkv) * D * min(keep, Lk), 4.0 * B * max(Hq, Hkv) * D * Lk

    case = Case("dma-decode", f"dma decode {Hq}/{Hkv} keep{keep}", Lk, "fwd", dtype, device,
                {"B": B, "L": Lk, "Hq": Hq, "Hkv": Hkv, "D": D, "keep": keep, "kv_bytes": kv_bytes},
                make_inputs, (), impls, flops,
                tags={"family": "decode", "metric": "HBM GB/s = kv_bytes / time"})
    return case


@register("dma-decode", "DMA KV-cache decode", ("dynamic_mask_attention_with_kvcache",))
def dma_decode_cases(cfg: SuiteConfig) -> list[Case]:
    D = cfg.head_dim or (128 if cfg.gpu else 64)
    Ls = seqlens(cfg, gpu=[4096, 16384, 32768], cpu=[4096], gpu_quick=[4096, 32768], cpu_quick=[4096])
    return [dma_decode_case(B=B, Lk=Lk, Hq=32, Hkv=8, D=D, keep=KEEP, dtype=cfg.dtype, device=cfg.device, cfg=cfg)
            for B in decode_batches(cfg) for Lk in Ls]
