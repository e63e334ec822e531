"""Environment capture, results.json, the tables (rich when installed, plain text otherwise) and
``--compare`` against an earlier results.json."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

SCHEMA = "attnkit-bench/1"

# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd=None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_info() -> dict:
    """The commit of the source tree: the package's own folder (make dev), else the working directory
    when it is an attnkit checkout (make bench runs an installed wheel from the repository root)."""
    places = [Path(__file__).resolve().parent]
    cwd = Path.cwd()
    if (cwd / "python" / "attnkit").is_dir():
        places.append(cwd)
    for here in places:
        commit = _run(["git", "rev-parse", "HEAD"], cwd=here)
        if commit is not None:
            dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here)
            return {"git_commit": commit, "git_dirty": bool(dirty)}
    return {"git_commit": None, "git_dirty": None}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _program() -> str:
    name = Path(sys.argv[0]).name
    return "python -m attnkit.bench" if name in ("__main__.py", "") else name


def environment(device: str) -> dict:
    import attnkit

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "attnkit": getattr(attnkit, "__version__", None),
        "attnkit_build": None,
        "gpu": None,
        "gpu_capability": None,
        "sm_count": None,
        "gpu_memory_gib": None,
        "driver": None,
        "command": " ".join([_program()] + sys.argv[1:]),
        "loadavg": None,
    }
    try:
        env["loadavg"] = round(os.getloadavg()[0], 2)  # CPU timings on a busy machine are noisy
    except (OSError, AttributeError):
        pass
    env.update(_git_info())
    try:
        info = torch.ops.attnkit._build_info()
        env["attnkit_build"] = dict(line.split("=", 1) for line in info.splitlines() if "=" in line)
    except Exception:
        pass
    try:
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        pass
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["gpu"] = p.name
        env["gpu_capability"] = f"{p.major}.{p.minor}"
        env["sm_count"] = p.multi_processor_count
        env["gpu_memory_gib"] = round(p.total_memory / 2 ** 30, 1)
        drv = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = drv.splitlines()[0].strip() if drv else None
    return env


def write_json(path: Path, env: dict, config: dict, results: list, notes: list[str], extra: dict | None = None) -> dict:
    doc = {
        "schema": SCHEMA,
        "environment": env,
        "config": config,
        "notes": notes,
        "cases": [r.to_json() for r in results],
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    return doc


def load_json(path) -> dict:
    with open(path) as f:
        doc = json.load(f)
    if doc.get("schema") != SCHEMA or "cases" not in doc:
        raise ValueError(f"{path}: not an attnkit-bench results file (schema {doc.get('schema')!r})")
    return doc


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------

COLUMNS = ["case", "L", "B", "mode", "impl", "gate", "ms", "IQR", "TFLOP/s", "dense-eq TFLOP/s", "GB/s", "peak MiB",
           "attnkit speedup", "note"]

OP_TITLES = {"sqa": "Sparse Query Attention", "dma": "Dynamic Mask Attention", "lightning": "Lightning attention",
             "routing": "Routing attention", "moh": "Mixture-of-Head attention"}


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def _tf(x):
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def table_rows(doc: dict) -> dict[str, list[list[str]]]:
    """Rows of the table, grouped by op; each group of one case's impls ends with an empty separator."""
    out: dict[str, list[list[str]]] = {}
    for c in doc["cases"]:
        rows = out.setdefault(c["op"], [])
        first = True
        for r in c["impls"]:
            status = r["status"]
            if r["kind"] == "oracle" and status == "skip":
                continue  # the float64 oracle only serves small cases; its absence is no news
            if status == "ok" and r["ms"] is not None:
                ms, iqr = _f(r["ms"]), _f(r["iqr_ms"])
            elif status == "ok":  # the oracle: checked against, never timed
                ms, iqr = "(gate only)", ""
            else:
                ms, iqr = {"FAIL": "FAIL", "oom": "OOM"}.get(status, status), ""
            if r["kind"] == "attnkit":
                sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x vs {r['speedup_vs']}"
            else:
                sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            note = r.get("note") or ""
            rows.append([
                c["variant"] if first else "",
                str(c["L"]) if first else "",
                str(c["params"].get("B", "")) if first else "",
                c["mode"] if first else "",
                r["impl"],
                r["gate"],
                ms,
                iqr,
                _tf(r["tflops"]),
                _tf(r["dense_tflops"]),
                _f(r.get("gbps"), "{:.0f}"),
                _f(r["peak_mib"], "{:.0f}"),
                sp,
                note if len(note) <= 70 else note[:67] + "...",
            ])
            first = False
        rows.append([])
    return out


def _title(doc: dict, op: str) -> str:
    env = doc["environment"]
    cfg = doc.get("config", {})
    where = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('torch_threads')} threads)"
    return f"{op}: {OP_TITLES.get(op, op)} | {cfg.get('dtype')} | {where}"


def render_markdown(doc: dict) -> str:
    lines = []
    env = doc["environment"]
    lines.append(f"attnkit {env.get('attnkit')} at {str(env.get('git_commit'))[:12]}"
                 f"{' (dirty)' if env.get('git_dirty') else ''}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
                 f"{env.get('date')}; command: `{env.get('command')}`")
    lines.append("")
    for op, rows in table_rows(doc).items():
        lines.append(f"### {_title(doc, op)}")
        lines.append("")
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for row in rows:
            if row:
                lines.append("| " + " | ".join(x.replace("|", "/") for x in row) + " |")
        lines.append("")
    if doc.get("cpu_targets"):
        from .cpu_targets import render

        lines.append(render(doc["cpu_targets"]))
        lines.append("")
    return "\n".join(lines)


