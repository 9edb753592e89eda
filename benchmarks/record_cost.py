#!/usr/bin/env python
"""What recording an analysis costs, and whether it grows with the run.

Two soaks, each through :class:`ww_callbacks.controller.WeightWatcherController` with its default
trackers (``"auto"`` with no framework logger: the local record, i.e. the history files, the
live HTML report and ``alpha_over_time.png``), synchronous analyses, one process:

* ``100``: 300 analyses of a 100-layer model (96×96 ``Linear`` layers). ``--engine real`` runs
  ``ww_core.analyze`` on the model (weights nudged each step); ``--engine synthetic`` feeds made-up
  ``AnalysisResult`` objects of the same shape, which isolates the record. Per analysis: the
  controller's wall time (``maybe_run``), the analysis' own time (measured inside the analyze
  function) and the difference, the record; and the process CPU time of ``maybe_run`` (all
  threads), which a loaded machine inflates less than wall time. Reported as medians over analyses 50–100 and
  250–300, their ratio, and the process RSS at analysis 50 and 300.
* ``1000``: 1,000 layers × 1,000 analyses of synthetic results (record only): medians over
  analyses 100–200 and 900–1000 and RSS at 100, 500 and 1000 (memory must be flat).

Usage::

    python benchmarks/record_cost.py                          # both soaks, real engine at 100
    python benchmarks/record_cost.py --soak 100 --engine synthetic
    python benchmarks/record_cost.py --soak 1000 --out benchmarks/results/record_cost_1000.json

``WW_BENCH_INSTALLED=1`` measures the installed ``ww_callbacks`` instead of this checkout (e.g.
an earlier release, for a side-by-side). The run folders go to a temporary directory, removed at
the end (the 1,000-layer soak writes
about 1.5 GB of history files on the way).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

if os.environ.get("WW_BENCH_INSTALLED") != "1":   # this checkout, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def synthetic(num_layers: int, seed: int = 0):
    """An analyze function returning made-up results shaped like ``ww_core.analyze``'s."""
    from ww_core.result import AnalysisResult, LayerResult

    rng = np.random.default_rng(seed)
    base = 2.0 + 4.0 * rng.random(num_layers)

    def analyze(model: Any, layers: Any = None, **options: Any) -> Any:
        step = model["step"] if isinstance(model, dict) else 0
        alphas = base + 0.3 * np.sin(step / 20.0 + np.arange(num_layers)) + rng.normal(0, 0.02, num_layers)
        out = []
        for i, a in enumerate(alphas):
            a = float(a)
            warning = "under-trained" if a > 6 else ("over-trained" if a < 2 else "")
            out.append(LayerResult(name=f"layers.{i}", type="dense", N=96, M=96, num_evals=96,
                                   alpha=a, alpha_hill=a + 0.05, alpha_weighted=a * 1.1,
                                   log_norm=a / 3, log_spectral_norm=a / 5, stable_rank=9.0,
                                   entropy=0.9, D=0.05, xmin=0.5, xmax=9.0, warning=warning,
                                   flags=(warning,) if warning else ()))
        return AnalysisResult(layers=out)

    return analyze


def real_model(num_layers: int):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(96, 96, bias=False) for _ in range(num_layers)])


