#!/usr/bin/env python
"""What a frozen prefix saves per training step: freezing layers by name vs the whole prefix.

For each task of ``freeze_tasks.py`` and each prefix share (a quarter / half of the analysed
layers), three models from the same weights are timed round-robin on the same batches, one
torch thread:

* ``none``: nothing frozen;
* ``by_name``: the prefix's analysed layers frozen (``freeze_layers(model, names)``, what
  ``freeze="apply"`` does by default): their norms and biases between them still train, so the
  input gradients and the autograd graph still run through the prefix;
* ``whole_prefix``: the same layers with ``whole_prefix=True`` (``Freeze(order=
  "prefix")``): nothing before the first trainable layer trains, so autograd records no graph
  through the prefix and the backward pass stops at its end.

Reported: median forward and forward+backward+optimizer-step seconds over ``--steps`` steps, and
the ratios to ``none``; plus the analytic backward compute saved (``freeze_tasks.BackwardCost``).

    python benchmarks/freeze_step_cost.py            # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from freeze_study import machine  # noqa: E402
from freeze_tasks import TASKS, BackwardCost  # noqa: E402

from ww_callbacks.torch_utils import freeze_layers, model_layer_names  # noqa: E402

OUT = os.path.join(HERE, "results", "freeze_step_cost.json")


def time_step(task, model, opt, batch):
    t0 = time.perf_counter()
    loss = task.loss(model, batch)
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return t1 - t0, time.perf_counter() - t0


def measure(task, share: float, steps: int):
    models = {}
    for kind in ("none", "by_name", "whole_prefix"):
        model = task.build(0)
        model.train()
        names = model_layer_names(model)
        k = int(share * len(names))
        cost = BackwardCost(model, lambda m=model: task.loss(m, task.example_batch))  # nothing frozen
        if kind != "none":
            freeze_layers(model, names[:k], whole_prefix=(kind == "whole_prefix"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        models[kind] = (model, opt, cost.saved_now)
    batches = task.batches(0, 0)
    times = {kind: ([], []) for kind in models}
    for i in range(steps + 2):
        batch = batches[i % len(batches)]
        for kind, (model, opt, _) in models.items():
            fwd, step = time_step(task, model, opt, batch)
            if i >= 2:  # warm-up
                times[kind][0].append(fwd)
                times[kind][1].append(step)
    base_f, base_s = (statistics.median(v) for v in times["none"])
    rows = []
    for kind, (fw, st) in times.items():
        f, s = statistics.median(fw), statistics.median(st)
        rows.append({"task": task.name, "share": share, "layers_frozen": int(share * len(names)),
                     "layers": len(names), "kind": kind, "forward_s": f, "step_s": s,
                     "forward_ratio": f / base_f, "step_ratio": s / base_s,
                     "bwd_saved": models[kind][2]})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.tasks:
        task = TASKS[name]()
        for share in (0.25, 0.5):
            rows += measure(task, share, args.steps)
    with open(OUT, "w", encoding="utf-8") as fh:
        json.dump({"machine": machine(), "steps": args.steps, "rows": rows}, fh, indent=1)
    print(f"machine: {machine()}; median of {args.steps} steps")
    print("| task | prefix frozen | freezing | forward s (× none) | step s (× none) | "
          "backward compute saved |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['layers_frozen']} of {r['layers']} | {r['kind']} | {r['forward_s']:.3f} "
              f"({r['forward_ratio']:.2f}×) | {r['step_s']:.3f} ({r['step_ratio']:.2f}×) | "
              f"{100 * r['bwd_saved']:.0f}% |")


if __name__ == "__main__":
    main()
