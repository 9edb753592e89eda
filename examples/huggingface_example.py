"""Hugging Face Trainer example: a tiny character-level GPT-2, built from scratch, watched by WeightWatcher.

    python examples/huggingface_example.py [--steps 200] [--out ww-output/huggingface] [--no-wandb]

Nothing is downloaded (``HF_HUB_OFFLINE=1``): the model is built from a ``GPT2Config`` and the
training text is the documentation that ships with Python itself (the docstrings of a few
standard-library modules, a few hundred KB), tokenised per character. About a minute on a CPU.

The callback analyses the layer spectra every 20 optimizer steps once half the training is done,
plus a final analysis, and writes into ``--out``:

* ``ww/report.html``: self-contained report (alpha over time, latest per-layer table, flags);
* ``ww/alpha_over_time.png``, ``ww/history.jsonl``, ``ww/history.csv``;
* ``wandb/offline-run-*``: an offline W&B run opened by the Trainer's own ``report_to="wandb"``
  integration, holding the Trainer's metrics and the ``ww/*`` curves (plotted against
  ``train/global_step``), the ``ww/layers`` table and ESD images of flagged layers. Upload later
  with ``wandb sync``.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_PROJECT", "ww-callbacks-examples")

import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from ww_callbacks.huggingface import WeightWatcherCallback  # noqa: E402

MODULES = ("argparse", "collections", "json", "logging", "pathlib", "subprocess", "typing",
           "unittest", "urllib.request", "email", "asyncio", "inspect", "threading", "re")


def load_text() -> str:
    """Docstrings of standard-library modules and their public members (always installed)."""
    parts = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # pragma: no cover
            continue
        parts.append(mod.__doc__ or "")
        for attr in dir(mod):
            doc = getattr(getattr(mod, attr, None), "__doc__", None)
            if not attr.startswith("_") and isinstance(doc, str):
                parts.append(doc)
    return "\n\n".join(p for p in parts if p)


class CharBlocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor, block: int):
        self.ids, self.block = ids, block

    def __len__(self):
        return (len(self.ids) - 1) // self.block

    def __getitem__(self, i):
        x = self.ids[i * self.block:(i + 1) * self.block]
        return {"input_ids": x, "labels": x}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="ww-output/huggingface", help="output folder")
    parser.add_argument("--no-wandb", action="store_true", help="skip the offline W&B run")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    text = load_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    block = 64
    data = CharBlocks(ids, block)
    config = transformers.GPT2Config(vocab_size=len(chars), n_positions=block, n_embd=64,
                                     n_layer=2, n_head=4, n_inner=256, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    print(f"text: {len(text):,} characters of standard-library docstrings, {len(chars)} symbols; "
          f"model: {sum(p.numel() for p in model.parameters()):,} parameters")

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
    watcher = WeightWatcherCallback(start_fraction=0.5, every_n_steps=20, output_dir=out_dir,
                                    log_fn=print)
    targs = transformers.TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"), max_steps=args.steps,
        per_device_train_batch_size=16, learning_rate=2e-3, warmup_steps=20, weight_decay=0.01,
        logging_steps=20, save_strategy="no", report_to=report_to, run_name="hf-char-gpt2",
        use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=data, callbacks=[watcher])
    t0 = time.time()
    out = trainer.train()
    if report_to == "wandb":
        import wandb

        wandb.finish()
    print(f"\ndone in {time.time() - t0:.1f} s; final training loss {out.training_loss:.3f}")
    print(f"analyses at steps {watcher.history.steps}")
    print(f"report:  {os.path.abspath(os.path.join(out_dir, 'report.html'))}")
    print(f"history: {os.path.abspath(os.path.join(out_dir, 'history.csv'))}")
    runs = sorted(glob.glob(os.path.join(os.environ["WANDB_DIR"], "wandb", "offline-run-*")),
                  key=os.path.getmtime)
    if runs:
        print(f"W&B offline run: {os.path.abspath(runs[-1])}")
        print(f"upload it with:  wandb sync {os.path.abspath(runs[-1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
