"""Table and figure of ``benchmarks/freeze_study.py``'s records.

``write_report(records)`` writes ``benchmarks/results/freeze_study.md`` (the table, paired
against the ``none`` run of the same task and seed) and ``docs/freeze_study.png`` (per task:
training time saved against accuracy change, one point per configuration and seed, means large).
"""

from __future__ import annotations

import os
import statistics
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
TABLE = os.path.join(HERE, "results", "freeze_study.md")
FIGURE = os.path.join(os.path.dirname(HERE), "docs", "freeze_study.png")
ORDER = ("none", "alpha", "alpha_prefix", "alpha_early", "random", "front", "static", "autofreeze")


def _ms(values: List[float], fmt: str = "{:.1f}") -> str:
    """``mean ± sample std`` (the std unsigned)."""
    if not values:
        return ""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.replace('+', '').format(statistics.stdev(values))}"


def paired(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each record with ``d_acc_pts``, ``wall_saved`` and ``cpu_saved`` against its ``none`` run."""
    base = {(r["task"], r["seed"]): r for r in records if r["config"] == "none"}
    out = []
    for r in records:
        b = base.get((r["task"], r["seed"]))
        if b is None:
            continue
        out.append({**r, "d_acc_pts": 100 * (r["final_acc"] - b["final_acc"]),
                    "wall_saved": 1 - r["wall_s"] / b["wall_s"], "cpu_saved": 1 - r["cpu_s"] / b["cpu_s"]})
    return out


def table(records: List[Dict[str, Any]]) -> str:
    rows = paired(records)
    lines = ["| task | config | seeds | final acc % | Δ acc vs none, pts (better/worse/tied) | "
             "backward compute saved % | CPU time saved % | analysis s | "
             "reached none's final acc (seeds; CPU time vs none's) | "
             "layers frozen (first freeze, % of steps) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for task in sorted({r["task"] for r in rows}):
        for config in ORDER:
            rs = [r for r in rows if r["task"] == task and r["config"] == config]
            if not rs:
                continue
            d = [r["d_acc_pts"] for r in rs]
            tally = (f" ({sum(x > 0 for x in d)}/{sum(x < 0 for x in d)}/{sum(x == 0 for x in d)})"
                     if config != "none" else "")
            hits = [r for r in rs if r.get("cpu_to_target_s") is not None]
            none_cpu = {r["seed"]: r["cpu_s"] for r in rows
                        if r["task"] == task and r["config"] == "none"}
            ttt = ""
            if config != "none":
                ratio = [r["cpu_to_target_s"] / none_cpu[r["seed"]] for r in hits]
                ttt = f"{len(hits)}/{len(rs)}" + (f"; {_ms(ratio, '{:.2f}')}×" if ratio else "")
            frozen = [len(r["frozen"]) for r in rs]
            first = [100 * r["events"][0]["step"] / r["steps"] for r in rs if r["events"]]
            fz = ""
            if config != "none":
                fz = f"{_ms(frozen, '{:.0f}')} of {rs[0]['layers']}"
                fz += f" ({_ms(first, '{:.0f}')})" if first else ""
            lines.append(
                f"| {task} | {config} | {len(rs)} | {_ms([100 * r['final_acc'] for r in rs], '{:.2f}')} | "
                f"{_ms(d, '{:+.2f}') if config != 'none' else ''}{tally} | "
                f"{_ms([100 * r['bwd_saved'] for r in rs])} | "
                f"{_ms([100 * r['cpu_saved'] for r in rs]) if config != 'none' else ''} | "
                f"{statistics.mean(r['analysis_s'] for r in rs):.1f} | {ttt} | {fz} |")
    return "\n".join(lines)


def figure(records: List[Dict[str, Any]], path: str = FIGURE) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    rows = [r for r in paired(records) if r["config"] != "none"]
    tasks = sorted({r["task"] for r in rows})
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.6), squeeze=False)
    colours = dict(zip(ORDER[1:], ("tab:red", "tab:purple", "tab:pink", "tab:grey", "tab:orange",
                                   "tab:blue", "tab:green")))
    for ax, task in zip(axes[0], tasks):
        for config in ORDER[1:]:
            rs = [r for r in rows if r["task"] == task and r["config"] == config]
            if not rs:
                continue
            xs = [100 * r["cpu_saved"] for r in rs]
            ys = [r["d_acc_pts"] for r in rs]
            ax.scatter(xs, ys, s=18, alpha=0.5, color=colours[config])
            ax.scatter([statistics.mean(xs)], [statistics.mean(ys)], s=140, color=colours[config],
                       edgecolor="black", label=f"{config} (mean of {len(rs)})")
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(-0.3, color="black", lw=0.6, ls=":")
        ax.axvline(30, color="black", lw=0.6, ls=":")
        ax.set_title(f"{task}: vs no freezing, paired by seed")
        ax.set_xlabel("training CPU time saved (%)")
        ax.set_ylabel("Δ validation accuracy (points)")
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(records: List[Dict[str, Any]]) -> str:
    text = table(records)
    machines = sorted({r.get("machine", "") for r in records} - {""})
    with open(TABLE, "w", encoding="utf-8") as fh:
        fh.write("# Freeze study (`python benchmarks/freeze_study.py`)\n\n")
        fh.write("Machine: " + "; ".join(machines) + "\n\n" + text + "\n")
    figure(records)
    print(text)
    return text
