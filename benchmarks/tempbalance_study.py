#!/usr/bin/env python
"""TempBalance on a small ResNet: ``balance_lr=True`` vs a shuffled-factor control vs baseline.

A small-scale, CPU-only reproduction of TempBalance (Zhou et al., NeurIPS 2023): per-layer LR
factors from each layer's Hill alpha (``tb_linear_map``, s1 0.5 / s2 1.5), re-balanced every
epoch, SGD + cosine schedule, ResNet with BatchNorm. It uses our real Lightning callback,
``WeightWatcherCallback(balance_lr=True, start_fraction=0.0, every_n_epochs=1,
async_analysis=False)``, and the optimizer, control and helpers of ``actions_evidence.py``.

* Data: scikit-learn's ``load_digits`` (real 8x8 grey images shipped in the package; nothing is
  downloaded), upsampled bilinearly to 16x16 and normalised with the training mean/std. A fixed
  stratified subset of ``--per-class`` (15) images per class trains (150); ALL remaining images
  (1647) test. The split does not depend on the seed. Training augmentation: random shifts of up to
  2 px (background padding), drawn from a per-seed generator, identical in every config.
* Model: ResNet-14 style: 3x3 conv stem (16), three stages of two BasicBlocks (16/32/64, 1x1
  strided shortcut where the shape changes), global average pool, linear head. 16 analysed
  layers (15 Conv2d + head); TB tunes all but the first, the last and those with fewer than 50
  eigenvalues (the two 1x1 shortcuts: 16 and 32), i.e. 12 conv layers.
* Training: SGD lr 0.05, momentum 0.9, wd 5e-4, per-step cosine to 0, batch 32, 60 epochs
  (5 steps per epoch, 300 steps; 60 analyses and re-balances). Baseline: train acc 1.0, test ~0.96.
* Configs (seed = init, batch order and augmentation, so runs are paired by seed):
  ``baseline`` (no callback), ``balance_lr`` (TempBalance defaults of ``LRBalancePolicy``) and
  ``balance_lr_shuffled`` (same factors, permuted among the tuned layers at every analysis).

Run (about 4.5 minutes: 257 s of training for 30 runs, one torch thread of a 2-core AMD EPYC
shared with another job)::

    KERAS_BACKEND=torch python benchmarks/tempbalance_study.py            # 10 seeds, writes results
    python benchmarks/tempbalance_study.py --seeds 1 --epochs 5           # quick look
    python benchmarks/tempbalance_study.py --report-only                  # .md from the .json

Output: ``benchmarks/results/tempbalance_study.json`` (setting, machine, all runs) and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from actions_evidence import Module, ShuffledFactors, accuracy, mean_std, pl  # noqa: E402

from ww_callbacks.lightning import WeightWatcherCallback  # noqa: E402

CONFIGS = ("baseline", "balance_lr", "balance_lr_shuffled")
SETTING = dict(per_class=15, size=16, shift=2, widths=(16, 32, 64), epochs=60, lr=0.05, batch=32)


# --------------------------------------------------------------------------- data
def digits_images(per_class: int = 15, size: int = 16) -> Dict[str, Any]:
    """Fixed stratified split: ``per_class`` training images per class, the rest for testing."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    train = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False)
                                    for c in range(10)]))
    test = np.setdiff1d(np.arange(len(y)), train)
    imgs = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = float(imgs[train].mean()), float(imgs[train].std())
    imgs = (imgs - mean) / std
    labels = torch.tensor(y, dtype=torch.long)
    return {"train": (imgs[train], labels[train]), "test": (imgs[test], labels[test]),
            "background": -mean / std}


class ShiftedBatches(torch.utils.data.Dataset):
    """Whole batches by index list, each image shifted by up to ``shift`` px (own generator)."""

    def __init__(self, x, y, shift: int, background: float, seed: int):
        self.x = F.pad(x, (shift,) * 4, value=background)
        self.y, self.shift, self.size = y, shift, x.shape[-1]
        self.g = torch.Generator().manual_seed(10_000 + seed)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, idx):
        idx = list(idx)
        off = torch.randint(0, 2 * self.shift + 1, (len(idx), 2), generator=self.g).tolist()
        s = self.size
        xb = torch.stack([self.x[i, :, a:a + s, b:b + s] for i, (a, b) in zip(idx, off)])
        return xb, self.y[idx]


