"""2-process Lightning fit on CPU (gloo) with a sharding strategy and the WeightWatcherCallback.

``fsdp2``: ``ModelParallelStrategy`` (FSDP2; ``configure_model`` shards ``body.0``, ``body.2`` and
the root with ``fully_shard``). ``fsdp1``: ``FSDPStrategy`` (FSDP1 wrapping the LightningModule
from outside, ``use_orig_params=True``): Lightning refuses it on CPU (its accelerator check, and
``device_id=None`` for FSDP1), so :class:`CPUFSDPStrategy` changes only that: the wrapping, hence
what the callback receives, is Lightning's own. Each rank dumps what its controller holds and a
float64 reference of the full weights (gathered at once) at the end; see tests/test_fsdp2.py.

Usage: python lightning_sharded.py fsdp1|fsdp2 OUT_DIR   (Lightning's launcher re-runs it)
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy  # noqa: E402

import ww_core  # noqa: E402
from common import dump, make_body, make_data, record_shares  # noqa: E402
from ww_callbacks.lightning import WeightWatcherCallback  # noqa: E402


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` on CPU: FSDP1 built with ``device_id=cpu`` (Lightning passes ``None``)."""

    def _setup_model(self, model):
        import torch.distributed.fsdp as fsdp

        real = fsdp.FullyShardedDataParallel

        class OnCPU(real):
            def __init__(self, *args, device_id=None, **kwargs):
                super().__init__(*args, device_id=torch.device("cpu"), **kwargs)

        fsdp.FullyShardedDataParallel = OnCPU
        try:
            return super()._setup_model(model)
        finally:
            fsdp.FullyShardedDataParallel = real


class Tiny(pl.LightningModule):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.body = make_body()

    def forward(self, x):
        return self.body(x)

    def configure_model(self):
        if self.kind == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for i in (0, 2):
                fully_shard(self.body[i], mesh=mesh)
            fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)    # through forward: FSDP's hooks

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def full_weights(trainer, kind):
    if kind == "fsdp2":
        with torch.no_grad():
            return {n: p.full_tensor().clone() for n, p in trainer.lightning_module.named_parameters()}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = trainer.strategy.model
    with FSDP.summon_full_params(root, writeback=False, rank0_only=False):
        return {ww_core.wrappers.clean_name(n): p.detach().clone() for n, p in root.named_parameters()}


def main(kind, out_dir):
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    shares = record_shares()
    lines = []
    ww = WeightWatcherCallback(start_fraction=0.0, every_n_epochs=1, trackers=None,
                               output_dir=os.path.join(out_dir, f"ww-rank{rank}"),
                               log_fn=lines.append)
    x, y = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    strategy = ModelParallelStrategy() if kind == "fsdp2" else CPUFSDPStrategy()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=3,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out_dir, callbacks=[ww])
    trainer.fit(Tiny(kind), loader)
    ref = ww_core.analyze(full_weights(trainer, kind), precision="float64")
    dump(out_dir, trainer.global_rank, ww.controller, shares, lines, trainer.world_size)
    with open(os.path.join(out_dir, f"ref{trainer.global_rank}.json"), "w") as fh:
        json.dump({"names": ref.names, "records": ref.to_records()}, fh)


if __name__ == "__main__":
    from common import leave

    main(sys.argv[1], sys.argv[2])
    leave()
