#!/usr/bin/env python
"""Do ``balance_lr=True`` (TempBalance) and ``freeze="apply"`` help? Our own CPU experiment.

Two small real tasks, no downloads, trained with Lightning and the real
:class:`ww_callbacks.lightning.WeightWatcherCallback`:

* ``digits-mlp``: scikit-learn's ``load_digits`` (1797 8x8 images, 10 classes, shipped in the
  package), 80/20 split, MLP 64-256-256-256-256-10;
* ``charlm-mlp``: next-character prediction on the docstrings of Python's own standard library
  (the text ships with the interpreter; same text for the same Python version), 16-character
  context, embedding 32 -> MLP 512-256-256-256-vocab.

Each task runs three configurations with the same optimizer (SGD, momentum 0.9, weight decay
5e-4, per-step cosine ``LambdaLR``; per-layer named param groups in all three, so the optimizer is
identical) and ``--seeds`` seeds (default 5; model init and batch order; the data split is fixed):

* ``baseline``: no callback;
* ``balance_lr``: ``WeightWatcherCallback(balance_lr=True)``, TempBalance defaults (s1 0.5, s2 1.5,
  Hill alpha, first/last layer untuned), one analysis per epoch from the first epoch;
* ``freeze``: ``WeightWatcherCallback(freeze="apply")``, FreezePolicy defaults (band (2, 6),
  tol 0.05, window 3, max_share 0.5, head protected), one analysis per epoch.

Two controls separate "the alpha information helps" from "any such intervention helps":

* ``balance_lr_shuffled``: the same TempBalance factors, re-assigned to the tuned layers by a
  random permutation at every analysis (same spread and mean LR, alpha ranking destroyed);
* ``freeze_random``: the freeze policy runs in ``"suggest"`` mode to decide *when* and *how many*
  layers to freeze; that many layers are then frozen at random among the non-head layers.

Reported per task and configuration: final test accuracy (mean ± sample std over seeds), wall
and CPU time of ``fit`` (mean ± std; the callback runs include their analyses, done synchronously here so
that decisions land at the same step in every run — asynchronous analysis, the default for one
process, would overlap them with training), the analysis time alone, and for ``freeze`` the layers
frozen and the **backward compute saved**: backward FLOPs of the Linear layers counted per step
from the ``requires_grad`` state at that step (weight gradient ``2·B·in·out`` when the layer
trains; input gradient ``2·B·in·out`` when any earlier layer trains), relative to the same count
with nothing frozen. It is an analytic count, not a timing: at this size the wall time is
dominated by per-step overhead, not by the matrix products.

Run (about 8 minutes on 2 cores, one torch thread)::

    KERAS_BACKEND=torch python benchmarks/actions_evidence.py             # writes the report
    python benchmarks/actions_evidence.py --tasks digits-mlp --seeds 1    # quick look

Output: ``benchmarks/results/actions_evidence.md`` (table + per-run rows) and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
    logging.getLogger(name).setLevel(logging.ERROR)

import lightning.pytorch as pl  # noqa: E402

from ww_callbacks.lightning import WeightWatcherCallback, layer_param_groups  # noqa: E402

CONFIGS = ("baseline", "balance_lr", "balance_lr_shuffled", "freeze", "freeze_random")


# --------------------------------------------------------------------------- data
def digits_data():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    n = int(0.8 * len(x))
    return (torch.tensor(x[:n]), torch.tensor(y[:n])), (torch.tensor(x[n:]), torch.tensor(y[n:]))


def stdlib_text(max_chars: int) -> str:
    """Docstrings of the standard library (modules, their classes and functions), fixed order."""
    import contextlib
    import importlib
    import io

    skip = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "__hello__",
            "__phello__"}
    parts: List[str] = []
    total = 0
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in skip:
            continue
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        objs = [mod] + [v for _, v in sorted(vars(mod).items())
                        if (inspect.isclass(v) or inspect.isfunction(v))
                        and getattr(v, "__module__", None) == name]
        for obj in objs:
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(doc)
                total += len(doc) + 2
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def charlm_data(context: int = 16, n_train: int = 80000, n_test: int = 10000):
    text = stdlib_text(400000)
    chars = sorted(set(text))
    keep = [c for c in chars if text.count(c) >= 20]
    index = {c: i + 1 for i, c in enumerate(keep)}            # 0 = rare character
    ids = np.array([index.get(c, 0) for c in text], dtype=np.int64)
    rng = np.random.default_rng(0)
    split = int(0.85 * len(ids))                               # test text comes after train text
    starts_tr = rng.choice(split - context - 1, n_train, replace=False)
    starts_te = split + rng.choice(len(ids) - split - context - 1, n_test, replace=False)

    def windows(starts):
        x = np.stack([ids[s:s + context] for s in starts])
        y = ids[starts + context]
        return torch.tensor(x), torch.tensor(y)

    return windows(starts_tr), windows(starts_te), len(keep) + 1


# --------------------------------------------------------------------------- models
class DigitsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)


class CharMLP(nn.Module):
    def __init__(self, vocab: int, context: int = 16, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.net = nn.Sequential(nn.Linear(context * dim, 256), nn.ReLU(), nn.Linear(256, 256),
                                 nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, vocab))

    def forward(self, x):
        return self.net(self.emb(x).flatten(1))


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float, total_steps: int):
        super().__init__()
        self.net, self.lr, self.total_steps = net, lr, total_steps

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(layer_param_groups(self, base_lr=self.lr), lr=self.lr, momentum=0.9,
                              weight_decay=5e-4)
        total = self.total_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        return [opt], [{"scheduler": sched, "interval": "step"}]


class ShuffledFactors:
    """Control: TempBalance's factors, randomly permuted among the tuned layers at each analysis."""

    def __init__(self, seed: int):
        from ww_callbacks.actions import LRBalancePolicy

        self.rng = np.random.default_rng(1000 + seed)
        self.policy = LRBalancePolicy(True)
        self.ww: Any = None

    def on_analysis(self, controller, result, step, epoch):
        from ww_callbacks.torch_utils import apply_lr_factors

        factors = self.policy.compute(result).factors
        names = list(factors)
        perm = self.rng.permutation(len(names))
        shuffled = {n: factors[names[i]] for n, i in zip(names, perm)}
        trainer = self.ww._trainer
        for opt in trainer.optimizers:
            apply_lr_factors(opt, [c.scheduler for c in trainer.lr_scheduler_configs], shuffled)


