"""2-process FSDP1 (CPU, gloo) training loop driving the controller directly; see tests/test_ddp.py.

The model is wrapped as nested units (``body.2`` its own unit, the rest in the root unit), so the
controller must gather unit by unit and clean FSDP's module names.

Usage: torchrun --standalone --nproc-per-node 2 fsdp_controller.py OUT_DIR
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: E402

import ww_core  # noqa: E402
from common import Net, dump, make_data, record_shares  # noqa: E402
from ww_callbacks.controller import WeightWatcherController  # noqa: E402


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shares = record_shares()
    lines = []
    model = Net()
    cpu = torch.device("cpu")
    model.body[2] = FSDP(model.body[2], device_id=cpu)        # nested unit
    fsdp = FSDP(model, device_id=cpu)                          # root unit: body.0, .4, .6
    opt = torch.optim.SGD(fsdp.parameters(), lr=0.05)
    ctl = WeightWatcherController(start_fraction=0.0, every_n_steps=2, trackers=None,
                                  output_dir=os.path.join(out_dir, f"ww-rank{rank}"),
                                  log_fn=lines.append)
    ctl.configure(total_steps=6, is_global_zero=rank == 0, current_step=0, world_size=world)
    x, y = make_data()
    xs, ys = x[rank::world], y[rank::world]
    for step in range(1, 7):
        opt.zero_grad()
        torch.nn.functional.mse_loss(fsdp(xs[:16]), ys[:16]).backward()
        opt.step()
        if ctl.should_run(step=step, epoch=0):
            ctl.run(fsdp, step=step, epoch=0)
    ctl.finish(fsdp, step=6, epoch=0)
    # reference: the full weights, gathered all at once, analysed in one process
    with FSDP.summon_full_params(fsdp, writeback=False, rank0_only=False):
        full = {n: p.detach().clone() for n, p in fsdp.named_parameters()}
    # in float64: the controller's default float32 results are compared with it within the
    # documented float32 bound (tests/helpers.py float32_alpha_tol), not bit for bit
    ref = ww_core.analyze(full, precision="float64")
    dump(out_dir, rank, ctl, shares, lines, world)
    with open(os.path.join(out_dir, f"ref{rank}.json"), "w") as fh:
        json.dump({"names": ref.names, "alpha": [l.alpha for l in ref.layers],
                   "records": ref.to_records(), "param_names": sorted(full)}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