# --------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                blocks.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


# --------------------------------------------------------------------------- runs
def applied_factors(trainer) -> Dict[str, float]:
    """``{layer: factor}`` as it stands in the optimizer: scheduler base LR / original LR."""
    out: Dict[str, float] = {}
    for opt in trainer.optimizers:
        sched = next(c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is opt)
        for i, g in enumerate(opt.param_groups):
            for name in g.get("ww_layers", []):
                out[name] = sched.base_lrs[i] / g.get("ww_base_lr", sched.base_lrs[i])
    return out


def run_one(config: str, seed: int, data: Dict[str, Any], workdir: str, epochs: int,
            lr: float = SETTING["lr"], batch: int = SETTING["batch"], shift: int = SETTING["shift"],
            widths=SETTING["widths"]) -> Dict[str, Any]:
    train, test = data["train"], data["test"]
    pl.seed_everything(seed, workers=False, verbose=False)
    net = ResNet(widths)
    g = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(range(len(train[0])),
                                                                           generator=g), batch, False)
    loader = torch.utils.data.DataLoader(ShiftedBatches(*train, shift, data["background"], seed),
                                         sampler=sampler, batch_size=None)
    module = Module(net, lr, epochs * len(loader))
    ww = control = None
    callbacks: List[Any] = []
    if config != "baseline":
        control = ShuffledFactors(seed) if config == "balance_lr_shuffled" else None
        ww = WeightWatcherCallback(start_fraction=0.0, every_n_epochs=1, async_analysis=False,
                                   balance_lr=config == "balance_lr",
                                   output_dir=os.path.join(workdir, f"{config}-{seed}"),
                                   trackers=None, log_fn=lambda line: None,
                                   actions=[control] if control is not None else None)
        if control is not None:
            control.ww = ww
        callbacks.append(ww)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=workdir, accelerator="cpu", num_sanity_val_steps=0)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(module, loader)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out: Dict[str, Any] = {"config": config, "seed": seed, "acc": accuracy(net, test),
                           "train_acc": accuracy(net, train), "wall_s": wall, "cpu_s": cpu,
                           "steps": trainer.global_step,
                           "analysis_s": ww.controller.blocking_seconds if ww else 0.0}
    if ww is not None:
        policy = control.policy if control is not None else ww.action_set.lr_policy
        last = ww.history.rows_at(ww.history.steps[-1]) if ww.history.steps else []
        out["analysed"] = [r["name"] for r in last]
        out["analyses"] = len(ww.history.steps)
        out["tb_factors"] = {k: round(v, 4) for k, v in policy.factors.items()}   # TB's map
        out["final_factors"] = {k: round(v, 4) for k, v in applied_factors(trainer).items()}
        out["tuned"] = len(policy.factors)
        out["untuned"] = policy.log[-1]["untuned"] if policy.log else {}
        out["final_alpha_hill"] = {r["name"]: (round(r["alpha_hill"], 3)
                                               if r.get("alpha_hill") is not None else None)
                                   for r in last}
    return out


# --------------------------------------------------------------------------- report
def paired(results, a: str, b: str) -> str:
    """``a - b`` by seed: mean ± std; better/worse/tied counts."""
    base = {r["seed"]: r["acc"] for r in results if r["config"] == b}
    d = [r["acc"] - base[r["seed"]] for r in results if r["config"] == a and r["seed"] in base]
    if not d:
        return ""
    sd = f" ± {statistics.stdev(d):.4f}" if len(d) > 1 else ""
    return (f"{statistics.mean(d):+.4f}{sd} ({sum(x > 0 for x in d)}/{sum(x < 0 for x in d)}/"
            f"{sum(x == 0 for x in d)})")


def _ms(values: List[float]) -> str:
    sd = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{sd}"


def machine() -> str:
    cpu = platform.processor() or "?"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
            f"{torch.__version__}, lightning {pl.__version__}, {torch.get_num_threads()} torch "
            f"thread(s)")


