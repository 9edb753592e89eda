#!/usr/bin/env python
"""What an analysis costs under the layer rotation (``layers_per_analysis=k``), by model size.

Two parts, synthetic weights only (nothing downloaded), the controller synchronous, no trackers,
history in memory, so the figures are the rotation and the analysis alone:

* ``sizes``: a torch ``nn.Sequential`` of ``n`` bias-free ``nn.Linear(128, 128)`` layers
  (``n`` = 100, 1,000, 5,000; Gaussian initialisation), ``k`` = 50: per analysis, the rotation's
  own work (listing the layers, choosing ``k``, building the name filter) and the whole analysis;
  beside it one analysis of every layer (``k`` off) where it is short enough (``--full-max``).
* ``wide``: 1,000 layers of 4096×4096 float32 as a state dict of lazy tensors (only the layers
  an analysis covers are materialised; each is a copy of one of 4 distinct matrices
  ``U·diag(s)·Vᵀ + noise`` with a power-law ``s`` (``--wide-distinct``), so at most 4 + k of
  them are in memory),
  ``k`` = 2 (``--wide-k``): the time per analysis, and a check that every layer is visited within
  ``ceil(1000 / k)`` analyses (the rotation alone, no analysis).

::

    python benchmarks/rotation_cost.py                       # both parts, ~3 min on 2 cores
    python benchmarks/rotation_cost.py --parts sizes --sizes 100 1000
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))


def _controller(k: Any, total: int) -> Any:
    from ww_callbacks import MEMORY_ONLY, WeightWatcherController

    ctl = WeightWatcherController(every_n_steps=1, start_fraction=0, output_dir=MEMORY_ONLY,
                                  trackers=None, log_fn=lambda line: None, async_analysis=False,
                                  layers_per_analysis=k)
    ctl.configure(total_steps=total)
    return ctl


def _timed_analyses(ctl: Any, source: Any, count: int) -> Dict[str, Any]:
    """``count`` analyses of ``source`` through ``ctl``; per-analysis wall and rotation seconds."""
    import ww_callbacks.rotation as rotation

    inner = rotation.plan_analysis
    planning: List[float] = []

    def timed_plan(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        planning.append(time.perf_counter() - t0)
        return out

    import ww_callbacks.controller as controller

    controller.plan_analysis = timed_plan
    walls, cpus, layers = [], [], []
    try:
        for step in range(1, count + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            result = ctl.run(source, step=step, epoch=0)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            layers.append(len(result.layers) if result is not None else 0)
    finally:
        controller.plan_analysis = inner
    return {"wall_s": walls, "cpu_s": cpus, "rotation_s": planning, "analysed_layers": layers,
            "median_wall_s": statistics.median(walls), "median_cpu_s": statistics.median(cpus),
            "median_rotation_s": statistics.median(planning) if planning else None}


def part_sizes(sizes: List[int], k: int, analyses: int, full_max: int) -> List[Dict[str, Any]]:
    import torch

    out = []
    for n in sizes:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(128, 128, bias=False) for _ in range(n)])
        row: Dict[str, Any] = {"layers": n, "shape": "128x128", "k": k,
                               "analyses_per_cycle": math.ceil(n / k), "loadavg": os.getloadavg()[0]}
        row.update(_timed_analyses(_controller(k, analyses), model, analyses))
        if n <= full_max:
            full = _timed_analyses(_controller(None, 1), model, 1)
            row["full_analysis_s"] = full["median_wall_s"]
        print(f"[rotation] n={n}: {row['median_wall_s']:.3f} s ({row['median_cpu_s']:.3f} CPU-s) per "
              f"analysis of {k} layers (rotation {row['median_rotation_s'] * 1e3:.1f} ms), full "
              f"{row.get('full_analysis_s', float('nan')):.2f} s, load {row['loadavg']:.1f}", flush=True)
        out.append(row)
        del model
    return out


class _Served:
    """Lazy tensors of the ``wide`` part: each read is a copy of one of a few matrices."""

    def __init__(self, n: int, width: int, distinct: int = 4) -> None:
        import numpy as np

        from ww_core.file_io import LazyTensor

        rng = np.random.default_rng(0)
        self.pool = []
        for i in range(distinct):
            q1, _ = np.linalg.qr(rng.standard_normal((width, width)).astype(np.float32))
            q2, _ = np.linalg.qr(rng.standard_normal((width, width)).astype(np.float32))
            alpha = 3.0 + 0.25 * i
            s = np.arange(1, width + 1, dtype=np.float32) ** (-1.0 / (2 * (alpha - 1)))
            w = (q1 * s) @ q2.T
            noise = rng.standard_normal((width, width)).astype(np.float32)
            w += noise * (0.3 * np.linalg.norm(w) / np.linalg.norm(noise))
            self.pool.append(w.astype(np.float32))
        pool = self.pool

        class Served(LazyTensor):
            def __init__(self, index: int) -> None:
                self.index, self.shape, self.dtype_name, self.unusable = index, (width, width), "F32", None
                self.path, self.start, self.end = Path("-"), 0, 0

            def read(self) -> Any:
                return pool[self.index % len(pool)].copy()

        self.state_dict = {f"model.layers.{i}.proj.weight": Served(i) for i in range(n)}


def part_wide(n: int, width: int, k: int, analyses: int, distinct: int = 4) -> Dict[str, Any]:
    from ww_callbacks.rotation import LayerRotation

    t0 = time.perf_counter()
    served = _Served(n, width, distinct)
    gen = time.perf_counter() - t0
    row: Dict[str, Any] = {"layers": n, "shape": f"{width}x{width} float32", "k": k,
                           "analyses_per_cycle": math.ceil(n / k), "generate_pool_s": gen,
                           "distinct_matrices": distinct,
                           "loadavg": os.getloadavg()[0]}
    row.update(_timed_analyses(_controller(k, analyses), served.state_dict, analyses))
    names = [(name[:-len(".weight")], True) for name in served.state_dict]
    rot = LayerRotation(k)
    m = math.ceil(n / k)
    seen = set()
    for _ in range(m):
        seen.update(rot.take(names))
    row["all_visited_within_ceil_n_over_k"] = len(seen) == n
    print(f"[rotation] wide n={n} {width}x{width} k={k}: {row['median_wall_s']:.2f} s "
          f"({row['median_cpu_s']:.2f} CPU-s) per analysis "
          f"({row['wall_s']}), every layer within {m} analyses: {row['all_visited_within_ceil_n_over_k']}, "
          f"load {row['loadavg']:.1f}", flush=True)
    return row


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", default=["sizes", "wide"], choices=["sizes", "wide"])
    ap.add_argument("--sizes", nargs="*", type=int, default=[100, 1000, 5000])
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--analyses", type=int, default=5)
    ap.add_argument("--full-max", type=int, default=1000, help="largest n also analysed whole")
    ap.add_argument("--wide-layers", type=int, default=1000)
    ap.add_argument("--wide-width", type=int, default=4096)
    ap.add_argument("--wide-k", type=int, default=2)
    ap.add_argument("--wide-analyses", type=int, default=3)
    ap.add_argument("--wide-distinct", type=int, default=4, help="distinct matrices served")
    ap.add_argument("--out", default=str(HERE / "results" / "rotation_cost.json"))
    args = ap.parse_args(argv)
    import torch

    report: Dict[str, Any] = {"started": _dt.datetime.now().isoformat(timespec="seconds"),
                              "machine": platform.processor() or platform.machine(),
                              "cores": os.cpu_count(), "torch": torch.__version__,
                              "torch_threads": torch.get_num_threads()}
    if "sizes" in args.parts:
        report["sizes"] = part_sizes(args.sizes, args.k, args.analyses, args.full_max)
    if "wide" in args.parts:
        report["wide"] = part_wide(args.wide_layers, args.wide_width, args.wide_k, args.wide_analyses,
                                   args.wide_distinct)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
