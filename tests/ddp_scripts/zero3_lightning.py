"""2-process Lightning fit with ``DeepSpeedStrategy(stage=3)`` (DeepSpeed's CPU accelerator, gloo)
and the WeightWatcherCallback; see tests/test_fsdp2.py.

Lightning refuses DeepSpeed on CPU twice; :class:`CPUDeepSpeedStrategy` and the strategy's public
``parallel_devices`` argument change only that, the engine (``deepspeed.initialize`` around the
LightningModule) and so what the callback receives are Lightning's own:

* ``DeepSpeedStrategy.setup_environment`` raises ``RuntimeError: The DeepSpeed strategy is only
  supported on CUDA GPUs but `CPUAccelerator` is used.`` (lightning/pytorch/strategies/
  deepspeed.py): the subclass skips that check (DDPStrategy's ``setup_environment``);
* ``_validate_device_index_selection`` (lightning/fabric/strategies/deepspeed.py) wants device
  indices ``[0, 1]``; CPU devices have ``None``: ``parallel_devices=[cpu:0, cpu:1]``.

The callback analyses in float64 so that its results can be compared to the float64 reference
(:class:`zero3_probe.Zero3Probe`) to rounding.

Usage: DS_ACCELERATOR=cpu python zero3_lightning.py OUT_DIR   (Lightning's launcher re-runs it)
"""

import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy  # noqa: E402

from common import dump, leave, make_body, make_data, record_shares  # noqa: E402
from ww_callbacks.lightning import WeightWatcherCallback  # noqa: E402
from zero3_probe import ds_config, watched  # noqa: E402


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` without its CUDA-only check."""

    def setup_environment(self):
        DDPStrategy.setup_environment(self)


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = make_body()

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Reference(pl.Callback):
    """After ours (callbacks run in list order): the float64 reference at each analysed step."""

    def __init__(self, probe):
        self.probe = probe

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % 2 == 0:
            self.probe.reference(pl_module, trainer.global_step)


def main(out_dir):
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    shares = record_shares()
    ww, probe, lines = watched(WeightWatcherCallback, out_dir, rank)
    x, y = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    strategy = CPUDeepSpeedStrategy(stage=3, config=ds_config(train_micro_batch_size_per_gpu=8),
                                    process_group_backend="gloo",
                                    parallel_devices=[torch.device("cpu", i) for i in range(2)])
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=6,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out_dir,
                         callbacks=[ww, Reference(probe)])
    module = Tiny()
    trainer.fit(module, loader)
    engine = trainer.strategy.model
    dump(out_dir, trainer.global_rank, ww.controller, shares, lines, trainer.world_size)
    probe.dump(out_dir, trainer.global_rank, module, engine=type(engine).__name__,
               stage=engine.zero_optimization_stage(), global_step=trainer.global_step,
               status=trainer.state.status.value, rank_env=rank)
    leave()


if __name__ == "__main__":
    main(sys.argv[1])
