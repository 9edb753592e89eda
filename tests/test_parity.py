"""WeightWatcher 0.7.7 parity beyond alpha: ``detX=True``, ``fit=``, ``describe()``, ``distances()``.

Core level, no WeightWatcher needed: hand-checkable spectra, a literal transcription of 0.7.7's
detX loop, and WeightWatcher's own numbers on the engine tests' model
(``tests/data/ww077_reference.json``, tables ``detX`` and ``describe``). The same checks on
pretrained models against a live WeightWatcher run are in benchmarks/ww_parity.py
(``tox -e agreement``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import ww_core
from helpers import REPO, spec_matrices
from ww_core.detx import detx_columns, detx_constraint

DATA = REPO / "tests" / "data" / "ww077_reference.json"


def _ww077_detx_loop(evals: np.ndarray):
    """0.7.7's ``detX_constraint(evals, rescale=True)``, transcribed literally (products, loop)."""
    evals = evals * (len(evals) / np.sum(evals))
    num, idx = len(evals), 0
    for idx in range(len(evals) - 1, 0, -1):
        if np.prod(evals[idx:]) < 1.0:
            num = len(evals) - idx
            break
    return num, idx


def _reference_state_dict():
    A, B, C = spec_matrices()
    return {"conv.weight": C, "fc1.weight": A, "fc2.weight": B}


# ------------------------------------------------------------------------------------------------
# detX
# ------------------------------------------------------------------------------------------------

@pytest.mark.core
def test_detx_by_hand():
    # ten values of 1 and ninety zeros: rescaled to ten 10s; the first zero tips the product
    evals = np.array([0.0] * 90 + [1.0] * 10)
    assert detx_constraint(evals) == (11, 89)
    assert detx_columns(evals, 10) == {"detX_num": 11, "detX_val": 0.0, "ERG_gap": 1}
    # rescaled by 4/16: 0.25, 0.5, 0.75, 2.5 -> 2.5, 1.875, 0.9375 < 1 at index 1
    assert detx_columns(np.array([1.0, 2.0, 3.0, 10.0]), 1) == {"detX_num": 3, "detX_val": 2.0,
                                                                "ERG_gap": 2}
    # the product never drops below 1: all n in the tail, detX_val = evals[1] (0.7.7's loop)
    assert detx_columns(np.array([0.5, 1.0, 1.5]), 2) == {"detX_num": 3, "detX_val": 1.0, "ERG_gap": 1}
    # too few values or a flat spectrum: (0, 0)
    assert detx_constraint(np.array([3.0])) == (0, 0)
    assert detx_constraint(np.ones(5)) == (0, 0)
    # a failed fit has no tail to compare with
    assert math.isnan(detx_columns(np.array([1.0, 2.0, 3.0, 10.0]), math.nan)["ERG_gap"])
    with pytest.raises(ValueError, match="one-dimensional"):
        detx_constraint(np.ones((2, 2)))


@pytest.mark.core
@pytest.mark.parametrize("seed", range(6))
def test_detx_equals_the_0_7_7_loop(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 400))
    w = rng.standard_normal((n + int(rng.integers(0, 300)), n))
    if seed % 2:                                    # heavy-tailed entries: a few large eigenvalues
        w *= rng.pareto(2.0 + seed / 3, w.shape) + 1
    evals = np.sort(np.linalg.eigvalsh(w.T @ w))
    got = detx_constraint(evals)
    assert got == _ww077_detx_loop(evals)
    assert 0 < got[0] <= n


@pytest.mark.core
def test_detx_exact_is_the_sum_of_logarithms():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3000, 2000)) / 50 * (rng.pareto(1.5, (3000, 2000)) + 1)
    evals = np.sort(np.linalg.eigvalsh(w.T @ w))
    scaled = evals * (evals.size / evals.sum())
    logs = np.log(np.maximum(scaled, 0.0))
    # the exact tail: the first index from the top where the sum of the logs drops below 0
    exact = next(i for i in range(evals.size - 1, 0, -1) if math.fsum(logs[i:]) < 0.0)
    assert detx_constraint(evals, exact=True) == (evals.size - exact, exact)
    assert detx_constraint(evals) == _ww077_detx_loop(evals)


@pytest.mark.core
@pytest.mark.parametrize("seed", range(4))
def test_detx_exact_equals_the_product_on_narrow_spectra(seed):
    rng = np.random.default_rng(seed)
    evals = np.sort(np.linalg.eigvalsh((lambda w: w.T @ w)(rng.standard_normal((300, 120)))))
    assert detx_constraint(evals, exact=True) == detx_constraint(evals)


