"""2-process HF Trainer run under ``torchrun --standalone --nproc-per-node 2`` (CPU, gloo) with the
WeightWatcherCallback; see tests/test_ddp.py.

Usage: torchrun --standalone --nproc-per-node 2 hf_torchrun.py OUT_DIR
"""

import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from transformers import Trainer, TrainingArguments  # noqa: E402

from common import dump, leave, make_body, make_data, record_shares  # noqa: E402
from ww_callbacks.huggingface import WeightWatcherCallback  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make_body()

    def forward(self, x, labels=None):
        out = self.body(x)
        loss = torch.nn.functional.mse_loss(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = make_data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def main(out_dir):
    rank = int(os.environ["RANK"])
    shares = record_shares()
    lines = []
    ww = WeightWatcherCallback(start_fraction=0.0, every_n_epochs=1,
                               output_dir=os.path.join(out_dir, f"ww-rank{rank}"),
                               log_fn=lines.append)
    args = TrainingArguments(os.path.join(out_dir, "hf"), use_cpu=True, ddp_backend="gloo",
                             report_to=[], per_device_train_batch_size=8, num_train_epochs=3,
                             learning_rate=0.05, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False,
                             dataloader_num_workers=0)
    trainer = Trainer(model=Tiny(), args=args, train_dataset=Rows(), callbacks=[ww])
    trainer.train()
    assert trainer.args.world_size == 2 and trainer.args.process_index == rank
    dump(out_dir, rank, ww.controller, shares, lines, trainer.args.world_size)
    leave()


if __name__ == "__main__":
    main(sys.argv[1])
