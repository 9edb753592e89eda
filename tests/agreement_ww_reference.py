"""The committed ``tests/data/ww077_reference.json`` is still what WeightWatcher 0.7.7 computes.

Run by benchmarks/run_agreement.sh (``tox -e agreement``), which sets ``WWREF_PY`` to the python of
a venv with ``weightwatcher==0.7.7``; the file name does not match ``test_*.py``, so a plain
``pytest`` (the py311 and core envs) does not collect it. It regenerates the file with
``benchmarks/ww_reference_tables.py`` into a temporary folder and compares it with the committed
one: a hand edit, a changed construction of the model or a stale file fails the gate. To update
the file after an intended change::

    $WWREF_PY benchmarks/ww_reference_tables.py
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from helpers import REPO

DATA = REPO / "tests" / "data" / "ww077_reference.json"
SCRIPT = REPO / "benchmarks" / "ww_reference_tables.py"

#: The committed file against a fresh run of WeightWatcher 0.7.7, possibly on another machine: all
#: float64, so every eigenvalue is within ~n·eps·λ_max of the exact one whatever the LAPACK build,
#: and the recorded values are smooth functions of them once the discrete choices (xmin, the MP
#: grid point, trap counts: compared exactly, as the integers they produce) are made. Measured,
#: regenerating with OpenBLAS's Haswell kernels on 1 thread instead of this machine's default
#: kernels on 2: ≤ 7.5e-14 relative, except rand_distance (a distance between two nearly equal
#: spectra, ≈ 0.002-0.009, which keeps the eigenvalues' absolute rounding: 8e-14 absolute, 3.4e-11
#: relative). REL = 1e-9 and ABS = 1e-10 leave three orders of magnitude or more, and are far below
#: what a change of method or weights produces (≥ 1e-6).
REL = 1e-9
ABS = 1e-10


def _assert_same(got, expected, where="") -> None:
    if isinstance(expected, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(expected), where
        for key in expected:
            _assert_same(got[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_same(g, e, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(got, (bool, str)):
        assert isinstance(got, (int, float)), where
        assert math.isclose(got, expected, rel_tol=REL, abs_tol=ABS), (where, got, expected)
    else:
        assert got == expected and type(got) is type(expected), (where, got, expected)


def test_committed_tables_match_weightwatcher(tmp_path):
    if not os.environ.get("WWREF_PY"):
        pytest.fail("set WWREF_PY to the python of a venv with weightwatcher==0.7.7 "
                    "(tox -e agreement and benchmarks/run_agreement.sh do)")
    committed = json.loads(DATA.read_text())
    out = tmp_path / "ww077_reference.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONPATH", None)
    seeds = [str(s) for s in committed["randomize"]["seeds"]]
    proc = subprocess.run([os.environ["WWREF_PY"], str(SCRIPT), "--out", str(out), "--seeds", *seeds],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(out.read_text())
    # the library versions only say where the file was made; the numbers must match
    fresh.pop("versions")
    committed.pop("versions")
    _assert_same(fresh, committed)
