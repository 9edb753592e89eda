"""2-process Lightning DDP (CPU, gloo) fits with ``freeze="apply"``; see tests/test_ddp_freeze.py.

Two fits, one after the other in the same two processes (the second Trainer reuses the processes
and the process group of the first: one launch instead of two):

MODE ``plain``: ``DDPStrategy()`` (find_unused_parameters off): the callback must raise
``ValueError`` at fit start on every rank, before any optimizer step. Each rank records the error.

MODE ``unused``: ``DDPStrategy(find_unused_parameters=True)``: the fit runs; the 2nd analysis
freezes body.0 and body.2 (scripted alphas, loose options) on both ranks. Each rank records its
frozen set, requires_grad, the frozen weights at the freeze and at the end, and a checksum of all
weights at the end.

Each rank writes ``<mode>-rank<r>.json``.

Usage: python lightning_ddp_freeze.py OUT_DIR   (Lightning's launcher re-runs it for rank 1)
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402

import ww_core  # noqa: E402
from common import make_body, make_data  # noqa: E402
from ww_callbacks import MEMORY_ONLY, Freeze  # noqa: E402
from ww_callbacks.lightning import WeightWatcherCallback  # noqa: E402
from ww_core.result import AnalysisResult, replace  # noqa: E402

LOOSE = {"band": (0.0, 100.0), "tol": 10.0, "window": 2, "max_share": 0.5}


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = make_body()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def constant_alphas(source, **options):
    """The real analysis with every alpha set to 3.0: the same decisions on every rank."""
    res = ww_core.analyze(source, **options)
    layers = [replace(l, alpha=3.0, alpha_hill=3.0, status="success", flags=(), warning="")
              for l in res.layers]
    return AnalysisResult(layers=layers, skipped=list(res.skipped), options=dict(res.options))


class AtFreeze:
    """An action after the callback's own: copies each parameter when it is first seen frozen."""

    def __init__(self):
        self.module, self.at = None, {}

    def on_analysis(self, controller, result, step, epoch):
        for name, p in self.module.named_parameters():
            if not p.requires_grad and name not in self.at:
                self.at[name] = (step, p.detach().clone())


def fit(out_dir, mode):
    lines = []
    at_freeze = AtFreeze()
    ww = WeightWatcherCallback(start_fraction=0.0, every_n_epochs=1, trackers=None, output_dir=MEMORY_ONLY,
                               log_fn=lines.append, freeze=Freeze.apply(**LOOSE),
                               analyze_fn=constant_alphas, actions=[at_freeze])
    strategy = DDPStrategy(find_unused_parameters=True) if mode == "unused" else DDPStrategy()
    x, y = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=3,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out_dir, callbacks=[ww])
    model = Tiny()
    at_freeze.module = model
    record = {"mode": mode, "error": None, "error_type": None}
    try:
        trainer.fit(model, loader)
    except Exception as exc:       # the test checks which one
        record.update(error=str(exc), error_type=type(exc).__name__)
    rank = trainer.global_rank
    params = dict(model.named_parameters())
    record.update(
        rank=rank, world_size=trainer.world_size, global_step=trainer.global_step,
        frozen_layers=ww.frozen_layers, history_steps=ww.history.steps,
        requires_grad={n: p.requires_grad for n, p in params.items()},
        frozen_at={n: s for n, (s, _) in at_freeze.at.items()},
        frozen_unchanged={n: bool(torch.equal(w, params[n].detach()))
                          for n, (_, w) in at_freeze.at.items()},
        checksum={n: float(p.detach().double().sum()) for n, p in params.items()},
    )
    with open(os.path.join(out_dir, f"{mode}-rank{rank}.json"), "w") as fh:
        json.dump(record, fh)


if __name__ == "__main__":
    from common import leave

    for mode in ("plain", "unused"):
        fit(sys.argv[1], mode)
    leave()
