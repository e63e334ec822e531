"""The benchmark suite: one registry of cases shared by the CLI (``python -m attnkit.bench``) and the
pytest-benchmark files in ``bench/``.

A *case* is one problem (mechanism, shape, dtype, device, mode) with a list of *impls*: the attnkit
op first, then the baselines. Each mechanism registers a builder that is used only when the attnkit
functions it needs exist, so the suite runs whatever subset of the ops this build has.

Each mechanism's builders live in ``cases/<op>.py`` and register themselves with :func:`register`;
every module of this package is imported below, so a new mechanism is a new file.

Nothing here allocates device memory at import or at case construction: inputs are made by
``Case.make_inputs`` when the case runs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import baselines as bl

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


def decode_inputs(seed: int, *, B: int, Lk: int, Hq: int, Hkv: int, D: int, device: str, dtype,
                  bias: bool = False) -> dict:
    """One decode step's inputs: q [B, 1, Hq, D]; K/V caches [B, Lk + 64, Hkv, D] with Lk valid rows
    (cache_seqlens), and with ``bias`` a float32 per-key bias cache [B, Hkv, Lk + 64]."""
    g = _gen(seed)
    lmax = Lk + 64
    inp = {
        "q": _randn((B, 1, Hq, D), g, device, dtype),
        "k_cache": _randn((B, lmax, Hkv, D), g, device, dtype),
        "v_cache": _randn((B, lmax, Hkv, D), g, device, dtype),
    }
    if bias:
        inp["bias_cache"] = _randn((B, Hkv, lmax), g, device, torch.float32)
    inp["cache_seqlens"] = torch.full((B,), Lk, dtype=torch.int32, device=device)
    inp["scale"] = D**-0.5
    return inp


def decode_batches(cfg: SuiteConfig) -> list[int]:
    """The decode cases' batch sizes: 1 and 8, or --batch."""
    return [1, 8] if cfg.batch is None else [cfg.batch]


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


def case_params(cases: list[Case]) -> list[tuple[Case, str, str]]:
    """(case, impl name, readable id) for each timed impl: the parametrisation of the bench/ files."""
    out = []
    for case in cases:
        for impl in case.impls:
            if impl.timed:
                label = case.variant.replace(" ", "-")
                out.append((case, impl.name, f"{label}-L{case.L}-B{case.params.get('B')}-{case.mode}-{impl.name}"))
    return out


def _import_op_modules() -> None:
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


_import_op_modules()
