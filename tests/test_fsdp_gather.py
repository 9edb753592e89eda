"""FSDP1 on CPU/gloo, 2 processes: the controller gathers the model one FSDP unit at a time.

A real ``torchrun`` run of tests/ddp_scripts/fsdp_gather_probe.py: four units (three nested
Linear units and the root, which owns the last Linear). During ``WeightWatcherController.run`` the
script records every ``FullyShardedDataParallel.summon_full_params`` call and every low-level
``FlatParamHandle.unshard`` gather, with the units unsharded at that moment.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
pytest.importorskip("torch.distributed.fsdp")

from helpers import SUBPROCESS_TIMEOUT  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "ddp_scripts" / "fsdp_gather_probe.py"
LAYERS = ["body.0", "body.2", "body.4", "body.6"]
UNITS = {"root", "body.0", "body.2", "body.4"}
ANALYSED_STEPS = [2, 4]


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    exe = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not os.path.exists(exe):
        pytest.skip("torchrun not installed")
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([exe, "--standalone", "--nproc-per-node", "2", str(SCRIPT), str(out)],
                          cwd=out, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return [json.loads((out / f"probe{r}.json").read_text()) for r in range(2)]


def test_one_summon_per_unit_per_analysis_not_recursive(probes):
    for p in probes:
        calls = p["calls"]
        assert len(calls) == len(UNITS) * len(ANALYSED_STEPS), calls
        per_analysis = [calls[i:i + len(UNITS)] for i in range(0, len(calls), len(UNITS))]
        for batch in per_analysis:
            assert {c["unit"] for c in batch} == UNITS        # every unit, each once
        for c in calls:
            assert c["recurse"] is False and c["writeback"] is False and c["rank0_only"] is False
    # every rank enters the collectives in the same order
    assert [c["unit"] for c in probes[0]["calls"]] == [c["unit"] for c in probes[1]["calls"]]


def test_only_the_summoned_unit_is_unsharded(probes):
    for p in probes:
        assert p["before"] == [[]] * len(ANALYSED_STEPS)     # nothing unsharded after a step
        for c in p["calls"]:
            assert c["unsharded_inside"] == [c["unit"]], c   # that unit and no other
            assert c["unsharded_after"] == [], c             # freed again on exit


def test_peak_unsharded_memory_is_one_unit(probes):
    for p in probes:
        assert p["gathers"], "no FSDP gather was seen during controller.run"
        largest = max(p["unit_numel"].values())
        assert largest < sum(p["unit_numel"].values())       # a real bound, not the whole model
        for g in p["gathers"]:
            assert len(g["unsharded"]) == 1, g
            assert g["numel"] <= largest


def test_result_has_clean_names_and_matches_the_full_weights(probes):
    for p in probes:
        assert [a["step"] for a in p["analysed"]] == ANALYSED_STEPS
        last = p["analysed"][-1]
        assert last["names"] == LAYERS == p["ref_names"]
        assert last["alpha"] == pytest.approx(p["ref_alpha"], rel=1e-9)     # float64 both
    assert probes[0]["analysed"] == probes[1]["analysed"]
