"""2-process DeepSpeed ZeRO-3 (CPU accelerator, gloo) loop driving the controller; see
tests/test_fsdp2.py. Every parameter is partitioned (``stage3_param_persistence_threshold=0``):
locally of shape ``(0,)``. ``deepspeed.zero.GatheredParameters`` is probed during each
``controller.run``: how many parameters each gather holds, and whether any other was available
(gathered) at that moment.

Usage: DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 2 zero3_controller.py OUT_DIR
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import deepspeed  # noqa: E402
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402

import ww_core  # noqa: E402
from common import Net, dump, make_data, record_shares  # noqa: E402
from ww_callbacks.controller import WeightWatcherController  # noqa: E402


def main(out_dir):
    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    shares = record_shares()
    lines = []
    model = Net()
    config = {"train_micro_batch_size_per_gpu": 8, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                           optimizer=torch.optim.SGD(model.parameters(), lr=0.05))
    params = list(engine.module.parameters())
    ctl = WeightWatcherController(start_fraction=0.0, every_n_steps=2, trackers=None,
                                  output_dir=os.path.join(out_dir, f"ww-rank{rank}"),
                                  log_fn=lines.append)
    ctl.configure(total_steps=6, is_global_zero=rank == 0, current_step=0, world_size=world)

    real = deepspeed.zero.GatheredParameters
    probing = {"on": False}
    gathers = []

    class Probe(real):
        def __init__(self, ps, *args, **kwargs):
            if probing["on"]:
                others = [p for p in params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
                gathers.append({"num": len(ps), "shape": list(ps[0].ds_shape),
                                "available_before": len(others)})
            super().__init__(ps, *args, **kwargs)

    deepspeed.zero.GatheredParameters = Probe
    x, y = make_data()
    xs, ys = x[rank::world], y[rank::world]
    for step in range(1, 7):
        loss = torch.nn.functional.mse_loss(engine(xs[:8]), ys[:8])
        engine.backward(loss)
        engine.step()
        if ctl.should_run(step=step, epoch=0):
            probing["on"] = True
            try:
                ctl.run(engine, step=step, epoch=0)
            finally:
                probing["on"] = False
    ctl.finish(engine, step=6, epoch=0)
    deepspeed.zero.GatheredParameters = real
    after = [p.ds_status.name for p in params]
    plain = ww_core.analyze(engine)                        # no gather: every layer skipped
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        full = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    ref = ww_core.analyze(full, precision="float64")
    dump(out_dir, rank, ctl, shares, lines, world)
    with open(os.path.join(out_dir, f"zero3_{rank}.json"), "w") as fh:
        json.dump({"gathers": gathers, "after": after, "plain_names": plain.names,
                   "plain_skipped": [(s.name, s.reason) for s in plain.skipped],
                   "ref": ref.to_records()}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
