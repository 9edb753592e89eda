"""2-process Lightning DDP (CPU, gloo) fit with the WeightWatcherCallback; see tests/test_ddp.py.

Usage: python lightning_ddp.py OUT_DIR   (Lightning's "ddp" launcher re-runs it for rank 1)
"""

import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402

from common import dump, make_body, make_data, record_shares  # noqa: E402
from ww_callbacks.lightning import WeightWatcherCallback  # noqa: E402


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = make_body()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main(out_dir):
    rank = int(os.environ.get("LOCAL_RANK", "0"))     # unset in the launching process (rank 0)
    shares = record_shares()
    lines = []
    ww = WeightWatcherCallback(start_fraction=0.0, every_n_epochs=1, trackers="auto",
                               output_dir=os.path.join(out_dir, f"ww-rank{rank}"),
                               log_fn=lines.append)
    x, y = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out_dir, callbacks=[ww])
    trainer.fit(Tiny(), loader)
    assert trainer.global_rank == rank, (trainer.global_rank, rank)
    dump(out_dir, trainer.global_rank, ww.controller, shares, lines, trainer.world_size)


if __name__ == "__main__":
    from common import leave

    main(sys.argv[1])
    leave()
