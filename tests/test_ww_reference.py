"""The reference numbers of the engine tests are WeightWatcher 0.7.7's own.

``tests/data/ww077_reference.json`` holds what WeightWatcher 0.7.7 computes on the synthetic model
built from helpers.spec_matrices (tests/test_engine.py, tests/test_rmt.py and
tests/test_core_no_torch.py compare ww_core with it). It is written by
``benchmarks/ww_reference_tables.py``, run under the python of a venv with ``weightwatcher==0.7.7``.

* here (everywhere, numpy only): the file is for the weights the tests build (SHA-256 of each
  matrix) and was written by WeightWatcher 0.7.7;
* ``tests/agreement_ww_reference.py`` (``tox -e agreement`` / benchmarks/run_agreement.sh, which
  have WeightWatcher's python in ``WWREF_PY``; not collected by a plain ``pytest``): regenerates
  the file and compares it with the committed one, so a hand edit, a changed construction of the
  model or a stale file fails CI. To update the file after an intended change::

      $WWREF_PY benchmarks/ww_reference_tables.py
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from helpers import REPO, spec_matrices

DATA = REPO / "tests" / "data" / "ww077_reference.json"


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


@pytest.mark.core
def test_committed_tables_describe_the_test_weights():
    data = json.loads(DATA.read_text())
    assert data["versions"]["weightwatcher"] == "0.7.7"
    A, B, C = spec_matrices()
    assert data["weights_sha256"] == {"fc1": _sha256(A), "fc2": _sha256(B), "conv": _sha256(C)}
    assert data["analyzed"] == ["conv", "fc1", "fc2"]
    for table in ("analyze", "clip_xmax", "mp_fit", "detX", "describe"):
        assert sorted(data[table]) == ["conv", "fc1", "fc2"], table
    assert len(data["randomize"]["seeds"]) >= 5
    assert set(data["randomize"]["by_seed"]) == {str(s) for s in data["randomize"]["seeds"]}
