"""2-process FSDP2 (``fully_shard``, CPU, gloo) loop driving the controller; see tests/test_fsdp2.py.

``body.0`` and ``body.2`` are their own ``fully_shard`` groups, the root owns ``body.4`` and
``body.6``: every weight is a ``DTensor`` sharded on dim 0. During each ``controller.run``,
``DTensor.full_tensor`` is probed: every gather is recorded with its size and the number of
earlier gathered tensors still alive at that moment (weak references), and FSDP2's own
``unshard`` must not run. Afterwards: plain ``ww_core.analyze`` (must skip every layer with the
reason), ``gather_snapshot`` + ``analyze`` in float64, the reference (all weights gathered at once,
float64), and, once the process group is gone, what ``gather_snapshot`` does with a DTensor it
cannot gather.

Usage: torchrun --standalone --nproc-per-node 2 fsdp2_controller.py OUT_DIR
"""

import json
import os
import sys
import weakref

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import ww_core  # noqa: E402
from common import Net, dump, make_data, record_shares  # noqa: E402
from ww_callbacks.controller import WeightWatcherController  # noqa: E402


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shares = record_shares()
    lines = []
    model = Net()
    for i in (0, 2):
        fully_shard(model.body[i])
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctl = WeightWatcherController(start_fraction=0.0, every_n_steps=2, trackers=None,
                                  output_dir=os.path.join(out_dir, f"ww-rank{rank}"),
                                  log_fn=lines.append)
    ctl.configure(total_steps=6, is_global_zero=rank == 0, current_step=0, world_size=world)

    probing = {"on": False}
    gathers, unshards, alive = [], [], []
    real_full, real_unshard = DTensor.full_tensor, FSDPModule.unshard

    def full_tensor(self, *a, **k):
        out = real_full(self, *a, **k)
        if probing["on"]:
            gathers.append({"shape": list(out.shape), "local": list(self.to_local().shape),
                            "alive_before": sum(r() is not None for r in alive)})
            alive.append(weakref.ref(out))
        return out

    def unshard(self, *a, **k):
        if probing["on"]:
            unshards.append(type(self).__name__)
        return real_unshard(self, *a, **k)

    DTensor.full_tensor, FSDPModule.unshard = full_tensor, unshard
    x, y = make_data()
    xs, ys = x[rank::world], y[rank::world]
    per_run = []
    for step in range(1, 7):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xs[:16]), ys[:16]).backward()
        opt.step()
        if ctl.should_run(step=step, epoch=0):
            n0 = len(gathers)
            probing["on"] = True
            try:
                ctl.run(model, step=step, epoch=0)
            finally:
                probing["on"] = False
            per_run.append(len(gathers) - n0)
            alive_after = sum(r() is not None for r in alive)
    ctl.finish(model, step=6, epoch=0)
    DTensor.full_tensor, FSDPModule.unshard = real_full, real_unshard

    plain = ww_core.analyze(model)                        # no gather: every layer skipped
    snap = ww_core.gather_snapshot(model)
    gathered = ww_core.analyze(snap, precision="float64")
    with torch.no_grad():
        full = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    ref = ww_core.analyze(full, precision="float64")
    still_sharded = all(isinstance(p, DTensor) for p in model.parameters())
    dump(out_dir, rank, ctl, shares, lines, world)
    dist.destroy_process_group()
    orphan = ww_core.gather_snapshot(model)               # no process group: skipped, no hang
    orphan_res = ww_core.analyze(orphan)
    with open(os.path.join(out_dir, f"fsdp2_{rank}.json"), "w") as fh:
        json.dump({"gathers": gathers, "per_run": per_run, "unshards": unshards,
                   "alive_after": alive_after, "still_sharded": still_sharded,
                   "layer_numel": {n: p.numel() for n, p in full.items() if n.endswith("weight")},
                   "plain_names": plain.names,
                   "plain_skipped": [(s.name, s.reason) for s in plain.skipped],
                   "gathered": gathered.to_records(), "ref": ref.to_records(),
                   "orphan_skipped": [(s.name, s.reason) for s in orphan_res.skipped],
                   "orphan_names": orphan_res.names}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
