"""Bounded weight snapshots (``ww_core.snapshot(budget=)``, ``AnalysisExecutor(snapshot_budget=)``).

The memory bounds are measured, not timed: a fresh subprocess builds a ~302 MB model (18 Linear
layers of 2048 × 2048 float32, 16.8 MB each) and reports the growth of its peak RSS
(``ru_maxrss``) over the snapshot call alone.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import ww_core  # noqa: E402
from helpers import REPO  # noqa: E402
from ww_callbacks.executor import AnalysisExecutor  # noqa: E402
from ww_core import snapshot_memory as sm  # noqa: E402

MB = 1e6
LAYER_MB = 2048 * 2048 * 4 / MB

PROBE = r"""
import json, os, resource, sys
import torch
torch.set_num_threads(1)
import ww_core
budget = None if sys.argv[1] == "none" else int(sys.argv[1])
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False) for _ in range(18)])
ww_core.snapshot(torch.nn.Linear(8, 8))                      # imports done before measuring
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
base, held, out = peak(), resident(), {}
try:
    snap = ww_core.snapshot(model, budget=budget)
    out["placement"] = [snap.placement["device"], snap.placement["host"]]
except MemoryError as exc:
    out["error"] = str(exc)
out["extra"] = peak() - base
out["held"] = resident() - held          # what the snapshot still holds (peak may hide reuse)
out["model"] = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(out))
"""


def probe(budget):
    proc = subprocess.run([sys.executable, "-c", PROBE, str(budget)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_snapshot_over_budget_copies_nothing():
    out = probe(int(50 * MB))
    assert out["model"] > 6 * 50 * MB                       # the model is 6x the budget
    assert "over its budget of 50.0 MB" in out["error"] and "nothing was copied" in out["error"]
    assert out["extra"] <= 50 * MB + LAYER_MB * MB           # bound: budget + one layer
    assert out["extra"] < 5 * MB                             # measured: nothing copied (~0.1 MB)


@pytest.mark.slow
def test_snapshot_within_budget_is_measured_and_bounded():
    unlimited = probe("none")                                # the measurement sees a full copy
    assert unlimited["placement"] == [unlimited["model"], 0]
    assert max(unlimited["extra"], unlimited["held"]) >= 0.9 * unlimited["model"]
    bounded = probe(int(400 * MB))
    assert bounded["placement"] == [bounded["model"], 0]
    assert bounded["extra"] <= 400 * MB + LAYER_MB * MB


def test_default_budget_is_min_of_2gb_and_a_tenth_of_memory():
    psutil = pytest.importorskip("psutil")
    assert sm.device_memory("cpu") == psutil.virtual_memory().total
    assert sm.default_budget("cpu") == int(min(2 * 1024 ** 3, 0.1 * psutil.virtual_memory().total))
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        assert sm.default_budget("cuda:0") == int(min(2 * 1024 ** 3, 0.1 * total))


def test_budget_values_are_checked():
    for ok in (None, "auto", 0, 10, 1.5e9):
        assert sm.check_budget(ok) == ok
    for bad in (-1, "2GB", True, float("nan")):
        with pytest.raises(ValueError, match="snapshot budget"):
            ww_core.snapshot(torch.nn.Linear(8, 8), budget=bad)
        with pytest.raises(ValueError, match="snapshot budget"):
            AnalysisExecutor(snapshot_budget=bad)


def test_layer_bytes_follow_the_dtype():
    lms = ww_core.find_layers({"a.weight": np.zeros((30, 20), np.float64),
                               "b.weight": torch.zeros(30, 20, dtype=torch.bfloat16)})
    assert [sm.layer_nbytes(lm) for lm in lms] == [30 * 20 * 8, 30 * 20 * 2]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 48))


def test_executor_over_budget_analyses_synchronously_then_async_again():
    model = _model()
    ex = AnalysisExecutor(snapshot_budget=1000)               # bytes: far below the 43 kB model
    ex.configure(world_size=1, asynchronous=True)
    done = ex.start(model, step=3, epoch=0)
    assert done is not None and done.error is None and ex.sync_fallbacks == 1
    assert done.fallback.startswith("analysed synchronously: a snapshot of 2 layers needs")
    assert done.result.names == ["0", "2"] and not ex.busy
    expected = ww_core.analyze(model)
    assert [l.alpha for l in done.result.layers] == pytest.approx([l.alpha for l in expected.layers])
    ex.snapshot_budget = None                                 # fits again: back to the background
    assert ex.start(model, step=4, epoch=0) is None
    later = ex.collect(wait=True)
    assert later.fallback is None and later.result.names == ["0", "2"]
    ex.shutdown()


def test_executor_default_budget_copies_small_models_in_the_background():
    ex = AnalysisExecutor()
    assert ex.snapshot_budget == "auto"
    ex.configure(world_size=1, asynchronous=True)
    assert ex.start(_model(), step=1, epoch=0) is None
    assert ex.collect(wait=True).result.names == ["0", "2"]
    ex.shutdown()


def test_flat_shard_weight_is_skipped_not_an_index_error():
    """FSDP1 outside its root unit leaves 1-D flat shards on the modules: a skip with a reason."""
    model = _model()
    model[0].weight = torch.nn.Parameter(torch.zeros(2048))
    res = ww_core.analyze(model)
    assert res.names == ["2"]
    assert "not a dense weight" in res.skipped[0].reason and res.skipped[0].name == "0"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_snapshot_spills_to_pinned_host_memory():
    model = _model().cuda()
    first = 96 * 64 * 4                                       # bytes of layer "0"
    snap = ww_core.snapshot(model, budget=first)              # layer 0 on the GPU, layer 2 on host
    (a, b) = [lm.load() for lm in snap.layers]
    assert a.device.type == "cuda" and b.device.type == "cpu" and b.is_pinned()
    assert snap.placement["device"] == first and snap.placement["host"] == 96 * 48 * 4
    with pytest.raises(sm.SnapshotBudgetError):
        ww_core.snapshot(model, budget=100)
    assert ww_core.analyze(snap).names == ["0", "2"]