class RandomFreeze:
    """Control: when the alpha policy (suggest mode) would freeze n layers, freeze n random
    non-head layers instead."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(2000 + seed)
        self.ww: Any = None
        self.frozen: List[str] = []
        self.epochs: List[int] = []

    def on_analysis(self, controller, result, step, epoch):
        from ww_callbacks.torch_utils import freeze_layers

        decision = self.ww.action_set.freeze_action.last
        if not decision or not decision.freeze:
            return
        names = [l.name for l in result.layers]
        eligible = [n for n in names[:-1] if n not in self.frozen]
        k = min(len(decision.freeze), len(eligible))
        if not k:
            return
        pick = set(self.rng.choice(eligible, k, replace=False).tolist())
        pick_list = [n for n in names if n in pick]
        freeze_layers(self.ww._module, pick_list, self.ww._trainer.optimizers)
        self.frozen += pick_list
        self.epochs.append(epoch)


class BackwardFlops(pl.Callback):
    """Analytic backward FLOPs of the Linear layers, from ``requires_grad`` at each step."""

    def __init__(self):
        self.actual = 0.0
        self.full = 0.0
        self.batch = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = int(batch[0].shape[0])

    def on_before_backward(self, trainer, pl_module, loss):
        b = self.batch
        earlier_trains = False
        earlier_any = False
        for mod in pl_module.net.modules():
            if isinstance(mod, nn.Embedding):
                earlier_trains = earlier_trains or mod.weight.requires_grad
                earlier_any = True
            if not isinstance(mod, nn.Linear):
                continue
            cost = 2.0 * b * mod.in_features * mod.out_features
            trains = mod.weight.requires_grad
            self.full += cost + (cost if earlier_any else 0.0)
            self.actual += (cost if trains else 0.0) + (cost if earlier_trains else 0.0)
            earlier_trains = earlier_trains or trains
            earlier_any = True

    @property
    def saved(self) -> float:
        return 1.0 - self.actual / self.full if self.full else 0.0


# --------------------------------------------------------------------------- runs
TASKS = {
    # name: (epochs, batch size, base lr)
    "digits-mlp": (20, 64, 0.05),
    "charlm-mlp": (10, 256, 0.05),
}


def accuracy(net: nn.Module, data) -> float:
    net.eval()
    with torch.no_grad():
        x, y = data
        return float((net(x).argmax(1) == y).float().mean())


def run_one(task: str, config: str, seed: int, data: Dict[str, Any], workdir: str) -> Dict[str, Any]:
    epochs, bs, lr = TASKS[task]
    train, test = data["train"], data["test"]
    pl.seed_everything(seed, workers=False, verbose=False)
    net = DigitsMLP() if task == "digits-mlp" else CharMLP(data["vocab"])
    g = torch.Generator().manual_seed(seed)
    # whole batches by index (no per-sample collate): the loader costs next to nothing
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(range(len(train[0])),
                                                                           generator=g), bs, False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), sampler=sampler,
                                         batch_size=None)
    total = epochs * len(loader)
    module = Module(net, lr, total)
    flops = BackwardFlops()
    callbacks: List[Any] = [flops]
    ww = None
    control: Any = None
    if config != "baseline":
        kw: Dict[str, Any] = {
            "balance_lr": dict(balance_lr=True),
            "freeze": dict(freeze="apply"),
            "balance_lr_shuffled": {},
            "freeze_random": dict(freeze="suggest"),
        }[config]
        if config == "balance_lr_shuffled":
            control = ShuffledFactors(seed)
        elif config == "freeze_random":
            control = RandomFreeze(seed)
        ww = WeightWatcherCallback(start_fraction=0.0, every_n_epochs=1, async_analysis=False,
                                   output_dir=os.path.join(workdir, f"{task}-{config}-{seed}"),
                                   trackers=None, log_fn=lambda line: None,
                                   actions=[control] if control is not None else None, **kw)
        if control is not None:
            control.ww = ww
        callbacks.insert(0, ww)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, default_root_dir=workdir, accelerator="cpu",
                         num_sanity_val_steps=0)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(module, loader)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"task": task, "config": config, "seed": seed, "acc": accuracy(net, test),
           "train_acc": accuracy(net, train), "wall_s": wall, "cpu_s": cpu, "steps": trainer.global_step,
           "analysis_s": ww.controller.blocking_seconds if ww else 0.0,
           "bwd_flops_saved": flops.saved}
    if ww is not None and config == "freeze":
        decisions = ww.action_set.freeze_policy.decisions
        out["frozen"] = ww.frozen_layers
        out["freeze_epochs"] = [d["epoch"] for d in decisions if d["freeze"]]
    if config == "freeze_random":
        out["frozen"] = control.frozen
        out["freeze_epochs"] = control.epochs
    if ww is not None and config == "balance_lr":
        out["final_factors"] = {k: round(v, 3) for k, v in ww.lr_factors.items()}
    if ww is not None:
        last = ww.history.rows_at(ww.history.steps[-1]) if ww.history.steps else []
        out["final_alpha"] = {r["name"]: (round(r["alpha"], 3) if r.get("alpha") is not None else None)
                              for r in last}
    return out


def mean_std(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(results: List[Dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    lines = ["# Actions evidence: baseline vs `balance_lr=True` vs `freeze=\"apply\"`", "",
             f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by `{command}` "
             f"(Python {platform.python_version()}, torch {torch.__version__}, "
             f"lightning {pl.__version__}, {torch.get_num_threads()} torch thread(s), "
             f"{os.cpu_count()} CPUs; other jobs may have shared the machine, so wall times are "
             f"indicative).", "",
             "| task | config | test acc (mean ± std) | paired Δ acc vs baseline (mean ± std; "
             "better/worse/tied seeds) | wall s (mean ± std) | CPU s (mean ± std) | analysis s "
             "| backward FLOPs saved (per seed) | layers frozen (epochs of the decisions) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task in args.tasks:
        for config in CONFIGS:
            rs = [r for r in results if r["task"] == task and r["config"] == config]
            if not rs:
                continue
            accs = [r["acc"] for r in rs]
            delta = ""
            by_seed = {r["seed"]: r["acc"] for r in results
                       if r["task"] == task and r["config"] == "baseline"}
            diffs = [r["acc"] - by_seed[r["seed"]] for r in rs if r["seed"] in by_seed]
            if diffs and config != "baseline":
                sd = f" ± {statistics.stdev(diffs):.4f}" if len(diffs) > 1 else ""
                delta = (f"{statistics.mean(diffs):+.4f}{sd}; {sum(d > 0 for d in diffs)}/"
                         f"{sum(d < 0 for d in diffs)}/{sum(d == 0 for d in diffs)}")
            walls = [r["wall_s"] for r in rs]
            wall = (f"{statistics.mean(walls):.1f} ± {statistics.stdev(walls):.1f}"
                    if len(walls) > 1 else f"{walls[0]:.1f}")
            cpus = [r["cpu_s"] for r in rs]
            cpu = (f"{statistics.mean(cpus):.1f} ± {statistics.stdev(cpus):.1f}"
                   if len(cpus) > 1 else f"{cpus[0]:.1f}")
            ana = f"{statistics.mean(r['analysis_s'] for r in rs):.2f}"
            per_seed = ", ".join("%.1f" % (100 * r["bwd_flops_saved"]) for r in rs)
            saved = ("%.1f%% (%s)" % (100 * statistics.mean(r["bwd_flops_saved"] for r in rs),
                                       per_seed) if config.startswith("freeze") else "")
            frozen = ""
            if config.startswith("freeze"):
                frozen = "; ".join(f"s{r['seed']}: {len(r.get('frozen', []))} "
                                   f"({','.join(str(e) for e in r.get('freeze_epochs', [])) or '-'})"
                                   for r in rs)
            lines.append(f"| {task} | {config} | {mean_std(accs)} | {delta} | {wall} | {cpu} | {ana} | "
                         f"{saved} | {frozen} |")
    lines += ["", "Per run:", "", "```"]
    for r in results:
        lines.append(json.dumps(r, sort_keys=True))
    lines += ["```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: robust timings when other jobs share the cores)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "actions_evidence.md"))
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the .md from the .json next to --out, without training")
    args = ap.parse_args()
    if args.report_only:
        with open(os.path.splitext(args.out)[0] + ".json", encoding="utf-8") as fh:
            results = json.load(fh)
        args.tasks = [t for t in TASKS if any(r["task"] == t for r in results)]
        text = report(results, args, "python benchmarks/actions_evidence.py")
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(text.split("\nPer run:")[0])
        return
    torch.set_num_threads(args.threads)
    command = "python benchmarks/actions_evidence.py " + " ".join(sys.argv[1:])
    results: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ww-evidence-") as workdir:
        for task in args.tasks:
            if task == "digits-mlp":
                train, test = digits_data()
                data = {"train": train, "test": test}
            else:
                train, test, vocab = charlm_data()
                data = {"train": train, "test": test, "vocab": vocab}
            print(f"{task}: {len(data['train'][0])} train / {len(data['test'][0])} test samples",
                  flush=True)
            for seed in range(args.seeds):
                for config in args.configs:
                    r = run_one(task, config, seed, data, workdir)
                    results.append(r)
                    print(f"  {config:10s} seed {seed}: acc {r['acc']:.4f} wall {r['wall_s']:.1f}s "
                          f"analysis {r['analysis_s']:.2f}s bwd saved {100 * r['bwd_flops_saved']:.1f}% "
                          f"frozen {r.get('frozen', '')} factors {r.get('final_factors', '')}",
                          flush=True)
    text = report(results, args, command.strip())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=1)
    print(text.split("\nPer run:")[0])


if __name__ == "__main__":
    main()
