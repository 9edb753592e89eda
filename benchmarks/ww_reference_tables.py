#!/usr/bin/env python
"""Regenerate ``tests/data/ww077_reference.json``: what WeightWatcher 0.7.7 itself computes on the
small synthetic model that the engine tests use.

Run it with the python of the reference venv (``weightwatcher==0.7.7``, see the ``[wwref]``
section of tox.ini)::

    $WWREF_PY benchmarks/ww_reference_tables.py                  # rewrites tests/data/ww077_reference.json
    $WWREF_PY benchmarks/ww_reference_tables.py --out /tmp/x.json

``tests/test_engine.py``, ``tests/test_rmt.py`` and ``tests/test_core_no_torch.py`` read their
reference numbers from that file; ``tests/test_ww_reference.py`` (run by ``tox -e agreement``)
regenerates it into a temporary file and fails when it no longer matches the committed one.

The model (``reference_model``): the three float32 matrices of ``tests/helpers.spec_matrices``
(one ``numpy.random.default_rng(12345)``, drawn in a fixed order: a 1000×500 Gaussian ``fc1``, a
1000×500 random-sign Pareto(2.5) ``fc2``, a 128×64×3×3 Gaussian ``conv``) in a torch module with
``conv``, ``fc1``, ``fc2``, a ``small`` Linear(5, 7) (below min_evals, skipped) and a LayerNorm
(not a weight matrix, skipped). The file records the SHA-256 of each analysed weight, so a test
that rebuilds the model can check it holds the same weights.

What is recorded (full float64 precision, WeightWatcher's own column names):

* ``analyze``: ``WeightWatcher(model).analyze()`` with its defaults, per layer;
* ``summary``: ``get_summary()`` of that run;
* ``clip_xmax``: ``analyze(fix_fingers="clip_xmax")``;
* ``mp_fit``: ``analyze(mp_fit=True)``, the Marchenko–Pastur columns;
* ``detX``: ``analyze(detX=True)``, the detX / ERG columns;
* ``describe``: ``describe()`` (no eigensolve), per layer;
* ``randomize``: ``analyze(randomize=True)`` after ``numpy.random.seed(s)`` for each seed of
  ``--seeds`` (WeightWatcher shuffles with numpy's global generator), per seed and layer.

Nothing here imports ``ww_core``: the numbers are WeightWatcher's alone. CPU only (on a CUDA
machine WeightWatcher rounds the weights to float16).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List

os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "data" / "ww077_reference.json"
FORMAT = 1

#: WeightWatcher columns kept per table.
ANALYZE_COLUMNS = ("N", "M", "rf", "Q", "num_evals", "alpha", "xmin", "xmax", "D", "sigma",
                   "num_pl_spikes", "lambda_max", "spectral_norm", "norm", "log_norm",
                   "log_spectral_norm", "alpha_weighted", "log_alpha_norm", "stable_rank", "entropy",
                   "matrix_rank", "sv_max", "sv_min", "rank_loss", "status", "warning")
CLIP_COLUMNS = ("alpha", "raw_alpha", "num_fingers", "xmin", "xmax", "D", "num_pl_spikes", "warning")
MP_COLUMNS = ("W_scale", "sigma_mp", "bulk_max", "bulk_min", "mp_softrank", "num_spikes")
DETX_COLUMNS = ("detX_num", "detX_val", "detX_val_unrescaled", "num_ERG_spikes", "ERG_gap")
DESCRIBE_COLUMNS = ("N", "M", "rf", "Q", "num_evals", "layer_type")
RANDOM_COLUMNS = ("rand_num_spikes", "num_traps", "rand_distance", "ww_softrank", "rand_sigma_mp",
                  "max_rand_eval")


def reference_model():
    """The torch module described in the module docstring (``tests/helpers.reference_model``)."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import reference_model as build  # numpy at import: the one definition of the model

    return build()


def weight_sha256(array) -> str:
    """SHA-256 of a weight's float32 values, C order (how tests check they rebuilt the same model)."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _rows(details, columns) -> Dict[str, Dict[str, Any]]:
    out = {}
    for rec in details.to_dict(orient="records"):
        out[str(rec["longname"])] = {c: _plain(rec[c]) for c in columns if c in rec}
    return out


def generate(seeds: List[int]) -> Dict[str, Any]:
    import numpy as np
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if ww.__version__ != "0.7.7":
        raise SystemExit(f"weightwatcher {ww.__version__} is installed; the tables are for 0.7.7")
    model = reference_model()
    watcher = ww.WeightWatcher(model=model)
    details = watcher.analyze()
    summary = {k: _plain(v) for k, v in watcher.get_summary(details).items()}
    clip = watcher.analyze(fix_fingers="clip_xmax")
    mp = watcher.analyze(mp_fit=True)
    detx = watcher.analyze(detX=True)
    described = watcher.describe()
    randomized: Dict[str, Any] = {}
    for s in seeds:
        np.random.seed(s)
        randomized[str(s)] = _rows(watcher.analyze(randomize=True), RANDOM_COLUMNS)
    sd = model.state_dict()
    versions = {}
    for mod in ("weightwatcher", "numpy", "scipy", "torch", "pandas", "powerlaw", "sklearn"):
        versions[mod] = getattr(__import__(mod), "__version__", "?")
    return {
        "format": FORMAT,
        "about": "WeightWatcher 0.7.7 on the synthetic model of benchmarks/ww_reference_tables.py "
                 "(regenerate with that script under the reference venv's python; CPU, float64).",
        "versions": versions,
        "weights_sha256": {name: weight_sha256(sd[f"{name}.weight"].numpy())
                           for name in ("conv", "fc1", "fc2")},
        "analyzed": [str(n) for n in details["longname"]],
        "analyze": _rows(details, ANALYZE_COLUMNS),
        "summary": summary,
        "clip_xmax": _rows(clip, CLIP_COLUMNS),
        "mp_fit": _rows(mp, MP_COLUMNS),
        "detX": _rows(detx, DETX_COLUMNS),
        "describe": _rows(described, DESCRIBE_COLUMNS),
        "randomize": {"seeds": list(seeds), "by_seed": randomized},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON file to write (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="*", default=list(range(8)),
                   help="numpy.random.seed values of the randomize=True runs (default: 0 to 7)")
    args = p.parse_args(argv)
    data = generate(args.seeds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
