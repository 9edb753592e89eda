"""2-process FSDP1 (CPU, gloo): does the controller gather the units one at a time?

Every Linear but the last is its own FSDP unit (``body.0``, ``body.2``, ``body.4``), the root unit
owns ``body.6``. During ``controller.run`` two probes are installed:

* ``FullyShardedDataParallel.summon_full_params`` is wrapped: each call records its arguments, the
  unit it was given and, inside the context, which units' flat parameters are unsharded;
* ``FlatParamHandle.unshard`` is wrapped (the low-level gather every FSDP1 path goes through):
  after each gather, the number of units unsharded at that moment and their full sizes.

Each rank dumps what it saw to ``probe<rank>.json``; see tests/test_fsdp_gather.py.

Usage: torchrun --standalone --nproc-per-node 2 fsdp_gather_probe.py OUT_DIR
"""

import contextlib
import json
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: E402
from torch.distributed.fsdp._flat_param import FlatParamHandle  # noqa: E402

import ww_core  # noqa: E402
from common import Net, make_data  # noqa: E402
from ww_callbacks import MEMORY_ONLY  # noqa: E402
from ww_callbacks.controller import WeightWatcherController  # noqa: E402


def unit_label(unit, units):
    return next(label for label, u in units.items() if u is unit)


def unsharded(units):
    """Labels of the units whose padded unsharded flat parameter has storage now."""
    out = []
    for label, unit in units.items():
        handle = unit._handle
        if handle is None:
            continue
        full = handle._get_padded_unsharded_flat_param()
        if full.untyped_storage().size() > 0:
            out.append(label)
    return out


def full_numel(unit):
    return int(unit._handle.flat_param._unpadded_unsharded_size.numel())


def main(out_dir):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cpu = torch.device("cpu")
    model = Net()
    for i in (0, 2, 4):
        model.body[i] = FSDP(model.body[i], device_id=cpu)
    fsdp = FSDP(model, device_id=cpu)
    units = {"root": fsdp, "body.0": model.body[0], "body.2": model.body[2],
             "body.4": model.body[4]}
    opt = torch.optim.SGD(fsdp.parameters(), lr=0.05)
    ctl = WeightWatcherController(start_fraction=0.0, every_n_steps=2, trackers=None,
                                  output_dir=MEMORY_ONLY, log_fn=lambda line: None,
                                  precision="float64")     # compares with the reference exactly
    ctl.configure(total_steps=4, is_global_zero=rank == 0, current_step=0, world_size=world)

    probing = {"on": False}
    calls, gathers, before = [], [], []
    real_summon = FSDP.summon_full_params           # the plain function behind the staticmethod
    real_unshard = FlatParamHandle.unshard

    @contextlib.contextmanager
    def summon(module, recurse=True, writeback=True, rank0_only=False, offload_to_cpu=False,
               with_grads=False):
        if not probing["on"]:
            with real_summon(module, recurse=recurse, writeback=writeback, rank0_only=rank0_only,
                             offload_to_cpu=offload_to_cpu, with_grads=with_grads):
                yield
            return
        rec = {"unit": unit_label(module, units) if isinstance(module, FSDP) else repr(type(module)),
               "recurse": recurse, "writeback": writeback, "rank0_only": rank0_only}
        with real_summon(module, recurse=recurse, writeback=writeback, rank0_only=rank0_only,
                         offload_to_cpu=offload_to_cpu, with_grads=with_grads):
            rec["unsharded_inside"] = unsharded(units)
            yield
        rec["unsharded_after"] = unsharded(units)
        calls.append(rec)

    def unshard(self):
        out = real_unshard(self)
        if probing["on"]:
            now = unsharded(units)
            gathers.append({"unsharded": now, "numel": sum(full_numel(units[u]) for u in now)})
        return out

    FSDP.summon_full_params = staticmethod(summon)
    FlatParamHandle.unshard = unshard

    x, y = make_data()
    xs, ys = x[rank::world], y[rank::world]
    analysed = []
    for step in range(1, 5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(fsdp(xs[:16]), ys[:16]).backward()
        opt.step()
        if ctl.should_run(step=step, epoch=0):
            before.append(unsharded(units))
            probing["on"] = True
            try:
                result = ctl.run(fsdp, step=step, epoch=0)
            finally:
                probing["on"] = False
            analysed.append({"step": step, "names": result.names if result is not None else None,
                             "alpha": [l.alpha for l in result.layers] if result is not None else None})
    # reference at the last step: all weights gathered at once, analysed in this process
    with FSDP.summon_full_params(fsdp, writeback=False, rank0_only=False):
        full = {n: p.detach().clone() for n, p in fsdp.named_parameters()}
    ref = ww_core.analyze(full, precision="float64")
    FSDP.summon_full_params = staticmethod(real_summon)
    FlatParamHandle.unshard = real_unshard
    with open(os.path.join(out_dir, f"probe{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "calls": calls, "gathers": gathers, "before": before,
                   "analysed": analysed, "ref_names": ref.names,
                   "ref_alpha": [l.alpha for l in ref.layers],
                   "unit_numel": {label: full_numel(u) for label, u in units.items()}}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
