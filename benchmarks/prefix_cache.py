"""Per-step time of a MiniLM-L6 fine-tune with a frozen prefix, with and without the prefix cache.

For each frozen depth ``k`` (the embeddings and the first ``k`` of the 6 blocks frozen, as
``Freeze(order="prefix")`` leaves them), two copies of the ``minilm-topics`` model of
``benchmarks/freeze_tasks.py`` train on the same batches: one recomputes the frozen prefix (what
freezing alone does), one replays it with :class:`ww_callbacks.prefix_cache.PrefixCache`. The
cached copy first passes once over the examples (stored) and once more for the check batch;
then the two copies take their steps in turns (the order alternating each round), and the median
step times (forward, backward, AdamW step) are compared. Every measured cached step is a replay.

Usage::

    python benchmarks/prefix_cache.py [--depths 2 3 4] [--rounds 8] [--batch-size 32] [--examples 96]

Writes ``benchmarks/results/prefix_cache.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from freeze_tasks import minilm_topics  # noqa: E402

from ww_callbacks.prefix_cache import PrefixCache  # noqa: E402


def _rows(task: Any, n: int) -> List[Tuple[torch.Tensor, int]]:
    """``n`` training examples as (unpadded token ids, label)."""
    out: List[Tuple[torch.Tensor, int]] = []
    for enc, y in task.batches(0, 0):
        for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], y.tolist()):
            out.append((ids[mask.bool()], label))
            if len(out) == n:
                return out
    return out


def _epoch(rows: List[Tuple[torch.Tensor, int]], batch_size: int,
           seed: int) -> List[Tuple[Dict[str, Any], Any]]:
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = []
    for j in range(0, len(order), batch_size):
        part = [rows[i] for i in order[j:j + batch_size]]
        width = max(len(ids) for ids, _ in part)
        ids = torch.zeros(len(part), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (seq, _) in enumerate(part):
            ids[r, :len(seq)], mask[r, :len(seq)] = seq, 1
        batches.append(({"input_ids": ids, "attention_mask": mask}, torch.tensor([y for _, y in part])))
    return batches


def _model(task: Any, depth: int) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = task.build(0).train()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    for block in model.bert.encoder.layer[:depth]:
        for p in block.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def _step(model: torch.nn.Module, opt: Any, batch: Any, cache: Any = None) -> float:
    enc, y = batch
    t0 = time.perf_counter()
    if cache is not None:
        cache.begin_batch(enc)
    loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
    if cache is not None:
        cache.end_batch()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def run(depths: List[int], rounds: int, batch_size: int, examples: int) -> Dict[str, Any]:
    task = minilm_topics(batch_size=batch_size, max_length=32)
    rows = _rows(task, examples)
    results = []
    for depth in depths:
        cached, opt_c = _model(task, depth)
        plain, opt_p = _model(task, depth)
        cache = PrefixCache(cached)
        for epoch in (0, 1):   # store every example, then the check batch (and a few replays)
            for batch in _epoch(rows, batch_size, epoch):
                _step(cached, opt_c, batch, cache)
                _step(plain, opt_p, batch)
        hits_before = cache.stats.hits
        t_cached: List[float] = []
        t_plain: List[float] = []
        measured = 0
        epoch, batches = 2, _epoch(rows, batch_size, 2)
        for r in range(rounds):
            if not batches:
                epoch += 1
                batches = _epoch(rows, batch_size, epoch)
            batch = batches.pop(0)
            measured += len(batch[1])
            pair = [(cached, opt_c, cache, t_cached), (plain, opt_p, None, t_plain)]
            for model, opt, c, times in (pair if r % 2 == 0 else pair[::-1]):
                times.append(_step(model, opt, batch, c))
        replayed = cache.stats.hits - hits_before
        med_c, med_p = statistics.median(t_cached), statistics.median(t_plain)
        results.append({"depth": depth, "rounds": rounds, "median_s_cached": med_c, "median_s_plain": med_p,
                        "ratio": med_c / med_p, "saving": 1.0 - med_c / med_p,
                        "replayed_examples": replayed, "measured_examples": measured,
                        "cache": cache.stats.to_dict()})
        cache.close()
        print(f"depth {depth}: cached {med_c * 1e3:.0f} ms, plain {med_p * 1e3:.0f} ms, "
              f"saving {100 * (1 - med_c / med_p):.1f}%", flush=True)
    return {"task": task.checkpoint, "batch_size": batch_size, "examples": len(rows),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
                       f"torch {torch.__version__}, {torch.get_num_threads()} threads",
            "note": "CPU shared with other jobs while measured: medians of interleaved steps",
            "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "prefix_cache.json"))
    args = ap.parse_args()
    report = run(args.depths, args.rounds, args.batch_size, args.examples)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    print(f"\n{report['task']}, batch {report['batch_size']}; {report['machine']}; {report['note']}\n")
    print("| frozen blocks (of 6) | median step, cached | median step, recomputed | saving per step |")
    print("|---|---|---|---|")
    for r in report["results"]:
        print(f"| {r['depth']} | {r['median_s_cached'] * 1e3:.0f} ms | {r['median_s_plain'] * 1e3:.0f} ms "
              f"| {100 * r['saving']:.1f}% |")


if __name__ == "__main__":
    main()