def render_plain(doc: dict) -> str:
    out = []
    for op, rows in table_rows(doc).items():
        out.append(_title(doc, op))
        body = [r for r in rows if r]
        widths = [max(len(COLUMNS[i]), *(len(r[i]) for r in body)) for i in range(len(COLUMNS))]
        out.append("  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)))
        out.append("  ".join("-" * w for w in widths))
        for r in rows:
            if r:
                out.append("  ".join(x.ljust(w) for x, w in zip(r, widths)))
            else:
                out.append("")
    return "\n".join(out)


def print_tables(doc: dict, console=None) -> None:
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(render_plain(doc))
        return
    console = console or Console(width=None if sys.stdout.isatty() else 220)
    for op, rows in table_rows(doc).items():
        t = Table(title=_title(doc, op), box=box.SIMPLE_HEAVY, show_lines=False)
        for col in COLUMNS:
            t.add_column(col, justify="right" if col in ("L", "B", "ms", "IQR", "TFLOP/s", "dense-eq TFLOP/s",
                                                          "GB/s", "peak MiB") else "left",
                         overflow="fold", no_wrap=col not in ("note",))
        for i, row in enumerate(rows):
            if not row:
                continue
            style = None
            if row[5] == "FAIL" or row[6] in ("FAIL", "error", "OOM"):
                style = "red"
            elif row[4] == "attnkit":
                style = "bold"
            end = i + 1 < len(rows) and not rows[i + 1]
            t.add_row(*row, style=style, end_section=end)
        console.print(t)


# ----------------------------------------------------------------------------------------------
# --compare
# ----------------------------------------------------------------------------------------------


def compare_runs(old: dict, new: dict, threshold: float = 0.10) -> list[dict]:
    """One row per (case, impl) present in both runs. ``change`` is old ms / new ms (> 1: faster now).

    verdict: REGRESSION when the new time is more than ``threshold`` slower, or when an impl that
    passed the gate and was timed before no longer is; faster / same otherwise; ``new`` / ``gone``
    for rows in only one run.
    """
    old_rows = {(c["id"], r["impl"]): (c, r) for c in old["cases"] for r in c["impls"]}
    seen = set()
    rows = []
    for c in new["cases"]:
        for r in c["impls"]:
            key = (c["id"], r["impl"])
            seen.add(key)
            row = {"id": c["id"], "op": c["op"], "variant": c["variant"], "L": c["L"], "mode": c["mode"],
                   "impl": r["impl"], "kind": r["kind"], "old_ms": None, "new_ms": r["ms"], "change": None,
                   "verdict": "new"}
            if key in old_rows:
                _, o = old_rows[key]
                row["old_ms"] = o["ms"]
                if o["ms"] is not None and r["ms"] is not None and r["ms"] > 0:
                    row["change"] = o["ms"] / r["ms"]
                    if r["ms"] > o["ms"] * (1 + threshold):
                        row["verdict"] = "REGRESSION"
                    elif r["ms"] < o["ms"] * (1 - threshold):
                        row["verdict"] = "faster"
                    else:
                        row["verdict"] = "same"
                elif o["ms"] is not None and r["ms"] is None:
                    row["verdict"] = "REGRESSION"
                    row["detail"] = f"was timed, now {r['status']}"
                elif o["ms"] is None and r["ms"] is not None:
                    row["verdict"] = "fixed"
                else:
                    row["verdict"] = "same" if o["status"] == r["status"] else f"{o['status']}->{r['status']}"
                if o.get("gate") == "PASS" and r.get("gate") == "FAIL":
                    row["verdict"] = "REGRESSION"
                    row["detail"] = "gate PASS -> FAIL"
            rows.append(row)
    for key, (c, o) in old_rows.items():
        if key not in seen:
            rows.append({"id": c["id"], "op": c["op"], "variant": c["variant"], "L": c["L"], "mode": c["mode"],
                         "impl": o["impl"], "kind": o["kind"], "old_ms": o["ms"], "new_ms": None, "change": None,
                         "verdict": "gone"})
    return rows


def render_compare(rows: list[dict], old_label: str, new_label: str, all_impls: bool = False) -> str:
    shown = [r for r in rows if all_impls or r["kind"] == "attnkit" or r["verdict"] == "REGRESSION"]
    head = ["op", "case", "L", "mode", "impl", "old ms", "new ms", "old/new", "verdict"]
    body = []
    for r in shown:
        body.append([r["op"], r["variant"], str(r["L"]), r["mode"], r["impl"], _f(r["old_ms"]), _f(r["new_ms"]),
                     "-" if r["change"] is None else f"{r['change']:.2f}x",
                     r["verdict"] + (f" ({r['detail']})" if r.get("detail") else "")])
    lines = [f"compare: old={old_label}  new={new_label}  (old/new > 1: faster now)"]
    if body:
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(x.ljust(w) for x, w in zip(b, widths)) for b in body]
    reg = [r for r in rows if r["verdict"] == "REGRESSION"]
    fast = [r for r in rows if r["verdict"] == "faster"]
    matched = [r for r in rows if r["change"] is not None]
    lines.append(f"{len(matched)} timed rows matched, {len(fast)} faster, {len(reg)} REGRESSION(S)")
    return "\n".join(lines)
