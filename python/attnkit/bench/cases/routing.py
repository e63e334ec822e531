"""Benchmark cases of routing attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import (
    attnkit_module, Case, Impl, SuiteConfig, _gen, _randn, bl, causal_pairs,
    register, sdpa_impls, seqlens,
)


def routing_case(*, B, L, H, D, dtype, device, mode, clusters=None, cfg=None) -> Case:
    C = clusters or max(1, int(round(math.sqrt(L))))
    w = max(1, L // C)
    scale = D ** -0.5
    causal, shared = True, True
    cfg = cfg or SuiteConfig(device=device, dtype=dtype)
    state: dict = {}

    def make_inputs(requires_grad: bool):
        g = _gen(case.seed)
        cent = F.normalize(torch.randn(H, C, D, generator=g), dim=-1).to(device)
        return {
            "q": _randn((B, L, H, D), g, device, dtype, requires_grad),
            "v": _randn((B, L, H, D), g, device, dtype, requires_grad),
            "centroids": cent,
            "scale": scale,
        }

    def op_assign(q, k, cent):
        ak = attnkit_module()
        if state.get("cent_dtype") is None:
            try:
                out = ak.routing_assign(q, k, cent, cluster_size=w, shared_qk=shared)
                state["cent_dtype"] = cent.dtype
                return out
            except (TypeError, ValueError, RuntimeError):
                state["cent_dtype"] = q.dtype  # the op may want centroids at the input dtype
        return ak.routing_assign(q, k, cent.to(state["cent_dtype"]), cluster_size=w, shared_qk=shared)

    def op_make(inp):
        ak = attnkit_module()
        q, v, cent = inp["q"], inp["v"], inp["centroids"]
        given = inp.get("q_idx"), inp.get("k_idx")

        def run():
            k = F.normalize(q, dim=-1)  # shared QK: keys are the normalised queries
            qi, ki = given if given[0] is not None else op_assign(q.detach(), k.detach(), cent)
            return ak.routing_attention(q, k, v, qi, ki, causal=causal, shared_qk=shared, scale=scale)

        return run

    def eager_make(inp):
        q, v, cent = inp["q"], inp["v"], inp["centroids"]
        given = inp.get("q_idx"), inp.get("k_idx")

        def run():
            k = F.normalize(q, dim=-1)
            qi, ki = given if given[0] is not None else bl.routing_assign_eager(q, k, cent, cluster_size=w,
                                                                                shared_qk=shared)
            return bl.routing_attention_eager(q, k, v, qi, ki, causal=causal, shared_qk=shared, scale=scale)

        return run

    def rt_available():
        return bl.module_available("routing_transformer")

    def rt_make(inp):
        q, v = inp["q"], inp["v"]
        run = bl.routing_transformer_module(C, w, H, D, causal, device)
        return lambda: run(q, v)

    def gate_prepare(inp):
        """Routing is checked in two steps: attnkit.routing_assign against top-w + sort, then the
        attention of both on attnkit's own indices (so a near-tie cannot fail the attention check)."""
        q, cent = inp["q"].detach(), inp["centroids"]
        k = F.normalize(q, dim=-1)
        with torch.no_grad():
            qi, ki = op_assign(q, k, cent)
            rq, rk = bl.routing_assign_eager(q, k, cent, cluster_size=w, shared_qk=shared)
        checks = {}
        if tuple(qi.shape) != tuple(rq.shape) or tuple(ki.shape) != tuple(rk.shape):
            checks["routing_assign"] = {"ok": False, "detail": f"index shape {tuple(qi.shape)} != {tuple(rq.shape)}"}
        else:
            mism = float((qi.long() != rq).float().mean().item()) if rq.numel() else 0.0
            mism_k = float((ki.long() != rk).float().mean().item()) if rk.numel() else 0.0
            tol = 1e-3 if dtype == torch.float32 else 2e-2
            m = max(mism, mism_k)
            checks["routing_assign"] = {"ok": m <= tol, "mismatch": m, "tol": tol,
                                        "detail": f"{m:.2%} of routed slots differ from top-w"}
        return {"q_idx": qi, "k_idx": ki}, checks

    impls = [
        Impl("attnkit", "attnkit", op_make, note="routing_assign + routing_attention"),
        Impl("torch-eager", "baseline", eager_make, note="plain PyTorch: top-w + gathered clusters"),
        Impl("routing-transformer", "baseline", rt_make, available=rt_available, comparable=False,
             note="routing-transformer KmeansAttention (own routing; timing only)"),
    ]
    dense_backends = ("flash", "cudnn")
    impls += sdpa_impls(cfg, dtype, H, H, D, True, comparable=False, backends=dense_backends, flops_kind="dense",
                        note="dense causal attention (timing only)")

    def flops(inp):
        qi, ki = inp.get("q_idx"), inp.get("k_idx")
        if qi is None:
            q = inp["q"].detach()
            qi, ki = bl.routing_assign_eager(q, F.normalize(q, dim=-1), inp["centroids"], cluster_size=w, shared_qk=shared)
        pairs = bl.routing_pairs(qi, ki, causal)
        assign = 2.0 * B * H * L * C * D * (1 if shared else 2)
        return 4.0 * D * pairs + assign, 4.0 * B * H * D * causal_pairs(L, L, True)

    case = Case("routing", f"H={H} C={C} w={w}", L, mode, dtype, device,
                {"B": B, "L": L, "H": H, "D": D, "C": C, "w": w, "causal": causal, "shared_qk": shared},
                make_inputs, ("q", "v"), impls, flops, gate_prepare=gate_prepare,
                tags={"dense_eq": "causal dense"})
    return case


@register("routing", "Routing attention", ("routing_assign", "routing_attention"))


def routing_cases(cfg: SuiteConfig) -> list[Case]:
    H = cfg.heads or (8 if cfg.gpu else 4)
    D = cfg.head_dim or 64
    B = cfg.batch or 1
    Ls = seqlens(cfg, gpu=[4096, 16384, 65536], cpu=[256, 1024, 2048], gpu_quick=[4096, 16384],
                 cpu_quick=[128, 256])
    return [routing_case(B=B, L=L, H=H, D=D, dtype=cfg.dtype, device=cfg.device, mode=m, cfg=cfg)
            for L in Ls for m in cfg.modes]


def routing_perf_cases(device: str = "cuda", dtype=torch.bfloat16) -> list[Case]:
    """The GPU performance cases: bf16, B=1, H=8, D=64, causal, C=sqrt(L), w=L/C, fwd+bwd."""
    cfg = SuiteConfig(device=device, dtype=dtype)
    return [routing_case(B=1, L=L, H=8, D=64, dtype=dtype, device=device, mode="fwd+bwd", cfg=cfg)
            for L in (4096, 16384, 65536)]
