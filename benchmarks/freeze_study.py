#!/usr/bin/env python
"""Is auto-freeze worth it? Freezing configurations compared on two pretrained fine-tunes.

Tasks (``benchmarks/freeze_tasks.py``; weights and data ship in pip packages): a full fine-tune
of MiniLM-L6 on ChatterBot topics and of EfficientNet-Lite0 on scikit-learn's digits. Each
configuration trains the same model from the same seed in a plain PyTorch loop, one torch thread:

* ``none``: nothing frozen;
* ``alpha``: ``WeightWatcherController(freeze="apply")`` with the options that were the defaults
  before this study (``order="any"``, band (2, 6)), one synchronous analysis every 10% of the
  steps from the start (the analysis time is counted in the run's time);
* ``alpha_prefix``: the same with ``Freeze(order="prefix", band=None)`` (the
  defaults since this study): layers
  are frozen front to back only, when their alpha has settled whatever its value (pretrained
  embeddings and stems sit outside the 2-6 band), and the whole frozen prefix (its norms and
  biases too) stops training;
* ``alpha_early``: the default options with ``window=2`` and an analysis every 5% of the steps,
  so that layers can freeze from 10% of the run instead of 30%;
* ``random``: at the steps where ``alpha`` froze layers (same seed), as many non-head layers
  chosen at random;
* ``front``: at the same steps, as many layers taken front to back (the whole prefix): is it
  alpha's choice of layers, or only freezing early layers at those moments?
* ``static``: the first k analysed layers (their whole prefix) frozen from the start, k chosen
  so that the backward compute saved is closest to ``alpha``'s (same seed);
* ``autofreeze``: AutoFreeze-style (Liu et al. 2021): at every 10% of the steps, each layer's
  mean gradient norm over the interval is compared with the previous interval's; the leading
  layers whose relative change is below the median of the trainable layers' are frozen, front to
  back, at most half the layers, never the head.

Per run (``benchmarks/results/freeze_study.jsonl``, one JSON object a line): task, config, seed,
checkpoint, final validation accuracy, accuracy at 8 points, wall/CPU seconds (evaluation time
excluded; analyses included), time to reach the ``none`` run's final accuracy, backward compute
saved (analytic, :class:`freeze_tasks.BackwardCost`), the layers frozen and at which steps.

Run (about 45 minutes of training on 2 cores with two runs at a time; resumable: runs already in
the file are skipped)::

    python benchmarks/freeze_study.py                      # all tasks, configs, 3 seeds
    python benchmarks/freeze_study.py --tasks effnet-digits --seeds 1
    python benchmarks/freeze_study.py --report-only        # table + figure from the records
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

from freeze_tasks import TASKS, BackwardCost  # noqa: E402

from ww_callbacks import Freeze, WeightWatcherController  # noqa: E402
from ww_callbacks.torch_utils import freeze_layers, model_layer_names, resolve_layer_params  # noqa: E402

CONFIGS = ("none", "alpha", "alpha_prefix", "alpha_early", "random", "front", "static", "autofreeze")
#: The controller configurations: (Freeze options, analyses per run).
#: Before this study the defaults were order "any" and band (2, 6); pinned here so that the
#: records keep their meaning whatever the defaults are now.
ALPHA = {"alpha": ({"order": "any", "band": "weightwatcher"}, 10),
         "alpha_prefix": ({"order": "prefix", "band": None}, 10),
         "alpha_early": ({"order": "any", "band": "weightwatcher", "window": 2}, 20)}
RESULTS = os.path.join(HERE, "results", "freeze_study.jsonl")
CHECKS = 10  # analyses / AutoFreeze checks per run
EVALS = 8  # accuracy measurements per run


def analysed_layers(model) -> List[str]:
    """The layer names ``ww_core`` analyses, in model order (the freeze configurations' universe)."""
    return model_layer_names(model)


def freeze_prefix(model, names: List[str], k: int) -> None:
    """Freeze the whole prefix up to analysed layer ``k - 1`` (what a user freezing blocks does)."""
    if k > 0:
        freeze_layers(model, names[k - 1:k], whole_prefix=True)


class AutoFreeze:
    """Gradient-norm-change freezing, front to back (see the module docstring)."""

    def __init__(self, model, names: List[str], max_share: float = 0.5):
        self.model, self.names = model, names
        self.params = {n: [p for _, p in plist] for n, (_, plist) in
                       resolve_layer_params(model, names).items()}
        self.sums = {n: 0.0 for n in names}
        self.count = 0
        self.previous: Optional[Dict[str, float]] = None
        self.frozen = 0  # length of the frozen prefix (in analysed layers)
        self.cap = int(max_share * len(names))

    def after_backward(self) -> None:
        for n in self.names[self.frozen:]:
            g = [p.grad for p in self.params[n] if p.grad is not None]
            if g:
                self.sums[n] += float(torch.sqrt(sum((x.float() ** 2).sum() for x in g)))
        self.count += 1

    def check(self) -> List[str]:
        means = {n: self.sums[n] / max(1, self.count) for n in self.names}
        self.sums = {n: 0.0 for n in self.names}
        self.count = 0
        prev, self.previous = self.previous, means
        if prev is None:
            return []
        live = self.names[self.frozen:-1]  # never the head
        change = {n: abs(means[n] - prev[n]) / prev[n] if prev[n] > 0 else np.inf for n in live}
        if not change:
            return []
        threshold = float(np.median(list(change.values())))
        new = []
        for n in live:
            if self.frozen >= self.cap or not change[n] < threshold:
                break
            new.append(n)
            self.frozen += 1
        return new


def run_one(task, config: str, seed: int, reference: Dict[str, Any], workdir: str) -> Dict[str, Any]:
    model = task.build(seed)
    model.train()
    names = analysed_layers(model)
    steps_per_epoch = len(task.batches(seed, 0))
    total = task.epochs * steps_per_epoch
    opt, sched = task.optimizer(model, total)
    cost = BackwardCost(model, lambda: task.loss(model, task.example_batch))
    every = max(1, total // (ALPHA[config][1] if config in ALPHA else CHECKS))
    eval_at = {round(total * (i + 1) / EVALS) for i in range(EVALS)}
    events: List[Dict[str, Any]] = []  # {"step", "layers"}
    state = {"step": 0}

    ww = None
    auto = None
    plan: Dict[int, int] = {}
    rng = np.random.default_rng(7_000 + seed)
    if config in ALPHA:
        opts = ALPHA[config][0]
        ww = WeightWatcherController(start_fraction=0.0, every_n_steps=every, async_analysis=False,
                                     output_dir=os.path.join(workdir, f"{task.name}-{config}-{seed}"),
                                     trackers=["local"], log_fn=lambda line: None,
                                     freeze=Freeze.apply(**opts))

        def on_freeze(freeze, unfreeze):
            policy = ww.action_set.freeze_policy
            frozen = freeze_layers(model, freeze, [opt], whole_prefix=policy.whole_prefix)
            events.append({"step": state["step"], "layers": list(freeze), "params": len(frozen)})
        ww.bind_actions(freeze_fn=on_freeze)
        ww.configure(total_steps=total, total_epochs=task.epochs)
        ww.start_actions()
    elif config in ("random", "front"):
        plan = {e["step"]: len(e["layers"]) for e in reference["alpha"]["events"]}
    elif config == "static":
        k = reference["static_k"]
        if k:
            freeze_prefix(model, names, k)
            events.append({"step": 0, "layers": names[:k]})
    elif config == "autofreeze":
        auto = AutoFreeze(model, names)

    frozen_names: List[str] = []
    curve = []
    wall = cpu = analysis = 0.0
    for epoch in range(task.epochs):
        for batch in task.batches(seed, epoch):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if auto is not None:
                auto.after_backward()
            opt.step()
            sched.step()
            cost.step()
            state["step"] += 1
            step = state["step"]
            if ww is not None:
                a0 = time.perf_counter()
                ww.maybe_run(model, step=step, epoch=epoch)
                analysis += time.perf_counter() - a0
            elif auto is not None and step % every == 0:
                new = auto.check()
                if new:
                    freeze_prefix(model, names, auto.frozen)
                    events.append({"step": step, "layers": new})
            elif step in plan and config == "front":
                k = min(len(frozen_names) + plan[step], len(names) - 1)
                new = names[len(frozen_names):k]
                freeze_prefix(model, names, k)
                frozen_names += new
                events.append({"step": step, "layers": new})
            elif step in plan:
                eligible = [n for n in names[:-1] if n not in frozen_names]
                pick = set(rng.choice(eligible, min(plan[step], len(eligible)), replace=False).tolist())
                new = [n for n in names if n in pick]
                freeze_layers(model, new, [opt])
                frozen_names += new
                events.append({"step": step, "layers": new})
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            if step in eval_at:
                curve.append({"step": step, "wall_s": wall, "cpu_s": cpu, "acc": task.accuracy(model)})
    if ww is not None:
        ww.close()
    final = curve[-1]["acc"]
    out = {"task": task.name, "config": config, "seed": seed, "checkpoint": task.checkpoint,
           "final_acc": final, "curve": curve, "wall_s": wall, "cpu_s": cpu, "analysis_s": analysis,
           "steps": total, "bwd_saved": cost.saved, "events": events,
           "frozen": [n for e in events for n in e["layers"]], "layers": len(names),
           "threads": torch.get_num_threads()}
    base = reference.get("none")
    if base is not None:
        target = base["final_acc"]
        hit = next((c for c in curve if c["acc"] >= target), None)
        out["target_acc"] = target
        out["time_to_target_s"] = hit["wall_s"] if hit else None
        out["cpu_to_target_s"] = hit["cpu_s"] if hit else None
    return out


def static_k(task, seed: int, target_saved: float) -> int:
    """The prefix length whose backward compute saved (frozen from step 0) is closest to the target."""
    model = task.build(seed)
    names = analysed_layers(model)
    cost = BackwardCost(model, lambda: task.loss(model, task.example_batch))  # nothing frozen yet
    best, best_gap = 0, abs(target_saved)
    for k in range(1, len(names) // 2 + 1):
        for p in model.parameters():
            p.requires_grad_(True)
        freeze_prefix(model, names, k)
        gap = abs(cost.saved_now - target_saved)
        if gap < best_gap:
            best, best_gap = k, gap
    return best


def load(path: str) -> List[Dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.report_only:
        torch.set_num_threads(1)
        done = {(r["task"], r["config"], r["seed"]) for r in load(args.out)}
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="ww-freeze-") as workdir:
            for name in args.tasks:
                task = TASKS[name]()
                for seed in range(args.seeds):
                    ref = {r["config"]: r for r in load(args.out) if r["task"] == name and r["seed"] == seed}
                    for config in [c for c in CONFIGS if c in args.configs]:
                        if (name, config, seed) in done:
                            continue
                        if config in ("random", "front", "static") and "alpha" not in ref:
                            print(f"skip {name} {config} seed {seed}: needs the alpha run", flush=True)
                            continue
                        if config == "static":
                            ref["static_k"] = static_k(task, seed, ref["alpha"]["bwd_saved"])
                        r = run_one(task, config, seed, ref, workdir)
                        r["machine"] = machine()
                        ref[config] = r
                        with open(args.out, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps(r) + "\n")
                        print(f"{name} {config:12s} seed {seed}: acc {r['final_acc']:.4f} wall "
                              f"{r['wall_s']:.1f}s cpu {r['cpu_s']:.1f}s analysis {r['analysis_s']:.1f}s "
                              f"bwd saved {100 * r['bwd_saved']:.1f}% frozen {len(r['frozen'])} at "
                              f"{[e['step'] for e in r['events']]}", flush=True)
    from freeze_report import write_report

    write_report(load(args.out))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, 1 torch thread")


if __name__ == "__main__":
    main()
