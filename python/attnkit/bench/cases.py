"""The benchmark suite: one registry of cases shared by the CLI (``python -m attnkit.bench``) and the
pytest-benchmark files in ``bench/``.

A *case* is one problem (mechanism, shape, dtype, device, mode) with a list of *impls*: the attnkit
op first, then the baselines. Each mechanism registers a builder that is used only when the attnkit
functions it needs exist, so the suite runs whatever subset of the ops this build has.

Nothing here allocates device memory at import or at case construction: inputs are made by
``Case.make_inputs`` when the case runs.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import baselines as bl

MODES = ("fwd", "fwd+bwd")
BWD_FACTOR = 2.5
CUDA_ONLY_SDPA = ("cudnn", "efficient")  # backward FLOPs / forward FLOPs (FlashAttention's convention: 5 matmuls vs 2)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def attnkit_module():
    import attnkit

    return attnkit


# ----------------------------------------------------------------------------------------------
# data model
# ----------------------------------------------------------------------------------------------


@dataclass
class Impl:
    """One way of computing a case.

    ``make(inputs)`` does the untimed set-up and returns a zero-argument callable that runs the
    forward and returns the output the gate compares. The runner adds the backward in fwd+bwd mode.
    """

    name: str
    kind: str  # "attnkit" | "baseline" | "oracle" (oracle: gate only, never timed)
    make: Callable[[dict], Callable[[], torch.Tensor]]
    comparable: bool = True  # computes the same function as the op, so the gate checks it
    available: Callable[[], str | None] | None = None  # None when usable, else a one-line reason
    mem_bytes: Callable[[str], int] | None = None  # estimated extra memory for a mode
    flops_kind: str = "op"  # which FLOP count its TFLOP/s uses: "op" (the mechanism's) or "dense"
    note: str = ""

    @property
    def timed(self) -> bool:
        return self.kind != "oracle"


@dataclass
class Case:
    op: str
    variant: str  # e.g. "xsqa 4/4 causal"
    L: int
    mode: str  # "fwd" | "fwd+bwd"
    dtype: torch.dtype
    device: str
    params: dict  # JSON-able shape parameters (B, L, heads, D, ...)
    make_inputs: Callable[[bool], dict]  # requires_grad -> tensors (deterministic per case)
    grad_names: tuple[str, ...]  # inputs that get gradients in fwd+bwd
    impls: list[Impl]
    flops: Callable[[dict], tuple[float, float | None]]  # inputs -> (forward FLOPs, dense-equivalent or None)
    bwd_factor: float = BWD_FACTOR
    # optional hook run before the gate: (inputs) -> (extra inputs for the gate, extra checks).
    gate_prepare: Callable[[dict], tuple[dict, dict]] | None = None
    tags: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        p = self.params
        return (f"{self.op}|{self.variant}|B{p.get('B')}|L{self.L}|D{p.get('D')}|"
                f"{DTYPE_NAMES.get(self.dtype, str(self.dtype))}|{self.device}|{self.mode}")

    @property
    def seed(self) -> int:
        # the same inputs for both modes and across runs
        return zlib.crc32(self.id.rsplit("|", 1)[0].encode())

    def impl(self, name: str) -> Impl:
        for i in self.impls:
            if i.name == name:
                return i
        raise KeyError(name)

    def total_flops(self, inputs: dict) -> tuple[float, float | None]:
        fwd, dense = self.flops(inputs)
        f = 1.0 + (self.bwd_factor if self.mode == "fwd+bwd" else 0.0)
        return fwd * f, (dense * f if dense is not None else None)


@dataclass
class SuiteConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    seqlens: list[int] | None = None
    batch: int | None = None
    heads: int | None = None
    head_dim: int | None = None
    modes: tuple[str, ...] = MODES
    quick: bool = False

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"


@dataclass
class OpSpec:
    name: str
    title: str
    attrs: tuple[str, ...]  # attnkit functions the op's cases call
    build: Callable[[SuiteConfig], list[Case]]


REGISTRY: dict[str, OpSpec] = {}


def register(name: str, title: str, attrs: tuple[str, ...]):
    def deco(fn):
        REGISTRY[name] = OpSpec(name, title, attrs, fn)
        return fn

    return deco


def missing_attrs(name: str) -> list[str]:
    """attnkit functions op ``name`` needs that this build lacks."""
    ak = attnkit_module()
    return [a for a in REGISTRY[name].attrs if not hasattr(ak, a)]


def available_ops() -> list[str]:
    return [n for n in REGISTRY if not missing_attrs(n)]


def build_suite(cfg: SuiteConfig, ops: list[str] | None = None) -> tuple[list[Case], list[str]]:
    """The cases of ``ops`` (default: every op this build has) and one-line notes on what was left out."""
    notes = []
    names = list(REGISTRY) if ops is None else ops
    cases: list[Case] = []
    for n in names:
        if n not in REGISTRY:
            notes.append(f"{n}: unknown op (known: {', '.join(REGISTRY)})")
            continue
        miss = missing_attrs(n)
        if miss:
            notes.append(f"{n}: skipped, this attnkit build has no {', '.join('attnkit.' + m for m in miss)}")
            continue
        cases.extend(REGISTRY[n].build(cfg))
    return cases, notes


# ----------------------------------------------------------------------------------------------
# helpers shared by the builders
# ----------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(shape, gen, device, dtype, requires_grad=False, std=1.0):
    # generated on the CPU in fp32 so every device and dtype sees the same numbers
    t = torch.randn(*shape, generator=gen, dtype=torch.float32) * std
    t = t.to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def causal_pairs(lq: int, lk: int, causal: bool) -> int:
    """Number of (query, key) pairs attention computes, bottom-right aligned when causal."""
    if not causal:
        return lq * lk
    off = lk - lq
    return sum(min(max(i + off + 1, 0), lk) for i in range(lq))


def kept_pairs(lq: int, lk: int, keep: int, causal: bool) -> int:
    off = lk - lq
    total = 0
    for i in range(lq):
        vis = min(max(i + off + 1, 0), lk) if causal else lk
        total += min(vis, keep)
    return total


def seqlens(cfg: SuiteConfig, gpu: list[int], cpu: list[int], gpu_quick: list[int], cpu_quick: list[int]):
    if cfg.seqlens:
        return list(cfg.seqlens)
    if cfg.gpu:
        return gpu_quick if cfg.quick else gpu
    return cpu_quick if cfg.quick else cpu


def _elt(dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _free_bytes(device: str) -> int:
    if device == "cuda":
        try:
            return int(torch.cuda.mem_get_info()[0])
        except Exception:
            return 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def memory_budget(device: str) -> int:
    """Bytes an impl may use on top of the inputs before it is skipped as too big."""
    frac = 0.8 if device == "cuda" else 0.5
    return int(_free_bytes(device) * frac)


def sdpa_impls(cfg: SuiteConfig, dtype, hq, hkv, d, causal, *, comparable: bool, backends=bl.SDPA_BACKENDS,
               flops_kind="op", note="") -> list[Impl]:
    """One Impl per SDPA backend; availability is probed on a tiny problem when the case runs."""
    impls = []
    if cfg.device != "cuda":
        backends = [b for b in backends if b not in CUDA_ONLY_SDPA]  # not worth a "skipped" row on CPU
    for be in backends:
        state: dict = {}

        def available(be=be, state=state):
            reason, native = bl.probe_sdpa(be, cfg.device, dtype, hq, hkv, d, causal)
            state["native"] = native
            return reason

        def make(inp, be=be, state=state):
            native = state.get("native", True)
            q, v, scale = inp["q"], inp["v"], inp["scale"]
            if "k" in inp:
                k = inp["k"]
                return lambda: bl.sdpa_attention(q, k, v, causal=causal, scale=scale, backend=be, native_gqa=native)
            # shared-QK inputs (routing): the keys are the normalised queries, computed in the timed call
            return lambda: bl.sdpa_attention(q, F.normalize(q, dim=-1), v, causal=causal, scale=scale, backend=be,
                                             native_gqa=native)

        impls.append(Impl(f"sdpa-{be}", "baseline", make, comparable=comparable, available=available,
                          flops_kind=flops_kind, note=note))
    return impls


# ----------------------------------------------------------------------------------------------
# Sparse Query Attention
# ----------------------------------------------------------------------------------------------

# (query heads, kv heads) as fractions of H, from the SQA paper's variants (issue 3)
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


def case_params(cases: list[Case]) -> list[tuple[Case, str, str]]:
    """(case, impl name, readable id) for each timed impl: the parametrisation of the bench/ files."""
    out = []
    for case in cases:
        for impl in case.impls:
            if impl.timed:
                label = case.variant.replace(" ", "-")
                out.append((case, impl.name, f"{label}-L{case.L}-B{case.params.get('B')}-{case.mode}-{impl.name}"))
    return out


def sqa_perf_cases(device: str = "cuda", dtype=torch.bfloat16) -> list[Case]:
    """Issue 3, section 5: bf16, D=128, B*L = 32k tokens, MHA 16/16 vs xSQA 4/4, fwd and fwd+bwd."""
    cfg = SuiteConfig(device=device, dtype=dtype)
    out = []
    for causal in (False, True):
        for variant in ("mha", "xsqa"):
            for L in (4096, 8192, 16384, 32768):
                for mode in MODES:
                    out.append(sqa_case(variant, H=16, B=max(1, 32768 // L), L=L, D=128, causal=causal,
                                        dtype=dtype, device=device, mode=mode, cfg=cfg))
    return out


# ----------------------------------------------------------------------------------------------
# Dynamic Mask Attention
# ----------------------------------------------------------------------------------------------


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
    """Issue 5's performance cases: bf16, H=16, Hkv=8, D=128, causal, keep=2048, B=1, fwd and fwd+bwd."""
    cfg = SuiteConfig(device=device, dtype=dtype)
    return [dma_case(B=1, L=L, H=16, Hkv=8, D=128, keep=2048, causal=True, dtype=dtype, device=device, mode=m,
                     cfg=cfg)
            for L in (1024, 4096, 16384, 32768, 65536) for m in MODES]


