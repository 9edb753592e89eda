"""Lightning example: an MLP on scikit-learn's handwritten digits, watched by WeightWatcher.

    python examples/lightning_example.py [--epochs 20] [--out ww-output/lightning] [--no-wandb]

Runs on a CPU in well under a minute. The data ships inside scikit-learn (``load_digits``: 1,797
8x8 images, nothing downloaded); without scikit-learn a generated teacher-student task is used.
The callback analyses the layer spectra at the end of every epoch once half the training is done,
plus a final analysis, and writes into ``--out``:

* ``ww/report.html``: self-contained report (alpha over time, latest per-layer table, flags);
* ``ww/alpha_over_time.png``, ``ww/history.jsonl``, ``ww/history.csv``;
* ``wandb/offline-run-*``: an offline W&B run (the trainer's metrics and the ``ww/*`` curves),
  uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    import pytorch_lightning as pl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from ww_callbacks.lightning import WeightWatcherCallback  # noqa: E402


def load_data(seed: int = 0):
    """(x_train, y_train, x_val, y_val, source description)."""
    g = torch.Generator().manual_seed(seed)
    try:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        source = "scikit-learn load_digits (1,797 8x8 images, 10 classes)"
    except ImportError:
        x = torch.randn(2000, 64, generator=g)
        teacher = torch.randn(64, 10, generator=g)
        y = (torch.tanh(x @ teacher) + 0.3 * torch.randn(2000, 10, generator=g)).argmax(1)
        source = "generated teacher-student data (scikit-learn not installed)"
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n_val = len(x) // 5
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val], source


class DigitsMLP(pl.LightningModule):
    def __init__(self, hidden=(256, 128), lr=2e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]),
                                 nn.ReLU(), nn.Linear(hidden[1], 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--start-fraction", type=float, default=0.5,
                        help="share of training before the first analysis (0: every epoch)")
    parser.add_argument("--out", default="ww-output/lightning", help="output folder")
    parser.add_argument("--no-wandb", action="store_true", help="skip the offline W&B run")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they save
    x, y, xv, yv, source = load_data()
    train = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=256)

    os.makedirs(args.out, exist_ok=True)
    loggers = []
    if not args.no_wandb:
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            from pytorch_lightning.loggers import WandbLogger
        try:
            loggers.append(WandbLogger(project="ww-callbacks-examples", name="lightning-digits",
                                       save_dir=args.out, offline=True))
        except ModuleNotFoundError:
            print("wandb is not installed: no W&B run (pip install wandb)")
    out_dir = os.path.join(args.out, "ww")
    watcher = WeightWatcherCallback(start_fraction=args.start_fraction, every_n_epochs=1,
                                    output_dir=out_dir)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=loggers or False,
                         callbacks=[watcher], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=10,
                         default_root_dir=args.out)
    print(f"data: {source}; training {args.epochs} epochs on CPU")
    t0 = time.time()
    trainer.fit(DigitsMLP(), train, val)
    if loggers:
        loggers[0].experiment.finish()

    wall = time.time() - t0
    val_acc = trainer.callback_metrics.get("val/acc")
    print(f"\ndone in {wall:.1f} s; val accuracy {float(val_acc):.3f}" if val_acc is not None else "")
    ctl = watcher.controller
    print(f"training waited {ctl.blocking_seconds:.3f} s for {ctl.num_analyses} analyses "
          f"({100 * ctl.blocking_seconds / wall:.2f}% of the run; {ctl.skipped_analyses} skipped)")
    print(f"analyses at steps {watcher.history.steps}")
    print(f"report:  {os.path.abspath(os.path.join(out_dir, 'report.html'))}")
    print(f"history: {os.path.abspath(os.path.join(out_dir, 'history.csv'))}")
    runs = sorted(glob.glob(os.path.join(args.out, "wandb", "offline-run-*")), key=os.path.getmtime)
    if runs:
        print(f"W&B offline run: {os.path.abspath(runs[-1])}")
        print(f"upload it with:  wandb sync {os.path.abspath(runs[-1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
