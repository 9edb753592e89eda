"""Shared by the 2-process training scripts of tests/test_ddp.py: a tiny model, data, a record of
the layers each rank analysed, and the per-rank dump the test compares."""

import json
import os

import torch

WIDTHS = (32, 64, 64, 48, 16)        # four Linear layers, each with >= 16 eigenvalues


def make_body():
    torch.manual_seed(0)
    layers = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


class Net(torch.nn.Module):
    """``make_body()`` as a module with the scripts' ``body.<i>`` layer names."""

    def __init__(self):
        super().__init__()
        self.body = make_body()

    def forward(self, x):
        return self.body(x)


def make_data(n=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, WIDTHS[0], generator=g), torch.randn(n, WIDTHS[-1], generator=g)


def record_shares():
    """Wrap ww_core's per-rank share so each rank records which layers it analysed."""
    import ww_core.distributed as wd

    shares = []
    real = wd._analyze_share

    def recording(source, names, options):
        shares.append(list(names))
        return real(source, names, options)

    wd._analyze_share = recording
    return shares


def dump(out_dir, rank, controller, shares, log_lines, world_size):
    os.makedirs(out_dir, exist_ok=True)
    records = controller.last_result.to_records() if controller.last_result is not None else None
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        # NaN -> "NaN" token: compared as text by the test
        json.dump({"rank": rank, "world_size": world_size, "last_result": records,
                   "history_steps": controller.history.steps,
                   "history_rows": len(controller.history.rows),
                   "num_analyses": controller.num_analyses, "shares": shares,
                   "sharded": controller.sharded, "log_lines": log_lines}, fh)


def leave():
    """Leave the process group together: a rank whose gloo peers have exited can abort
    (SIGABRT) in the group's destructor at interpreter exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