def soak(num_layers: int, analyses: int, engine: str, windows: List[tuple], rss_at: List[int]) -> Dict:
    from ww_callbacks.controller import WeightWatcherController

    folder = tempfile.mkdtemp(prefix="ww-record-cost-")
    inner: List[float] = []
    if engine == "real":
        import torch

        import ww_core

        model = real_model(num_layers)

        def analyze(m: Any, layers: Any = None, **options: Any) -> Any:
            t0 = time.perf_counter()
            res = ww_core.analyze(m, layers=layers, **options)
            inner.append(time.perf_counter() - t0)
            return res
    else:
        model, fake = None, synthetic(num_layers)

        def analyze(m: Any, layers: Any = None, **options: Any) -> Any:
            t0 = time.perf_counter()
            res = fake(m, layers=layers, **options)
            inner.append(time.perf_counter() - t0)
            return res

    ctl = WeightWatcherController(every_n_steps=1, start_fraction=0.0, analyze_fn=analyze,
                                  async_analysis=False, log_fn=lambda line: None,
                                  output_dir=os.path.join(folder, "ww"))
    ctl.configure(total_steps=analyses + 1, current_step=0)
    total, cpu, rss = [], [], {}
    try:
        for step in range(1, analyses + 1):
            if engine == "real":
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.001 * torch.randn_like(p))
                target = model
            else:
                target = {"step": step}
            t0, c0 = time.perf_counter(), time.process_time()
            ctl.maybe_run(target, step=step, epoch=0)
            total.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            if step in rss_at:
                gc.collect()
                rss[step] = round(rss_mb(), 1)
            if step % 100 == 0:                  # progress, for long soaks cut short
                print(json.dumps({"layers": num_layers, "step": step, "rss_mb": round(rss_mb(), 1),
                                  "total_ms_median_last_100": round(1e3 * statistics.median(total[-100:]), 2),
                                  "record_ms_median_last_100": round(1e3 * statistics.median(
                                      [t - i for t, i in zip(total[-100:], inner[-100:])]), 2)}),
                      file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        ctl.close()
        close_s = time.perf_counter() - t0
        held = getattr(ctl.history, "rows_in_memory", None)
        (local,) = [t for t in ctl.trackers if getattr(t, "name", "") == "local"] or [None]
        plots = getattr(local, "num_plots", None)
        disk_mb = sum(os.path.getsize(os.path.join(folder, "ww", f))
                      for f in os.listdir(os.path.join(folder, "ww"))) / 2**20
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    record = [t - i for t, i in zip(total, inner)]
    out: Dict[str, Any] = {"layers": num_layers, "analyses": analyses, "engine": engine,
                           "rss_mb": rss, "rows_in_memory_at_end": held, "png_redraws": plots,
                           "close_s": round(close_s, 3), "files_mb": round(disk_mb, 1), "windows": {}}
    for lo, hi in windows:
        sl = slice(lo - 1, hi)
        out["windows"][f"{lo}-{hi}"] = {
            "total_ms_median": round(1e3 * statistics.median(total[sl]), 2),
            "total_ms_mean": round(1e3 * statistics.fmean(total[sl]), 2),
            "analysis_ms_median": round(1e3 * statistics.median(inner[sl]), 2),
            "record_ms_median": round(1e3 * statistics.median(record[sl]), 2),
            "record_ms_mean": round(1e3 * statistics.fmean(record[sl]), 2),
            "cpu_ms_median": round(1e3 * statistics.median(cpu[sl]), 2)}
    (a, b) = list(out["windows"].values())[0], list(out["windows"].values())[-1]
    out["late_over_early_total_median"] = round(b["total_ms_median"] / a["total_ms_median"], 3)
    out["late_over_early_record_median"] = round(b["record_ms_median"] / a["record_ms_median"], 3)
    keys = sorted(rss)
    out["rss_growth_mb"] = round(rss[keys[-1]] - rss[keys[0]], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--soak", choices=["100", "1000", "both"], default="both")
    parser.add_argument("--engine", choices=["real", "synthetic", "both"], default="both",
                        help="for the 100-layer soak")
    parser.add_argument("--analyses", type=int, default=None, help="override the number of analyses")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results: Dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, "
                                          f"{os.cpu_count()} cores", "python": platform.python_version(),
                               "load_avg_start": os.getloadavg(), "runs": []}
    if args.soak in ("100", "both"):
        n = args.analyses or 300
        for engine in (["real", "synthetic"] if args.engine == "both" else [args.engine]):
            res = soak(100, n, engine, [(50, 100), (n - 50, n)], [50, n])
            results["runs"].append(res)
            print(json.dumps(res))
    if args.soak in ("1000", "both"):
        n = args.analyses or 1000
        res = soak(1000, n, "synthetic", [(100, 200), (n - 100, n)], [100, n // 2, n])
        results["runs"].append(res)
        print(json.dumps(res))
    results["load_avg_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
