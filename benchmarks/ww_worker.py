#!/usr/bin/env python
"""WeightWatcher 0.7.7 side of ``benchmarks/speed.py`` (run with the python of the reference venv).

A long-lived worker: it imports ``weightwatcher`` once, then answers one JSON request per line on
stdin with one JSON line on its *original* stdout (WeightWatcher's own prints and warnings go to
stderr). Requests::

    {"op": "load", "model": "minilm-l6"}                      -> {"ok": true, "load_s": ...}
    {"op": "load", "model": "linear-4096", "npy": "/tmp/x.npy"}
    {"op": "warmup"}                                          -> untimed-in-table warm-up
    {"op": "analyze", "model": "minilm-l6", "randomize": false} -> {"ok": true, "s": ..., "rows": ...}
    {"op": "quit"}

Models are loaded with the same loader code as the driver (``benchmarks/ww_agreement.py``, reading
the files shipped in the same pip packages), or from the ``.npy`` the driver wrote, so both sides
analyse identical weights. Only ``WeightWatcher(model).analyze(...)`` is timed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The protocol uses a private copy of stdout; fd 1 itself is pointed at stderr so that anything
# WeightWatcher prints cannot corrupt it.
_proto = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _reply(**kw) -> None:
    _proto.write(json.dumps(kw) + "\n")
    _proto.flush()


def linear_from_npy(path: str):
    """An ``nn.Linear`` holding the matrix the driver saved (the driver builds the same module)."""
    import numpy as np
    import torch
    w = torch.from_numpy(np.load(path))
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return torch.nn.Sequential(lin).eval()


def _tiny():
    """A small fixed model for the untimed warm-up of both sides."""
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3),
                               torch.nn.Linear(256, 300)).eval()


def main() -> None:
    t0 = time.perf_counter()
    import logging
    import warnings

    import torch
    import weightwatcher as ww
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import ww_agreement as wa
    import_s = time.perf_counter() - t0
    models = {}
    _reply(ok=True, op="hello", import_s=import_s, weightwatcher=ww.__version__,
           torch=torch.__version__, threads=torch.get_num_threads(),
           numpy=__import__("numpy").__version__, scipy=__import__("scipy").__version__)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            if req["op"] == "quit":
                _reply(ok=True, op="quit")
                return
            if req["op"] == "load":
                t0 = time.perf_counter()
                if req.get("npy"):
                    models[req["model"]] = linear_from_npy(req["npy"])
                else:
                    models[req["model"]] = wa.MODELS[req["model"]]()[0]
                _reply(ok=True, op="load", load_s=time.perf_counter() - t0)
            elif req["op"] == "warmup":   # first-call costs (lazy imports, LAPACK/OpenMP init)
                t0 = time.perf_counter()
                for rnd in (False, True):
                    ww.WeightWatcher(model=_tiny()).analyze(randomize=rnd)
                _reply(ok=True, op="warmup", s=time.perf_counter() - t0)
            elif req["op"] == "analyze":
                src = models[req["model"]]
                t0 = time.perf_counter()
                details = ww.WeightWatcher(model=src).analyze(randomize=bool(req.get("randomize")))
                dt = time.perf_counter() - t0
                _reply(ok=True, op="analyze", s=dt, rows=int(len(details)),
                       loadavg=os.getloadavg()[0])
            else:
                _reply(ok=False, error=f"unknown op {req['op']!r}")
        except Exception as exc:  # report, keep serving
            _reply(ok=False, error=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