@pytest.mark.core
def test_detx_columns_equal_weightwatcher_on_the_reference_model():
    ref = json.loads(DATA.read_text())["detX"]
    res = ww_core.analyze(_reference_state_dict(), detX=True, precision="float64")
    assert sorted(res.names) == sorted(ref)
    for layer in res:
        ww = ref[layer.name]
        assert layer.detX_num == ww["detX_num"] == ww["num_ERG_spikes"], layer.name
        assert layer.ERG_gap == ww["ERG_gap"], layer.name
        assert math.isclose(layer.detX_val, ww["detX_val"], rel_tol=1e-9), layer.name
        row = layer.to_dict()
        assert (row["detX_num"], row["ERG_gap"]) == (ww["detX_num"], ww["ERG_gap"])


@pytest.mark.core
def test_detx_off_by_default_and_on_in_the_table():
    sd = _reference_state_dict()
    off = ww_core.analyze(sd, layers="fc1")
    assert math.isnan(off["fc1"].detX_num) and math.isnan(off["fc1"].ERG_gap)
    on = ww_core.analyze(sd, layers="fc1", detX=True)
    assert on.options["detX"] is True and off.options["detX"] is False
    assert on["fc1"].alpha == off["fc1"].alpha         # detX adds columns, changes nothing else
    for col in ("detX_num", "detX_val", "ERG_gap"):
        assert col in ww_core.COLUMNS and math.isfinite(on.to_records()[0][col])


# ------------------------------------------------------------------------------------------------
# fit=
# ------------------------------------------------------------------------------------------------

@pytest.mark.core
@pytest.mark.parametrize("fit", ["TPL", "E_TPL", "truncated_power_law"])
def test_truncated_power_laws_are_refused(fit):
    with pytest.raises(ValueError, match="powerlaw"):
        ww_core.analyze({"fc.weight": np.ones((16, 16))}, fit=fit)


@pytest.mark.core
def test_fit_values():
    sd = {"fc.weight": np.random.default_rng(0).standard_normal((64, 32))}
    assert ww_core.analyze(sd, fit="PL")["fc"].alpha == ww_core.analyze(sd, fit="power_law")["fc"].alpha
    with pytest.raises(ValueError, match="fit must be 'PL'"):
        ww_core.analyze(sd, fit="lognormal")


# ------------------------------------------------------------------------------------------------
# describe()
# ------------------------------------------------------------------------------------------------

def test_describe_a_torch_model():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 32, 3), torch.nn.Linear(5, 7),
                                torch.nn.Embedding(1000, 24))
    desc = ww_core.describe(model)
    rows = [(l.name, l.type, l.N, l.M, l.rf, l.num_evals, l.shape) for l in desc]
    assert rows == [("0", "dense", 128, 64, 1, 64, (1, 128, 64)),
                    ("2", "conv2d", 32, 16, 9, 144, (9, 32, 16)),
                    ("4", "embedding", 1000, 24, 1, 24, (1, 1000, 24))]
    assert desc["2"].Q == 2.0 and desc.num_evals == 64 + 144 + 24
    assert [(s.name, s.reason) for s in desc.skipped] == [("3", "too few eigenvalues (5 < min_evals=8)")]
    # the same layers analyze() analyses, under the same options
    assert desc.names == ww_core.analyze(model).names
    assert ww_core.describe(model, layer_types=["conv2d"]).names == ["2"]
    assert list(desc.to_dataframe()["num_evals"]) == [64, 144, 24]


@pytest.mark.core
def test_describe_loads_no_weights():
    class Unreadable:                      # a weight that fails as soon as it is read
        shape, dtype = (64, 32), "float32"

        def __array__(self, *args, **kwargs):
            raise RuntimeError("weights were read")

    sd = {"fc.weight": Unreadable()}
    assert [(l.name, l.N, l.M) for l in ww_core.describe(sd)] == [("fc", 64, 32)]
    with pytest.raises(RuntimeError, match="weights were read"):
        ww_core.analyze(sd)


@pytest.mark.core
def test_describe_equals_weightwatcher_on_the_reference_model():
    ref = json.loads(DATA.read_text())["describe"]
    desc = ww_core.describe(_reference_state_dict())
    assert sorted(desc.names) == sorted(ref)
    for layer in desc:
        ww = ref[layer.name]
        assert (layer.N, layer.M, layer.rf, layer.num_evals, layer.Q) == (
            ww["N"], ww["M"], ww["rf"], ww["num_evals"], ww["Q"]), layer.name


# ------------------------------------------------------------------------------------------------
# distances()
# ------------------------------------------------------------------------------------------------

@pytest.mark.core
def test_distances_of_identical_models():
    sd = _reference_state_dict()
    for method, expected in (("raw", 0.0), ("euclidean", 0.0), ("cka", 1.0)):
        res = ww_core.distances(sd, {k: v.copy() for k, v in sd.items()}, method)
        assert res.names == ["conv", "fc1", "fc2"] and not res.only_in_a and not res.only_in_b
        for layer in res:
            assert layer.delta_W == pytest.approx(expected, abs=1e-12) and layer.delta_b == 0.0
        assert res.mean_delta_W == pytest.approx(expected, abs=1e-12)