def report(study: Dict[str, Any]) -> str:
    results, s = study["runs"], study["setting"]
    n_tr, n_te = study["sizes"]
    lines = ["# TempBalance study: baseline vs `balance_lr=True` vs shuffled factors (ResNet, digits)",
             "", f"Generated {study['date']} by `{study['command']}` in {study['total_wall_s']:.0f} s.",
             f"Machine: {study['machine']} (other jobs may share the cores; times are indicative).",
             "", f"Setting: load_digits {s['size']}x{s['size']}, {n_tr} train ({s['per_class']}/class) "
             f"/ {n_te} test, shifts ±{s['shift']} px; ResNet widths {tuple(s['widths'])}, 2 blocks "
             f"per stage; SGD lr {s['lr']} momentum 0.9 wd 5e-4, cosine per step, batch {s['batch']}, "
             f"{s['epochs']} epochs; seeds {sorted({r['seed'] for r in results})}.", "",
             "| config | test acc | train acc | paired Δ test acc vs baseline (better/worse/tied) "
             "| tuned layers / analysed | mean final TB factor (tuned) | wall s | CPU s | analysis s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for config in CONFIGS:
        rs = [r for r in results if r["config"] == config]
        if not rs:
            continue
        tuned = ", ".join(sorted({f"{r['tuned']}/{len(r['analysed'])}" for r in rs if "tuned" in r}))
        delta = paired(results, config, "baseline") if config != "baseline" else ""
        mf = [statistics.mean(r["tb_factors"].values()) for r in rs if r.get("tb_factors")]
        lines.append(f"| {config} | {mean_std([r['acc'] for r in rs])} | "
                     f"{mean_std([r['train_acc'] for r in rs])} | {delta} | {tuned} | "
                     f"{mean_std(mf) if mf else ''} | "
                     f"{_ms([r['wall_s'] for r in rs])} | {_ms([r['cpu_s'] for r in rs])} | "
                     f"{statistics.mean(r['analysis_s'] for r in rs):.2f} |")
    tb_sh = paired(results, "balance_lr", "balance_lr_shuffled")
    if tb_sh:
        lines += ["", f"Paired `balance_lr` − `balance_lr_shuffled` test acc: {tb_sh}."]
    untuned = next((r["untuned"] for r in results if r.get("untuned")), None)
    if untuned:
        lines += ["", "Untuned analysed layers (factor 1): "
                  + "; ".join(f"`{k}` ({v})" for k, v in untuned.items()) + "."]
    lines += ["", "Per run:", "", "```"] + [json.dumps(r, sort_keys=True) for r in results] + ["```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=SETTING["epochs"])
    ap.add_argument("--per-class", type=int, default=SETTING["per_class"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "tempbalance_study.md"))
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the .md from the .json next to --out, without training")
    args = ap.parse_args()
    json_path = os.path.splitext(args.out)[0] + ".json"
    if args.report_only:
        with open(json_path, encoding="utf-8") as fh:
            study = json.load(fh)
    else:
        torch.set_num_threads(args.threads)
        setting = dict(SETTING, epochs=args.epochs, per_class=args.per_class)
        data = digits_images(setting["per_class"], setting["size"])
        sizes = (len(data["train"][1]), len(data["test"][1]))
        print(f"{sizes[0]} train / {sizes[1]} test images", flush=True)
        results: List[Dict[str, Any]] = []
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ww-tempbalance-") as workdir:
            for seed in range(args.seeds):
                for config in args.configs:
                    r = run_one(config, seed, data, workdir, args.epochs)
                    results.append(r)
                    print(f"  {config:20s} seed {seed}: acc {r['acc']:.4f} train {r['train_acc']:.4f} "
                          f"wall {r['wall_s']:.1f}s analysis {r['analysis_s']:.2f}s "
                          f"tuned {r.get('tuned', '-')}", flush=True)
        study = {"command": ("python benchmarks/tempbalance_study.py " + " ".join(sys.argv[1:])).strip(),
                 "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                 "setting": setting, "sizes": sizes, "total_wall_s": time.perf_counter() - t0,
                 "runs": results}
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(study, fh, indent=1)
    text = report(study)
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text.split("\nPer run:")[0])


if __name__ == "__main__":
    main()
