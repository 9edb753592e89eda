"""``freeze="apply"`` in real 2-process Lightning DDP fits (CPU, gloo).

docs/actions.md: a frozen layer gets no gradient, so DDP needs ``find_unused_parameters=True``;
the Lightning callback raises ``ValueError`` at fit start without it. Checked here both ways with
tests/ddp_scripts/lightning_ddp_freeze.py: without the option every rank raises before any step;
with it the fit runs and both ranks freeze the same layers, which then stay bit-identical.
(The same check in process, over several strategy spellings:
tests/test_actions_through_callbacks.py::test_freeze_apply_under_ddp_needs_find_unused_parameters.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
pytest.importorskip("lightning")

from helpers import SUBPROCESS_TIMEOUT  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "ddp_scripts" / "lightning_ddp_freeze.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch: both fits (``plain`` then ``unused``) in the same two processes."""
    out = tmp_path_factory.mktemp("ddp_freeze")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=out, env=env,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    found = {}
    for mode in ("plain", "unused"):
        ranks = [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(2)]
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
        found[mode] = ranks
    return found


def test_without_find_unused_parameters_every_rank_raises_at_fit_start(runs):
    for r in runs["plain"]:
        assert r["error_type"] == "ValueError", r
        assert "freeze='apply'" in r["error"] and "find_unused_parameters" in r["error"]
        assert r["global_step"] == 0 and r["history_steps"] == []     # before any step
        assert r["frozen_layers"] == [] and all(r["requires_grad"].values())


def test_with_find_unused_parameters_both_ranks_freeze_the_same_layers(runs):
    r0, r1 = runs["unused"]
    for r in (r0, r1):
        assert r["error"] is None, r["error"]
        # 64 samples, batch 16, 2 ranks: 2 steps per epoch, 3 epochs, analysed every epoch end
        assert r["global_step"] == 6 and r["history_steps"] == [2, 4, 6]
        assert r["frozen_layers"] == ["body.0", "body.2"]                # at the 2nd analysis
        assert r["frozen_at"] == {"body.0.weight": 4, "body.0.bias": 4,
                                  "body.2.weight": 4, "body.2.bias": 4}
        assert all(r["frozen_unchanged"].values())                      # did not move after
        assert [n for n, g in r["requires_grad"].items() if not g] == list(r["frozen_at"])
    assert r0["checksum"] == r1["checksum"]                              # ranks stay in sync
