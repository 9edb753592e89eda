"""2-process HF Trainer run with DeepSpeed ZeRO-3 (``TrainingArguments(deepspeed=...)``, DeepSpeed's
CPU accelerator, gloo) and the WeightWatcherCallback; see tests/test_fsdp2.py.

On CPU the Trainer needs ``use_cpu=True``: without it accelerate's ``PartialState`` finds no
backend (no GPU), counts one process, and DeepSpeed's batch check fails (``train_batch_size`` from
``"auto"`` is ``8 * 1 * 1`` for a world of 2). With it, the state is ``MULTI_CPU`` (gloo, world of
2) and the Trainer's ``Accelerator`` (not told ``cpu``) turns it into ``DEEPSPEED``.

The callback analyses in float64 so that its results can be compared to the float64 reference
(:class:`zero3_probe.Zero3Probe`) to rounding.

Usage: DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 zero3_hf_trainer.py OUT_DIR
"""

import math
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from common import dump, leave, record_shares  # noqa: E402
from hf_torchrun import Rows, Tiny  # noqa: E402
from ww_callbacks.huggingface import WeightWatcherCallback  # noqa: E402
from zero3_probe import ds_config, watched  # noqa: E402


class Reference(TrainerCallback):
    """After ours (callbacks run in list order): the float64 reference at each analysed step."""

    def __init__(self, probe):
        self.probe = probe

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % 2 == 0:
            self.probe.reference(model, state.global_step)


def main(out_dir):
    rank = int(os.environ["RANK"])
    shares = record_shares()
    ww, probe, lines = watched(WeightWatcherCallback, out_dir, rank)
    config = ds_config(train_micro_batch_size_per_gpu="auto", train_batch_size="auto",
                       gradient_accumulation_steps="auto")
    args = TrainingArguments(os.path.join(out_dir, "hf"), deepspeed=config, use_cpu=True,
                             ddp_backend="gloo", report_to=[], per_device_train_batch_size=8,
                             max_steps=6, learning_rate=0.05, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                             dataloader_num_workers=0)
    trainer = Trainer(model=Tiny(), args=args, train_dataset=Rows(), callbacks=[ww, Reference(probe)])
    out = trainer.train()
    engine = trainer.model_wrapped
    assert trainer.args.world_size == 2 and trainer.args.process_index == rank
    dump(out_dir, rank, ww.controller, shares, lines, trainer.args.world_size)
    probe.dump(out_dir, rank, trainer.model, engine=type(engine).__name__,
               stage=engine.zero_optimization_stage(),
               distributed_type=str(trainer.accelerator.distributed_type).split(".")[-1],
               deepspeed_enabled=trainer.is_deepspeed_enabled, global_step=trainer.state.global_step,
               loss_finite=math.isfinite(out.training_loss))
    leave()


if __name__ == "__main__":
    main(sys.argv[1])