# ----------------------------------------------------------------------------------------------
# Lightning attention
# ----------------------------------------------------------------------------------------------

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
    """Issue 4's performance cases: bf16, B=4, H=32, D=128, L 2k..64k, fwd and fwd+bwd."""
    cfg = SuiteConfig(device=device, dtype=dtype)
    return [lightning_case(B=4, L=L, H=32, D=128, dtype=dtype, device=device, mode=m, cfg=cfg)
            for L in (2048, 4096, 8192, 16384, 32768, 65536) for m in MODES]


# ----------------------------------------------------------------------------------------------
# Routing attention
# ----------------------------------------------------------------------------------------------


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
                out = ak.routing_assign(q, k, cent, window=w, shared_qk=shared)
                state["cent_dtype"] = cent.dtype
                return out
            except (TypeError, ValueError, RuntimeError):
                state["cent_dtype"] = q.dtype  # the op may want centroids at the input dtype
        return ak.routing_assign(q, k, cent.to(state["cent_dtype"]), window=w, shared_qk=shared)

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
            qi, ki = given if given[0] is not None else bl.routing_assign_eager(q, k, cent, window=w,
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
            rq, rk = bl.routing_assign_eager(q, k, cent, window=w, shared_qk=shared)
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
            qi, ki = bl.routing_assign_eager(q, F.normalize(q, dim=-1), inp["centroids"], window=w, shared_qk=shared)
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
    """Issue 6's performance cases: bf16, B=1, H=8, D=64, causal, C=sqrt(L), w=L/C, fwd+bwd."""
    cfg = SuiteConfig(device=device, dtype=dtype)
    return [routing_case(B=1, L=L, H=8, D=64, dtype=dtype, device=device, mode="fwd+bwd", cfg=cfg)
            for L in (4096, 16384, 65536)]
