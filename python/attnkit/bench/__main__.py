"""``python -m attnkit.bench`` / ``attnkit-bench``: which attention to use at a shape, and how much faster
it is than what you have.

Every case is first checked against a baseline (the correctness gate), then timed: CUDA events with
warm-up and an L2 flush on GPU, perf_counter on CPU; median and IQR over repeats. Prints a table,
writes results.json, table.md and PNG plots to --out, and with --compare OLD.json prints speedups
and regressions against an earlier run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from . import cases as C
from .report import (compare_runs, environment, load_json, print_tables, render_compare, render_markdown,
                     write_json)
from .runner import Runner
from .timing import TimingPolicy


def parse_seqlens(text: str) -> list[int]:
    """'1k,4k,16384' -> [1024, 4096, 16384] (k = 1024)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1
        if part.endswith("k"):
            mult, part = 1024, part[:-1]
        try:
            v = float(part) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot read {part!r} (use e.g. 1k,4k,16384)")
        if v < 1 or v != int(v):
            raise argparse.ArgumentTypeError(f"{part!r} is not a positive whole length")
        out.append(int(v))
    if not out:
        raise argparse.ArgumentTypeError("empty list")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="attnkit-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default=None,
                    help=f"comma list of {','.join(C.REGISTRY)} (default: every op this build has)")
    ap.add_argument("--dtype", choices=sorted(C.DTYPES), default=None,
                    help="default: bf16 on CUDA, fp32 on CPU (CPU half precision is slow)")
    ap.add_argument("--seqlens", type=parse_seqlens, default=None, help="e.g. 1k,4k,16k (default: per op and device)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: per op; SQA/DMA keep B*L fixed)")
    ap.add_argument("--heads", type=int, default=None, help="heads (SQA: the H its variants derive from)")
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--mode", choices=["fwd", "fwd+bwd", "both"], default=None,
                    help="default: both (fwd with --quick)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    ap.add_argument("--quick", action="store_true", help="two small lengths, forward only, few repeats")
    ap.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default bench-results/)")
    ap.add_argument("--compare", type=Path, default=None, metavar="OLD.json",
                    help="print speedups and regressions against an earlier results.json")
    ap.add_argument("--against", type=Path, default=None, metavar="NEW.json",
                    help="with --compare: compare two saved runs without running anything")
    ap.add_argument("--threshold", type=float, default=0.10,
                    help="--compare: slower by more than this fraction is a regression (default 0.10)")
    ap.add_argument("--fail-on-regression", action="store_true", help="--compare: exit 3 on any regression")
    ap.add_argument("--max-time", type=float, default=None,
                    help="soft budget in seconds; later cases are skipped once spent (default: 100 on CPU)")
    ap.add_argument("--target-time", type=float, default=None, help="seconds of timing per impl and case")
    ap.add_argument("--gate-tol-scale", type=float, default=1.0, help="multiply the gate's tolerances")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = ap.parse_args(argv)
    if a.against is not None and a.compare is None:
        ap.error("--against needs --compare OLD.json")
    for name in ("batch", "heads", "head_dim"):
        v = getattr(a, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return a


class Progress:
    """rich progress bar, else tqdm, else one line per case on stderr."""

    def __init__(self, total: int):
        self.total = total
        self.n = 0
        self._rich = self._tqdm = None
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn

            self._rich = RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            transient=True)
            self._task = self._rich.add_task("attnkit-bench", total=total)
            self._rich.start()
            return
        except ImportError:
            pass
        try:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, desc="attnkit-bench", file=sys.stderr)
        except ImportError:
            pass

    def start(self, label: str):
        if self._rich is not None:
            self._rich.update(self._task, description=label[:70])
        elif self._tqdm is not None:
            self._tqdm.set_description(label[:50])
        else:
            print(f"[{self.n + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def log(self, msg: str):
        if self._rich is not None:
            self._rich.console.print(msg, markup=False, highlight=False)
        elif self._tqdm is not None:
            self._tqdm.write(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def advance(self):
        self.n += 1
        if self._rich is not None:
            self._rich.advance(self._task)
        elif self._tqdm is not None:
            self._tqdm.update(1)

    def close(self):
        if self._rich is not None:
            self._rich.stop()
        elif self._tqdm is not None:
            self._tqdm.close()


def _overloaded() -> bool:
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1) + 0.5
    except (OSError, AttributeError):
        return False


def run_compare(old_doc: dict, old_label: str, new_doc: dict, new_label: str, threshold: float) -> list[dict]:
    rows = compare_runs(old_doc, new_doc, threshold)
    print(render_compare(rows, old_label, new_label))
    return rows


def main(argv=None) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(parse_args(argv))
    finally:
        torch.set_num_threads(threads)  # main() may run in-process (tests): leave torch as found


def _main(a: argparse.Namespace) -> int:

    if a.against is not None:  # compare two saved runs
        try:
            old_doc, new_doc = load_json(a.compare), load_json(a.against)
        except (OSError, ValueError) as e:
            print(f"attnkit-bench: {e}", file=sys.stderr)
            return 2
        rows = run_compare(old_doc, str(a.compare), new_doc, str(a.against), a.threshold)
        return 3 if a.fail_on_regression and any(r["verdict"] == "REGRESSION" for r in rows) else 0

    old_doc = None
    if a.compare is not None:  # read it now: a bad file should not wait for the end of a long run
        try:
            old_doc = load_json(a.compare)
        except (OSError, ValueError) as e:
            print(f"attnkit-bench: --compare: {e}", file=sys.stderr)
            return 2

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.threads:
        torch.set_num_threads(a.threads)
    elif device == "cpu" and torch.get_num_threads() > 1 and _overloaded():
        # several threads on an oversubscribed machine spend their time waiting for each other
        torch.set_num_threads(1)
        print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: timing with 1 thread "
              f"(--threads N to override)", file=sys.stderr)
    if device == "cuda" and not torch.cuda.is_available():
        print("attnkit-bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    dtype_name = a.dtype or ("bf16" if device == "cuda" else "fp32")
    mode = a.mode or ("fwd" if a.quick else "both")
    modes = C.MODES if mode == "both" else (mode,)
    cfg = C.SuiteConfig(device=device, dtype=C.DTYPES[dtype_name], seqlens=a.seqlens, batch=a.batch, heads=a.heads,
                        head_dim=a.head_dim, modes=modes, quick=a.quick)
    ops = [o.strip() for o in a.ops.split(",") if o.strip()] if a.ops else None

    import attnkit  # noqa: F401  (loads the extension; fails loudly if it is not built)

    suite, notes = C.build_suite(cfg, ops)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if not suite:
        print("attnkit-bench: no cases to run (no requested op exists in this build)", file=sys.stderr)
        return 1

    policy = TimingPolicy.for_device(device, a.quick)
    if a.target_time is not None:
        policy.target_s = a.target_time
    max_time = a.max_time if a.max_time is not None else (100.0 if device == "cpu" and not a.quick else None)
    t0 = time.perf_counter()
    runner = Runner(device, policy, tol_scale=a.gate_tol_scale,
                    deadline=None if max_time is None else t0 + max_time)

    results = []
    seen_notes = set()
    interrupted = False
    progress = Progress(len(suite))
    try:
        for case in suite:
            progress.start(f"{case.op} {case.variant} L={case.L} {case.mode}")
            res = runner.run_case(case)
            results.append(res)
            for n in res.notes:
                key = n.split(":")[0] + ":" + n.split(":", 1)[-1][:40]
                if key not in seen_notes:
                    seen_notes.add(key)
                    progress.log(f"note: {case.op}: {n}")
            op = res.op_result
            if op is not None and op.status == "FAIL":
                progress.log(f"FAIL: {case.id}: {op.note}")
            progress.advance()
    except KeyboardInterrupt:  # keep what was measured
        interrupted = True
        notes.append(f"interrupted after {len(results)} of {len(suite)} cases")
    finally:
        progress.close()
    elapsed = time.perf_counter() - t0

    env = environment(device)
    config = {
        "device": device, "dtype": dtype_name, "modes": list(modes), "quick": a.quick,
        "seqlens": a.seqlens, "batch": a.batch, "heads": a.heads, "head_dim": a.head_dim,
        "ops": ops, "timing": vars(policy), "gate_tol_scale": a.gate_tol_scale, "elapsed_s": round(elapsed, 1),
        "max_time": max_time,
    }
    out_dir: Path = a.out
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = None
    if device == "cpu" and not a.quick and not interrupted:
        from .cpu_targets import evaluate

        targets = evaluate(results, runner)
    doc = write_json(out_dir / "results.json", env, config, results, notes + sorted(seen_notes),
                     extra=None if targets is None else {"cpu_targets": targets})
    (out_dir / "table.md").write_text(render_markdown(doc) + "\n")

    print_tables(doc)
    if targets is not None:
        from .cpu_targets import render

        print(render(targets))
    written = [out_dir / "results.json", out_dir / "table.md"]
    if not a.no_plots:
        try:
            from .plots import make_plots

            written += make_plots(doc, out_dir)
        except ImportError as e:
            print(f"note: plots skipped ({e}); pip install matplotlib", file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in written)} in {elapsed:.1f} s")
    if device == "cpu":
        print("note: CPU run: these are CPU numbers, not GPU numbers")

    failed = [r for r in results if r.op_result is not None and r.op_result.status == "FAIL"]
    skipped = [r for r in results if r.gate.get("status") == "SKIP"]
    if skipped:
        print(f"note: {len(skipped)} case(s) skipped after the time budget (--max-time {max_time:g} s)")
    rc = 0
    if failed:
        print(f"GATE FAILED: attnkit disagrees with its baseline in {len(failed)} case(s); those were not timed:")
        for r in failed:
            print(f"  {r.case.id}: {r.op_result.note}")
        rc = 2
    if interrupted:
        print(f"note: interrupted; results hold {len(results)} of {len(suite)} cases")
    if old_doc is not None:
        rows = run_compare(old_doc, str(a.compare), doc, str(out_dir / "results.json"), a.threshold)
        if a.fail_on_regression and any(r["verdict"] == "REGRESSION" for r in rows) and rc == 0:
            rc = 3
    return rc


if __name__ == "__main__":
    sys.exit(main())
