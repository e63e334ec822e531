"""PNG plots from a results document: latency vs L (log-log) and attnkit's speedup vs L, per op."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _series(doc: dict, op: str):
    """{(variant, mode): {impl: [(L, ms), ...]}} for the timed impls of one op."""
    data: dict = defaultdict(lambda: defaultdict(list))
    for c in doc["cases"]:
        if c["op"] != op:
            continue
        for r in c["impls"]:
            if r["ms"] is not None:
                # a baseline computing a different function (dense attention) is labelled as such
                name = r["impl"] if r.get("comparable", True) or r["kind"] == "attnkit" else f"{r['impl']} (dense)"
                data[(c["variant"], c["mode"])][name].append((c["L"], r["ms"]))
    return data


def _grid(keys):
    variants = sorted({k[0] for k in keys}, key=lambda v: [k[0] for k in keys].index(v))
    modes = [m for m in ("fwd", "fwd+bwd") if any(k[1] == m for k in keys)]
    return variants, modes


def make_plots(doc: dict, out_dir: Path) -> list[Path]:
    """Writes latency_<op>.png and speedup_<op>.png for each op with timed results; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    env = doc["environment"]
    where = env.get("gpu") or "CPU"
    dtype = doc.get("config", {}).get("dtype", "")
    ops = list(dict.fromkeys(c["op"] for c in doc["cases"]))
    for op in ops:
        data = _series(doc, op)
        if not data:
            continue
        variants, modes = _grid(list(data))
        nr, nc = len(variants), len(modes)

        # latency
        fig, axes = plt.subplots(nr, nc, figsize=(5.5 * nc, 3.8 * nr), squeeze=False)
        for i, var in enumerate(variants):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                for impl, pts in data.get((var, mode), {}).items():
                    pts = sorted(pts)
                    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                    style = dict(lw=2.5, color="black") if impl == "attnkit" else dict(lw=1.2, ls="--")
                    ax.plot(xs, ys, marker="o", label=impl, **style)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("sequence length L")
                ax.set_ylabel("ms (median)")
                ax.set_title(f"{op} {var} | {mode}", fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=7)
        fig.suptitle(f"attnkit {op}: latency vs L ({dtype}, {where})", fontsize=11)
        fig.tight_layout()
        p = out_dir / f"latency_{op}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

        # speedup of attnkit over each baseline
        fig, axes = plt.subplots(nr, nc, figsize=(5.5 * nc, 3.8 * nr), squeeze=False)
        for i, var in enumerate(variants):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                series = data.get((var, mode), {})
                mine = dict(series.get("attnkit", []))
                for impl, pts in series.items():
                    if impl == "attnkit":
                        continue
                    pts = sorted((L, ms / mine[L]) for L, ms in pts if L in mine and mine[L] > 0)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"vs {impl}")
                ax.axhline(1.0, color="gray", lw=1)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log", base=2)
                ax.set_xlabel("sequence length L")
                ax.set_ylabel("speedup (baseline ms / attnkit ms)")
                ax.set_title(f"{op} {var} | {mode}", fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
                if len(ax.lines) > 1:
                    ax.legend(fontsize=7)
                if not mine:
                    ax.text(0.5, 0.5, "attnkit not timed\n(see table)", ha="center", va="center",
                            transform=ax.transAxes, color="red")
        fig.suptitle(f"attnkit {op}: speedup vs L ({dtype}, {where})", fontsize=11)
        fig.tight_layout()
        p = out_dir / f"speedup_{op}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
