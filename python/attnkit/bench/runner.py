"""Runs one case: the correctness gate first, then timing, memory and speedups.

Gate: the first comparable baseline that runs (the float64 oracle, a library, or the plain-PyTorch
path, in the order the case lists them) is the reference. The attnkit op and every other comparable
baseline are compared with it, forward output and, in fwd+bwd mode, every input gradient. An impl
that disagrees is marked FAIL and is not timed; an op with nothing to compare against is marked
``unchecked`` and is not timed either.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cases import DTYPE_NAMES, Case, Impl, memory_budget
from .timing import L2Flusher, TimingPolicy, measure, peak_memory_bytes

# (max |err| / max |ref|, rms err / rms ref) for outputs and for gradients, by input dtype.
# Why relative to max |ref| and not FlashAttention's rule (err <= 2 * eager err + atol, used by the
# tests): the gate runs on benchmark-sized inputs and compares two implementations at the same low
# precision (the reference is the first baseline that runs, e.g. torch SDPA in bf16), with no float64
# oracle and no eager error to measure against, so the bound must cover the rounding of both. In
# bf16 (unit roundoff 2^-8) each backward rounds P and dS to bf16 before the products, and every
# gradient element sums Lq or Lk such terms: the absolute error of an element grows with the
# magnitude of the terms summed, not with the (often much smaller, cancelling) value of the element,
# which is why it is normalised by max |ref| of the whole tensor. The bf16 gradient bound (12% of
# max |ref|, 3% in rms) has not been re-measured on a GPU since; tighten it from the gate_detail of
# the first GPU run (it records the observed ratios) rather than by guesswork.
TOLERANCES = {
    torch.float32: {"out": (2e-3, 2e-4), "grad": (5e-3, 5e-4)},
    torch.float16: {"out": (2e-2, 3e-3), "grad": (5e-2, 1e-2)},
    torch.bfloat16: {"out": (6e-2, 1.5e-2), "grad": (1.2e-1, 3e-2)},
    torch.float64: {"out": (1e-8, 1e-9), "grad": (1e-7, 1e-8)},
}


class GateMismatch(Exception):
    """An impl produced something the gate can reject without comparing numbers (e.g. a shape)."""


@dataclass
class ImplResult:
    name: str
    kind: str
    comparable: bool
    status: str = "pending"  # ok | FAIL | error | oom | skip | unchecked
    gate: str = "-"  # PASS | FAIL | ref | n/a | -
    note: str = ""
    gate_detail: dict = field(default_factory=dict)
    timing: dict | None = None
    peak_bytes: int | None = None
    tflops: float | None = None
    dense_tflops: float | None = None
    gbps: float | None = None  # bytes the case must move (params["kv_bytes"]) / time, when it says
    speedup: float | None = None  # for attnkit: vs the fastest baseline; for a baseline: its ms / attnkit ms
    speedup_vs: str | None = None

    @property
    def ms(self) -> float | None:
        return self.timing["ms"] if self.timing else None

    def to_json(self) -> dict:
        d = {
            "impl": self.name,
            "kind": self.kind,
            "comparable": self.comparable,
            "status": self.status,
            "gate": self.gate,
            "note": self.note,
            "gate_detail": self.gate_detail,
            "tflops": self.tflops,
            "dense_tflops": self.dense_tflops,
            "gbps": self.gbps,
            "peak_mib": None if self.peak_bytes is None else self.peak_bytes / 2 ** 20,
            "speedup": self.speedup,
            "speedup_vs": self.speedup_vs,
        }
        d.update(self.timing or {"ms": None, "iqr_ms": None, "reps": 0})
        return d


@dataclass
class CaseResult:
    case: Case
    impls: list[ImplResult]
    gate: dict
    flops: float | None = None
    dense_flops: float | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def impl(self, name: str) -> ImplResult:
        for r in self.impls:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def op_result(self) -> ImplResult | None:
        for r in self.impls:
            if r.kind == "attnkit":
                return r
        return None

    def to_json(self) -> dict:
        c = self.case
        op = self.op_result
        return {
            "id": c.id,
            "op": c.op,
            "variant": c.variant,
            "L": c.L,
            "mode": c.mode,
            "dtype": DTYPE_NAMES.get(c.dtype, str(c.dtype)),
            "device": c.device,
            "params": c.params,
            "flops": self.flops,
            "dense_flops": self.dense_flops,
            "dense_eq": c.tags.get("dense_eq"),
            "gate": self.gate,
            "speedup": None if op is None else {"value": op.speedup, "vs": op.speedup_vs},
            "impls": [r.to_json() for r in self.impls],
            "notes": self.notes,
            "seconds": self.seconds,
        }


def _first(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def compare(out: torch.Tensor | None, ref: torch.Tensor | None, tol: tuple[float, float]) -> dict:
    """Relative max and rms errors of ``out`` against ``ref``; ok when both are within ``tol``."""
    if out is None or ref is None:
        if out is None and ref is None:
            return {"ok": True, "detail": "no gradient on either side"}
        return {"ok": False, "detail": "gradient missing" if out is None else "unexpected gradient"}
    if not isinstance(out, torch.Tensor):
        return {"ok": False, "detail": f"returned {type(out).__name__}, not a tensor"}
    if tuple(out.shape) != tuple(ref.shape):
        return {"ok": False, "detail": f"shape {tuple(out.shape)} != {tuple(ref.shape)}"}
    if out.numel() == 0:
        return {"ok": True, "max_rel": 0.0, "rms_rel": 0.0}
    wide = torch.float64 if out.device.type == "cpu" else torch.float32
    o = out.detach().to(wide)
    r = ref.detach().to(device=o.device, dtype=wide)
    nonfinite = int((~torch.isfinite(o)).sum().item())
    err = (o - r).abs()
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
    r_max = float(r.abs().max().item())
    r_rms = float(r.pow(2).mean().sqrt().item())
    tiny = 1e-30
    max_rel = float(err.max().item()) / max(r_max, tiny)
    rms_rel = float(err.pow(2).mean().sqrt().item()) / max(r_rms, tiny) if math.isfinite(max_rel) else float("inf")
    ok = nonfinite == 0 and max_rel <= tol[0] and rms_rel <= tol[1]
    d = {"ok": ok, "max_rel": max_rel, "rms_rel": rms_rel, "tol": list(tol)}
    if nonfinite:
        d["nonfinite"] = nonfinite
    return d


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160]}" if msg else type(e).__name__


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class Runner:
    def __init__(self, device: str, policy: TimingPolicy, *, tol_scale: float = 1.0, deadline: float | None = None):
        self.device = device
        self.policy = policy
        self.tol_scale = tol_scale
        self.deadline = deadline
        self.flusher = L2Flusher(torch.device("cuda")) if device == "cuda" and policy.flush_l2 else None
        self._do: torch.Tensor | None = None

    # -- helpers ---------------------------------------------------------------------------------

    def _tol(self, dtype, what: str) -> tuple[float, float]:
        a, b = TOLERANCES.get(dtype, TOLERANCES[torch.float32])[what]
        return a * self.tol_scale, b * self.tol_scale

    def _grad_out(self, case: Case, out: torch.Tensor) -> torch.Tensor:
        if self._do is None:
            g = torch.Generator(device="cpu").manual_seed(case.seed + 1)
            self._do = torch.randn(tuple(out.shape), generator=g).to(device=out.device, dtype=out.dtype)
        if tuple(self._do.shape) != tuple(out.shape):
            raise GateMismatch(f"output shape {tuple(out.shape)} != {tuple(self._do.shape)}")
        return self._do if self._do.dtype == out.dtype else self._do.to(out.dtype)

    def callable_for(self, case: Case, impl: Impl, inputs: dict) -> Callable[[], object]:
        """The function timed for ``impl``: forward, or forward + backward to every input in grad_names."""
        fwd = impl.make(inputs)
        if case.mode == "fwd":
            def run():
                with torch.no_grad():
                    return _first(fwd())
            return run
        leaves = [inputs[n] for n in case.grad_names]

        def run_bwd():
            out = _first(fwd())
            grads = torch.autograd.grad(out, leaves, self._grad_out(case, out), allow_unused=True)
            return out, grads

        return run_bwd

    def _evaluate(self, case: Case, impl: Impl, inputs: dict):
        res = self.callable_for(case, impl, inputs)()
        if case.mode == "fwd":
            return res, None
        return res

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _release(self):
        if self.device == "cuda":
            torch.cuda.empty_cache()

    # -- one case --------------------------------------------------------------------------------

    def check(self, case: Case) -> tuple[CaseResult, dict]:
        """Availability, memory and the correctness gate, without timing.

        Returns the result so far (impls that may be timed are left ``pending``) and the inputs to
        time them on.
        """
        self._do = None
        results = [ImplResult(i.name, i.kind, i.comparable, note=i.note) for i in case.impls]
        by_name = {r.name: r for r in results}
        cr = CaseResult(case, results, gate={"status": "-", "reference": None, "checks": {}})

        torch.manual_seed(case.seed)
        inputs = case.make_inputs(case.mode == "fwd+bwd")
        budget = memory_budget(self.device)

        # availability and memory
        for impl in case.impls:
            r = by_name[impl.name]
            reason = None
            if impl.available is not None:
                try:
                    reason = impl.available()
                except Exception as e:  # a probe that breaks is a reason, not a crash
                    reason = _short(e)
            if reason is None and impl.mem_bytes is not None:
                need = impl.mem_bytes(case.mode)
                if need is not None and need > budget:
                    reason = f"needs ~{need / 2**30:.1f} GiB, {budget / 2**30:.1f} GiB available"
            if reason is not None:
                r.status, r.note = "skip", reason
                if impl.kind != "oracle":
                    cr.notes.append(f"{impl.name}: {reason}")

        # gate
        gate_inputs = dict(inputs)
        op_res = cr.op_result
        if case.gate_prepare is not None and op_res is not None and op_res.status == "pending":
            try:
                extra, checks = case.gate_prepare(inputs)
                gate_inputs.update(extra)
                cr.gate["checks"].update(checks)
            except Exception as e:
                op_res.status, op_res.note = ("oom" if _is_oom(e) else "error"), _short(e)
        self._gate(case, gate_inputs, cr)
        if self._do is not None and self._do.dtype != case.dtype:
            self._do = self._do.to(case.dtype)  # the oracle ran in float64; timed impls use the case dtype
        self._sync()
        self._release()

        try:
            cr.flops, cr.dense_flops = case.total_flops(gate_inputs)
        except Exception as e:
            cr.notes.append(f"FLOP count failed: {_short(e)}")
        return cr, inputs

    def run_case(self, case: Case) -> CaseResult:
        t_start = time.perf_counter()
        if self.deadline is not None and time.perf_counter() > self.deadline:
            results = [ImplResult(i.name, i.kind, i.comparable, status="skip", note="time budget spent (--max-time)")
                       for i in case.impls]
            return CaseResult(case, results, gate={"status": "SKIP", "reference": None, "checks": {}})

        try:
            cr, inputs = self.check(case)
        except Exception as e:  # e.g. the inputs themselves do not fit: the case fails, the suite goes on
            self._do = None
            self._release()
            status = "oom" if _is_oom(e) else "error"
            results = [ImplResult(i.name, i.kind, i.comparable, status=status, note=_short(e)) for i in case.impls]
            cr = CaseResult(case, results, gate={"status": "ERROR", "reference": None, "checks": {}})
            cr.notes.append(f"case failed before timing: {_short(e)}")
            cr.seconds = time.perf_counter() - t_start
            return cr
        by_name = {r.name: r for r in cr.impls}
        for impl in case.impls:
            r = by_name[impl.name]
            if r.status != "pending":
                continue
            if not impl.timed:
                r.status = "ok"
                continue
            fn = None
            try:
                fn = self.callable_for(case, impl, inputs)
                r.timing = measure(fn, self.device, self.policy, self.flusher).as_dict()
                r.peak_bytes = peak_memory_bytes(fn, self.device)
                r.status = "ok"
            except Exception as e:
                r.status, r.note = ("oom" if _is_oom(e) else "error"), _short(e)
            finally:
                fn = None
                self._release()

        self._derive(case, cr)
        del inputs
        self._do = None
        self._release()
        cr.seconds = time.perf_counter() - t_start
        return cr

    def _gate(self, case: Case, inputs: dict, cr: CaseResult) -> None:
        by_name = {r.name: r for r in cr.impls}
        ref_out = ref_grads = None
        ref_name = None
        for impl in case.impls:
            r = by_name[impl.name]
            if not impl.comparable or impl.kind == "attnkit" or r.status != "pending":
                continue
            try:
                ref_out, ref_grads = self._evaluate(case, impl, inputs)
                ref_name = impl.name
                r.gate = "ref"
                break
            except Exception as e:
                self._do = None
                r.status, r.note = ("oom" if _is_oom(e) else "error"), _short(e)
                self._release()
        cr.gate["reference"] = ref_name

        for impl in case.impls:
            r = by_name[impl.name]
            if not impl.comparable:
                if r.status == "pending":
                    r.gate = "n/a"
                continue
            if impl.name == ref_name or r.status != "pending":
                continue
            if ref_name is None:
                r.status, r.gate = "unchecked", "-"
                r.note = "no baseline could run to check it; not timed"
                continue
            try:
                out, grads = self._evaluate(case, impl, inputs)
            except GateMismatch as e:
                r.status, r.gate, r.gate_detail = "FAIL", "FAIL", {"output": {"ok": False, "detail": str(e)}}
                continue
            except Exception as e:
                r.status, r.note = ("oom" if _is_oom(e) else "error"), _short(e)
                self._release()
                continue
            detail = {"output": compare(out, ref_out, self._tol(case.dtype, "out"))}
            if grads is not None:
                for name, g, rg in zip(case.grad_names, grads, ref_grads):
                    detail[f"d{name}"] = compare(g, rg, self._tol(case.dtype, "grad"))
            if impl.kind == "attnkit":
                detail.update(cr.gate["checks"])
            ok = all(v.get("ok", False) for v in detail.values())
            r.gate_detail = detail
            r.gate = "PASS" if ok else "FAIL"
            if not ok:
                r.status = "FAIL"
                r.note = "; ".join(f"{k}: {_fmt_check(v)}" for k, v in detail.items() if not v.get("ok"))
            del out, grads

        op = cr.op_result
        if op is None:
            cr.gate["status"] = "-"
        elif op.gate in ("PASS", "FAIL"):
            cr.gate["status"] = op.gate
        elif op.status in ("error", "oom"):
            cr.gate["status"] = "ERROR"
        elif op.status == "unchecked":
            cr.gate["status"] = "NOREF"
        else:
            cr.gate["status"] = op.status.upper()
        if op is not None and op.gate_detail:
            cr.gate["detail"] = op.gate_detail

    def _derive(self, case: Case, cr: CaseResult) -> None:
        by_name = {i.name: i for i in case.impls}
        for r in cr.impls:
            ms = r.ms
            if ms is None or ms <= 0:
                continue
            own = cr.dense_flops if by_name[r.name].flops_kind == "dense" else cr.flops
            if own:
                r.tflops = own / (ms * 1e-3) / 1e12
            if cr.dense_flops:
                r.dense_tflops = cr.dense_flops / (ms * 1e-3) / 1e12
            if case.params.get("kv_bytes"):
                r.gbps = case.params["kv_bytes"] / (ms * 1e-3) / 1e9
        op = cr.op_result
        if op is None or op.ms is None:
            return
        timed = [r for r in cr.impls if r.kind == "baseline" and r.ms is not None]
        for r in timed:
            r.speedup = r.ms / op.ms
            r.speedup_vs = "attnkit"
        if timed:
            best = min(timed, key=lambda r: r.ms)
            op.speedup = best.ms / op.ms
            op.speedup_vs = best.name


def _fmt_check(v: dict) -> str:
    if "max_rel" in v:
        return f"max_rel={v['max_rel']:.2e} rms_rel={v['rms_rel']:.2e}" + (
            f" nonfinite={v['nonfinite']}" if v.get("nonfinite") else "")
    return v.get("detail", "failed")
