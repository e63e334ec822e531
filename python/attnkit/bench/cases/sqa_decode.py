"""Benchmark cases of SQA's KV-cache decode and of its varlen (packed sequences) entry.

Decode: B = 1 and 8, one new query token per step, caches of 4k to 128k valid keys, forward only.
The figure of merit is HBM bandwidth: the K/V bytes the step must read (``params["kv_bytes"]``)
divided by its time. Baselines: SDPA on the same valid cache slice, and ``flash_attn_with_kvcache``
when flash_attn is installed.

Varlen: sequences of mixed lengths packed into one [total, H, D] tensor against SDPA on the padded
[B, max_len, H, D] batch (the work padding wastes is what varlen saves).
"""

from __future__ import annotations

import torch

from . import (Case, Impl, SuiteConfig, _elt, _gen, _randn, attnkit_module, decode_batches, decode_inputs, register,
               seqlens)
from .. import baselines as bl


def decode_case(*, B: int, Lk: int, Hq: int, Hkv: int, D: int, dtype, device: str,
                cfg: SuiteConfig | None = None) -> Case:
    cfg = cfg or SuiteConfig(device=device, dtype=dtype)
    scale = D ** -0.5

    def make_inputs(requires_grad: bool):
        return decode_inputs(case.seed, B=B, Lk=Lk, Hq=Hq, Hkv=Hkv, D=D, device=device, dtype=dtype)

    def op_make(inp):
        ak = attnkit_module()
        q, kc, vc, cs = inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"]
        return lambda: ak.sparse_query_attention_with_kvcache(q, kc, vc, cache_seqlens=cs, causal=True, scale=scale)

    def sdpa_make(inp):
        q, kc, vc = inp["q"], inp["k_cache"][:, :Lk], inp["v_cache"][:, :Lk]
        return lambda: bl.sdpa_attention(q, kc, vc, causal=False, scale=scale)

    def fa_available():
        return bl.module_available("flash_attn") if device == "cuda" else "CUDA only"

    def fa_make(inp):
        from flash_attn import flash_attn_with_kvcache

        q, kc, vc, cs = inp["q"], inp["k_cache"], inp["v_cache"], inp["cache_seqlens"]
        return lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cs, causal=True, softmax_scale=scale)

    impls = [
        Impl("attnkit", "attnkit", op_make),
        Impl("sdpa", "baseline", sdpa_make, note="SDPA (torch's choice of backend) on the valid cache slice"),
        Impl("flash-attn-kvcache", "baseline", fa_make, available=fa_available),
    ]
    kv_bytes = 2 * B * Lk * Hkv * D * _elt(dtype)

    def flops(inp):
        return 4.0 * B * max(Hq, Hkv) * D * Lk, None

    case = Case("sqa-decode", f"decode {Hq}/{Hkv}", Lk, "fwd", dtype, device,
                {"B": B, "L": Lk, "Hq": Hq, "Hkv": Hkv, "D": D, "kv_bytes": kv_bytes},
                make_inputs, (), impls, flops,
                tags={"family": "decode", "metric": "HBM GB/s = kv_bytes / time"})
    return case


@register("sqa-decode", "SQA KV-cache decode", ("sparse_query_attention_with_kvcache",))
def decode_cases(cfg: SuiteConfig) -> list[Case]:
    D = cfg.head_dim or (128 if cfg.gpu else 64)
    Ls = seqlens(cfg, gpu=[4096, 16384, 32768, 65536, 131072], cpu=[4096], gpu_quick=[4096, 32768], cpu_quick=[4096])
    return [decode_case(B=B, Lk=Lk, Hq=32, Hkv=8, D=D, dtype=cfg.dtype, device=cfg.device, cfg=cfg)
            for B in decode_batches(cfg) for Lk in Ls]


def varlen_case(*, lengths: list[int], H: int, Hkv: int, D: int, mode: str, dtype, device: str,
                cfg: SuiteConfig | None = None) -> Case:
    cfg = cfg or SuiteConfig(device=device, dtype=dtype)
    scale = D ** -0.5
    B, total, lmax = len(lengths), sum(lengths), max(lengths)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)

    def make_inputs(requires_grad: bool):
        g = _gen(case.seed)
        q = _randn((total, H, D), g, device, dtype, requires_grad)
        k = _randn((total, Hkv, D), g, device, dtype, requires_grad)
        v = _randn((total, Hkv, D), g, device, dtype, requires_grad)
        return {"q": q, "k": k, "v": v, "scale": scale,
                "cu": torch.tensor(cu, dtype=torch.int32, device=device)}

    def op_make(inp):
        ak = attnkit_module()
        q, k, v, c = inp["q"], inp["k"], inp["v"], inp["cu"]
        return lambda: ak.sparse_query_attention_varlen(q, k, v, c, c, lmax, lmax, causal=True, scale=scale)

    def padded_make(inp):
        # pad into [B, lmax, H, D] inside the timed call (what a padded pipeline pays), causal SDPA,
        # then gather the real rows back
        q, k, v = inp["q"], inp["k"], inp["v"]
        idx = torch.cat([torch.arange(n, device=device) + b * lmax for b, n in enumerate(lengths)])

        def pad(x):
            out = x.new_zeros((B * lmax,) + tuple(x.shape[1:]))
            return out.index_copy(0, idx, x).view(B, lmax, *x.shape[1:])

        def run():
            o = bl.sdpa_attention(pad(q), pad(k), pad(v), causal=True, scale=scale)
            return o.reshape(B * lmax, *o.shape[2:]).index_select(0, idx)

        return run

    impls = [Impl("attnkit", "attnkit", op_make),
             Impl("sdpa-padded", "baseline", padded_make, note="SDPA on the zero-padded batch")]
    pairs = sum(n * (n + 1) // 2 for n in lengths)

    def flops(inp):
        return 4.0 * H * D * pairs, 4.0 * H * D * B * lmax * (lmax + 1) / 2

    case = Case("sqa-varlen", f"varlen {H}/{Hkv} B{B}", lmax, mode, dtype, device,
                {"B": B, "L": lmax, "total": total, "H": H, "Hkv": Hkv, "D": D},
                make_inputs, ("q", "k", "v"), impls, flops, tags={"family": "varlen"})
    return case


@register("sqa-varlen", "SQA varlen (packed sequences)", ("sparse_query_attention_varlen",))
def varlen_cases(cfg: SuiteConfig) -> list[Case]:
    D = cfg.head_dim or (128 if cfg.gpu else 64)
    # mixed lengths: a few long documents among many short ones
    mixes = ([[8192, 512, 4096, 128, 2048, 1024, 16384, 256] if cfg.gpu else [512, 64, 256, 32, 128]]
             if not cfg.quick else [[2048, 128, 1024, 64] if cfg.gpu else [256, 32, 128]])
    return [varlen_case(lengths=m, H=16 if cfg.gpu else 4, Hkv=4 if cfg.gpu else 2, D=D, mode=mode, dtype=cfg.dtype,
                        device=cfg.device, cfg=cfg) for m in mixes for mode in cfg.modes]
