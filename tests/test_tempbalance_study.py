"""Smoke test of ``benchmarks/tempbalance_study.py``: one tiny epoch per TempBalance config.

Checks what the study relies on: the ResNet's Conv2d layers are analysed, TempBalance tunes the
expected 12 of them with factors spread over [0.5, 1.5], and those factors (or, for the control,
a permutation of them) are the ones in force in the optimizer's named param groups.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")
pytest.importorskip("sklearn")

pytestmark = pytest.mark.slow

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
UNTUNED = {"net.stem.0", "net.stages.2.short.0", "net.stages.4.short.0", "net.head"}


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("tempbalance_study",
                                                  os.path.join(BENCH, "tempbalance_study.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(study):
    d = study.digits_images(per_class=3, size=16)         # 30 training images: one batch
    d["test_all"], d["test"] = d["test"], tuple(t[:64] for t in d["test"])   # cheap evaluation
    return d


def test_split_is_stratified_and_disjoint(data):
    (_, ytr), (_, yte) = data["train"], data["test_all"]
    assert torch.bincount(ytr, minlength=10).tolist() == [3] * 10
    assert len(ytr) + len(yte) == 1797
    assert data["train"][0].shape[1:] == (1, 16, 16)


def test_balance_lr_tunes_convs_and_factors_reach_optimizer(study, data, tmp_path):
    r = study.run_one("balance_lr", 0, data, str(tmp_path), epochs=1)
    convs = ["net." + n for n, m in study.ResNet().named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(convs) == 16 and r["analysed"] == convs          # 15 Conv2d + head, model order
    assert r["analyses"] == 1 and r["tuned"] == 12
    assert set(r["untuned"]) == UNTUNED
    tb = r["tb_factors"]
    assert set(tb) == set(convs) - UNTUNED
    assert min(tb.values()) == pytest.approx(0.5) and max(tb.values()) == pytest.approx(1.5)
    assert len(set(tb.values())) > 2
    applied = r["final_factors"]
    assert set(applied) == set(convs)
    for name in convs:
        assert applied[name] == pytest.approx(tb.get(name, 1.0), abs=1e-3), name


def test_shuffled_control_applies_a_permutation(study, data, tmp_path):
    r = study.run_one("balance_lr_shuffled", 0, data, str(tmp_path), epochs=1)
    tb, applied = r["tb_factors"], r["final_factors"]
    assert r["tuned"] == 12 and set(tb) == set(r["analysed"]) - UNTUNED
    assert sorted(applied[n] for n in tb) == pytest.approx(sorted(tb.values()), abs=1e-3)
    assert all(applied[n] == pytest.approx(1.0) for n in UNTUNED)
