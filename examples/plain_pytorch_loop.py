"""The controller without any trainer: a plain PyTorch training loop, with auto-freeze.

    python examples/plain_pytorch_loop.py [--epochs 12] [--out ww-output/plain] [--freeze apply]

Trains an MLP on scikit-learn's handwritten digits (``load_digits``, shipped inside the package:
nothing is downloaded) for a few seconds on a CPU. ``WeightWatcherController`` is used as a
context manager: ``maybe_run`` after each optimizer step and at each epoch end, a final analysis
when the ``with`` block ends. With ``--freeze apply`` the layers whose alpha has settled in the
band (never the output head) are frozen mid-training through :mod:`ww_callbacks.torch_utils`,
the functions the Lightning and Hugging Face callbacks use too.

What to look at: the per-analysis line (mean alpha, flagged layers), the ``freeze`` events, and
``<out>/report.html`` (alpha per layer over the steps).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from ww_callbacks import Freeze, WeightWatcherController  # noqa: E402
from ww_callbacks.torch_utils import freeze_layers, unfreeze_layers  # noqa: E402


def digits(seed: int = 0):
    """(x_train, y_train, x_val, y_val) from scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_val = len(x) // 5
    return x[n_val:], y[n_val:], x[:n_val], y[:n_val]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", default=os.path.join("ww-output", "plain"))
    parser.add_argument("--freeze", choices=["off", "suggest", "apply"], default="apply")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y, xv, yv = digits()
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch, steps_per_epoch = 64, -(-len(x) // 64)

    ww = WeightWatcherController(start_fraction=0.3, every_n_epochs=1, output_dir=args.out,
                                 trackers=["local"], log_fn=print,
                                 freeze=Freeze(mode=args.freeze, band="weightwatcher", window=2, tol=0.1))
    # the framework side of freeze="apply": plain torch functions over this model and optimizer
    ww.bind_actions(freeze_fn=lambda f, u: (freeze_layers(model, f, [opt]), unfreeze_layers(model, u)))
    with ww:
        ww.configure(total_steps=args.epochs * steps_per_epoch, total_epochs=args.epochs)
        ww.start_actions()        # (after a resume it re-freezes what the restored state froze)
        step = 0
        for epoch in range(args.epochs):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), batch):
                idx = perm[i:i + batch]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                ww.maybe_run(model, step=step, epoch=epoch)
            ww.maybe_run(model, step=step, epoch=epoch, epoch_end=True)
    with torch.no_grad():
        acc = (model(xv).argmax(1) == yv).float().mean().item()
    print(f"val accuracy {acc:.3f}; analyses {ww.num_analyses} at steps {ww.history.steps}; "
          f"frozen {ww.frozen_layers}; training waited {ww.blocking_seconds:.2f} s for them")
    print(f"report: {os.path.join(args.out, 'report.html')}")
    return {"accuracy": acc, "frozen": ww.frozen_layers, "steps": ww.history.steps}


if __name__ == "__main__":
    main()