@pytest.mark.core
def test_distances_by_hand():
    a = {"fc.weight": np.zeros((20, 10)), "fc.bias": np.zeros(20),
         "conv.weight": np.zeros((8, 4, 3, 3))}
    b = {"fc.weight": np.full((20, 10), 0.5), "fc.bias": np.full(20, 2.0),
         "conv.weight": np.zeros((8, 4, 3, 3))}
    b["conv.weight"][:, :, 0, 0] = 1.0               # one kernel position of 9 differs
    raw = ww_core.distances(a, b)
    assert raw["fc"].delta_W == pytest.approx(0.5 * math.sqrt(200))
    assert raw["fc"].delta_b == pytest.approx(2.0 * math.sqrt(20))
    assert raw["conv"].delta_W == pytest.approx(math.sqrt(32))
    euclid = ww_core.distances(a, b, "euclidean")
    assert euclid["conv"].delta_W == pytest.approx(math.sqrt(32) / 9)   # mean over the 9 slices
    assert euclid["fc"].delta_b == 0.0
    # cka of a matrix with a multiple of itself is 1; of orthogonal supports 0
    rng = np.random.default_rng(0)
    w = rng.standard_normal((30, 12))
    assert ww_core.distances({"l.weight": w}, {"l.weight": 3 * w}, "cka")["l"].delta_W == pytest.approx(1.0)
    u, v = np.zeros((30, 12)), np.zeros((30, 12))
    u[:15], v[15:] = w[:15], w[15:]
    assert ww_core.distances({"l.weight": u}, {"l.weight": v}, "CKA")["l"].delta_W == pytest.approx(
        np.linalg.norm(u.T @ v) / math.sqrt(np.linalg.norm(u.T @ u) * np.linalg.norm(v @ v.T)))


@pytest.mark.core
def test_distances_match_layers_by_name():
    rng = np.random.default_rng(1)
    a = {"x.weight": rng.standard_normal((16, 16)), "y.weight": rng.standard_normal((16, 16)),
         "z.weight": rng.standard_normal((16, 16))}
    b = {"y.weight": a["y.weight"], "z.weight": rng.standard_normal((16, 12)),
         "w.weight": rng.standard_normal((16, 16))}
    res = ww_core.distances(a, b)
    assert res.names == ["y"] and res["y"].delta_W == 0.0
    assert res.only_in_a == ["x", "z"] and res.only_in_b == ["z", "w"]   # z: shapes differ
    with pytest.raises(ValueError, match="method must be one of"):
        ww_core.distances(a, b, "cosine")
    assert math.isnan(ww_core.distances({}, {}).mean_delta_W)


def test_distances_of_torch_modules_use_their_biases():
    import torch

    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Conv2d(8, 16, 3))
    m2 = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Conv2d(8, 16, 3))
    m2.load_state_dict(m1.state_dict())
    with torch.no_grad():
        m2[0].bias.add_(1.0)
    res = ww_core.distances(m1, m2)
    assert res["0"].delta_W == 0.0 and res["0"].delta_b == pytest.approx(8.0)   # sqrt(64)
    assert res["1"].delta_b == 0.0


# ------------------------------------------------------------------------------------------------
# the callbacks: detX reaches the history rows and can be a tracker metric
# ------------------------------------------------------------------------------------------------

def test_detx_through_the_controller():
    import torch

    from ww_callbacks import MEMORY_ONLY
    from ww_callbacks.controller import WeightWatcherController
    from ww_callbacks.trackers.base import LayerKeys, check_metrics, scalars

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    ctl = WeightWatcherController(start_fraction=0.0, every_n_steps=1, output_dir=MEMORY_ONLY,
                                  log_fn=None, detX=True)
    ctl.configure(total_steps=2)
    ctl.run(model, step=1, epoch=0)
    ctl.finish(model, step=2, epoch=0)
    rows = ctl.history.rows
    assert len(rows) >= 2 and {r["name"] for r in rows} == {"0", "2"}
    for row in rows:
        assert row["detX_num"] >= 1 and row["ERG_gap"] == row["detX_num"] - row["num_pl_spikes"]
    # opt-in tracker metrics: WandbTracker/MLflowTracker(log_metrics=[..., "ERG_gap"]) log them
    metrics = check_metrics(["ERG_gap", "detX_num"])
    keys = LayerKeys()
    out = scalars(rows, {}, keys, metrics=metrics)
    last = {r["name"]: r for r in rows}
    assert out[f"ww_ERG_gap/{keys['0']}"] == last["0"]["ERG_gap"]
    assert out[f"ww_detX_num/{keys['2']}"] == last["2"]["detX_num"]
