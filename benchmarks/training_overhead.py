#!/usr/bin/env python
"""How much slower training gets with ``WeightWatcherCallback`` analysing every epoch (CPU).

The model: a small CNN on scikit-learn's ``load_digits`` (1,797 images, 8×8 upsampled to 32×32;
conv 1→32→64→128, then Linear 2048→1024→1024→10, 3.3 M weights), Lightning, CPU, torch's default
threads (all cores), batch 64, so the background analysis competes with training for the cores.
Each run is a fresh process (``--child``); only ``trainer.fit`` is timed. Configurations run
round-robin (A, B, C, ... then again) so that the machine's load affects all of them:

* ``none``: no callback.
* ``async``: ``WeightWatcherCallback(every_n_epochs=1, start_fraction=0.0)`` (default: async).
* ``sync``: the same with ``async_analysis=False``.
* ``async_t1``: async, and the analysis thread calls ``torch.set_num_threads(1)`` before each
  analysis (its own torch/OpenMP threads; the script records whether the training thread's
  ``torch.get_num_threads()`` changed).
* ``async_t1_nice``: ``async_t1`` plus ``os.setpriority`` nice 19 on the analysis thread (Linux:
  per thread; threads it starts inherit it).
* ``async_tpl``: async with ``threadpoolctl.threadpool_limits(1)`` around each analysis.
* ``step``: an analysis requested every optimizer step (``every_n_steps=1``), no cap.
* ``step_budget``: the same with ``max_overhead=0.05`` (the background thread at nice 10, one
  torch thread: the budget's defaults).
* ``step_budget_nice0``: ``step_budget`` without lowering the thread's priority
  (``OverheadBudget(0.05, nice=0)``).

The figure of merit for the budget is the process's CPU time of ``trainer.fit`` (``cpu_s``)
against ``none``, best of the runs of each (``--epochs 5 --repeat 2`` for a short check)::

    python benchmarks/training_overhead.py --configs none step_budget step_budget_nice0 --epochs 5 --repeat 2

The variants wrap ``ww_core.analyze`` (which the callback's default engine calls), so the
callback still uses its default engine. Per run: wall time, the controller's
``blocking_seconds``, analyses, skipped analyses, the analyses' own durations, load average::

    python benchmarks/training_overhead.py            # 3 repeats of all but async_tpl, 10 epochs
    python benchmarks/training_overhead.py --configs none async --repeat 5
    python benchmarks/training_overhead.py --configs none async sync --data-repeat 4 \
        --out benchmarks/results/training_overhead_x4.json     # 4x longer epochs
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIGS = ["none", "async", "sync", "async_t1", "async_t1_nice", "async_tpl", "step", "step_budget",
           "step_budget_nice0"]
DEFAULT_CONFIGS = CONFIGS[:5]


def child(config: str, epochs: int, seed: int, data_repeat: int = 1,
          threads: int = 0) -> Dict[str, Any]:
    """One training run in this process."""
    os.environ.setdefault("WANDB_SILENT", "true")
    sys.path.insert(0, str(REPO))
    import lightning.pytorch as pl
    import torch
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import ww_core

    pl.seed_everything(seed, verbose=False)
    if threads:
        torch.set_num_threads(threads)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    x, y = x.repeat(data_repeat, 1, 1, 1), y.repeat(data_repeat)  # a longer epoch, the same model
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

    class CNN(pl.LightningModule):
        def __init__(self):
            super().__init__()
            c = [nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                 nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                 nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
            self.net = nn.Sequential(*c, nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                                     nn.ReLU(), nn.Linear(1024, 10))

        def training_step(self, batch, _):
            xb, yb = batch
            loss = nn.functional.cross_entropy(self.net(xb), yb)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    durations: List[float] = []
    main_threads: List[int] = []
    if config.startswith("async_"):
        inner = ww_core.analyze

        def limited(*a, **kw):
            if threading.current_thread() is not threading.main_thread():
                if "t1" in config:
                    torch.set_num_threads(1)
                if config == "async_t1_nice":
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            t0 = time.perf_counter()
            if config == "async_tpl":
                from threadpoolctl import threadpool_limits
                with threadpool_limits(1):
                    out = inner(*a, **kw)
            else:
                out = inner(*a, **kw)
            durations.append(time.perf_counter() - t0)
            return out

        ww_core.analyze = limited          # what the callback's default engine calls
    elif config in ("async", "sync"):
        inner = ww_core.analyze

        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            durations.append(time.perf_counter() - t0)
            return out

        ww_core.analyze = timed

    class Probe(pl.Callback):              # the training thread's torch threads, each epoch
        def on_train_epoch_end(self, trainer, module):
            main_threads.append(torch.get_num_threads())

    callbacks: List[Any] = [Probe()]
    watcher = None
    out_dir = tempfile.mkdtemp(prefix="ww-overhead-")
    if config.startswith("step"):
        from ww_callbacks.budget import OverheadBudget
        from ww_callbacks.lightning import WeightWatcherCallback
        budget = {"step": None, "step_budget": 0.05,
                  "step_budget_nice0": OverheadBudget(0.05, nice=0)}[config]
        watcher = WeightWatcherCallback(every_n_steps=1, start_fraction=0.0, output_dir=out_dir,
                                        max_overhead=budget)
        callbacks.append(watcher)
    elif config != "none":
        from ww_callbacks.lightning import WeightWatcherCallback
        watcher = WeightWatcherCallback(every_n_epochs=1, start_fraction=0.0, output_dir=out_dir,
                                        async_analysis=config != "sync")
        callbacks.append(watcher)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                         callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=50, default_root_dir=out_dir)
    model = CNN()
    la0 = os.getloadavg()
    cpu0 = os.times()
    t0 = time.perf_counter()
    trainer.fit(model, train)
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    r: Dict[str, Any] = {"config": config, "wall_s": wall, "epochs": epochs, "data_repeat": data_repeat,
                         "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
                         "loadavg_start": la0[0], "loadavg_end": os.getloadavg()[0],
                         "torch_threads_start": main_threads[0] if main_threads else None,
                         "torch_threads_main_min": min(main_threads) if main_threads else None,
                         "weights": sum(p.numel() for p in model.parameters()),
                         "analysis_s": durations}
    if watcher is not None:
        c = watcher.controller
        r.update(blocking_s=c.blocking_seconds, analyses=c.num_analyses,
                 skipped=c.skipped_analyses, asynchronous=c.asynchronous,
                 budget_skipped=c.budget.skipped, overhead_reported=c.budget.share(),
                 charged_s=c.budget.spent)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, choices=CONFIGS)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--data-repeat", type=int, default=1,
                    help="each epoch passes over the 1,797 images this many times (longer epochs)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads of the training (0: torch's default); 1 keeps CPU time "
                         "meaningful on a loaded machine (no OpenMP threads spinning)")
    ap.add_argument("--out", default=str(HERE / "results" / "training_overhead.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.epochs, 0, args.data_repeat, args.threads)), flush=True)
        return 0
    import torch
    report: Dict[str, Any] = {
        "started": _dt.datetime.now().isoformat(timespec="seconds"), "cores": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": args.threads or torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                               "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "runs": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for k in range(args.repeat):
        for cfg in args.configs:
            p = subprocess.run([sys.executable, __file__, "--child", cfg, "--epochs", str(args.epochs),
                                "--data-repeat", str(args.data_repeat), "--threads", str(args.threads)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(REPO))
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if p.returncode != 0 or not lines:
                raise RuntimeError(f"{cfg} run failed (rc {p.returncode})")
            r = json.loads(lines[-1])
            r["repeat"] = k
            report["runs"].append(r)
            an = r.get("analysis_s") or []
            print(f"[overhead] {k + 1}/{args.repeat} {cfg}: {r['wall_s']:.2f} s, cpu {r['cpu_s']:.2f} s, "
                  f"reported {r.get('overhead_reported')}, budget-skipped {r.get('budget_skipped')}, "
                  f"blocking "
                  f"{r.get('blocking_s', 0):.3f} s, analyses {r.get('analyses', 0)} "
                  f"(skipped {r.get('skipped', 0)}, median {statistics.median(an) if an else 0:.3f} s), "
                  f"load {r['loadavg_start']:.2f}->{r['loadavg_end']:.2f}, main threads "
                  f"{r['torch_threads_main_min']}", flush=True)
            report["summary"] = summarize(report["runs"])
            out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    return 0


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["config"], []).append(r)
    base = statistics.median(r["wall_s"] for r in by["none"]) if "none" in by else None
    base_cpu = min(r["cpu_s"] for r in by["none"]) if "none" in by else None
    s: Dict[str, Any] = {}
    for cfg, rs in by.items():
        med = statistics.median(r["wall_s"] for r in rs)
        an = [x for r in rs for x in r.get("analysis_s") or []]
        s[cfg] = {"median_wall_s": med, "min_wall_s": min(r["wall_s"] for r in rs),
                  "runs_s": [round(r["wall_s"], 2) for r in rs],
                  "median_cpu_s": statistics.median(r["cpu_s"] for r in rs),
                  "best_cpu_s": min(r["cpu_s"] for r in rs),
                  "cpu_runs_s": [round(r["cpu_s"], 2) for r in rs],
                  "cpu_overhead_best": min(r["cpu_s"] for r in rs) / base_cpu - 1 if base_cpu else None,
                  "budget_skipped": [r.get("budget_skipped", 0) for r in rs],
                  "overhead_reported": [r.get("overhead_reported") for r in rs],
                  "slowdown": med / base if base else None,
                  "blocking_s_median": statistics.median(r.get("blocking_s", 0.0) for r in rs),
                  "blocking_share": statistics.median(r.get("blocking_s", 0.0) / r["wall_s"] for r in rs),
                  "analyses": [r.get("analyses", 0) for r in rs],
                  "skipped": [r.get("skipped", 0) for r in rs],
                  "analysis_s_median": statistics.median(an) if an else None,
                  "loadavg": [round(r["loadavg_start"], 2) for r in rs],
                  "torch_threads_main_min": [r["torch_threads_main_min"] for r in rs]}
    return s


if __name__ == "__main__":
    sys.exit(main())
