"""Pure action policies: freezing, TempBalance LR factors, early stopping, controller glue."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from ww_callbacks.actions import (
    PRESETS,
    EarlyStopAction,
    EarlyStopPolicy,
    FreezeAction,
    FreezePolicy,
    LRBalanceAction,
    LRBalancePolicy,
    mean_series_from_rows,
    relative_range,
    series_from_rows,
    tempbalance_factors,
)

pytestmark = pytest.mark.core


def L(name, alpha=3.0, flags=(), status="success", alpha_hill=None, num_evals=100):
    return SimpleNamespace(name=name, alpha=alpha, flags=tuple(flags), status=status,
                           alpha_hill=alpha if alpha_hill is None else alpha_hill,
                           num_evals=num_evals)


SETTLED = [3.02, 3.0, 3.01]


# ---------------------------------------------------------------- freeze
def test_settle_detection_uses_the_last_window_values():
    p = FreezePolicy("apply", tol=0.05, window=3, max_share=1.0)
    layers = [L("a"), L("b"), L("c"), L("head")]
    hist = {"a": [9.0, 5.0] + SETTLED,            # settled in the last 3
            "b": [3.0, 3.5, 3.0],                 # range 0.5/3.17 > 0.05
            "c": [3.0, 3.0],                      # too short for window=3
            "head": SETTLED}
    d = p.decide(hist, layers, step=10, epoch=1)
    assert d.freeze == ["a"] and d.unfreeze == []
    assert "settled" in d.reasons["a"] and p.frozen == ["a"]
    assert relative_range([1.0, math.nan]) == math.inf


def test_band_and_presets():
    assert PRESETS["weightwatcher"] == (2.0, 6.0) and set(PRESETS) >= {"vision", "nlp"}
    layers = [L("low", 1.8), L("mid", 3.5), L("high", 6.5), L("head")]
    hist = {n: [l.alpha] * 3 for n, l in zip(["low", "mid", "high", "head"], layers)}
    assert FreezePolicy("apply", band="weightwatcher", max_share=1.0, order="any").decide(
        hist, layers).freeze == ["mid"]
    assert FreezePolicy().band == (-math.inf, math.inf)        # no band test by default
    assert FreezePolicy("apply", max_share=1.0, order="any").decide(hist, layers).freeze == [
        "low", "mid", "high"]
    # the vision preset (2, 3) excludes 3.5
    def frozen(band):
        return FreezePolicy("apply", band=band, max_share=1.0, order="any").decide(hist, layers).freeze

    assert frozen("vision") == []
    assert frozen("nlp") == ["mid"]
    assert frozen((1.5, 2.0)) == ["low"]


def test_trap_rank_collapse_and_failed_fits_are_excluded():
    layers = [L("trap", flags=["correlation-trap"]), L("rc", flags=["rank-collapse"]),
              L("fail", status="failed"), L("nan", alpha=math.nan), L("ok"), L("head")]
    hist = {l.name: SETTLED for l in layers}
    d = FreezePolicy("apply", max_share=1.0, order="any").decide(hist, layers)
    assert d.freeze == ["ok"]
    # front to back (the default), the first excluded layer ends the prefix
    assert FreezePolicy("apply", max_share=1.0).decide(hist, layers).freeze == []


def test_head_and_protect_regexes():
    layers = [L("enc.0"), L("enc.1"), L("classifier")]
    hist = {l.name: SETTLED for l in layers}
    assert FreezePolicy("apply", max_share=1.0).decide(hist, layers).freeze == ["enc.0", "enc.1"]
    p = FreezePolicy("apply", max_share=1.0, protect=r"enc\.1$", protect_head=False, order="any")
    assert p.decide(hist, layers).freeze == ["enc.0", "classifier"]
    assert p.is_protected("enc.1") and not p.is_protected("classifier")


def test_max_share_caps_frozen_layers_in_model_order():
    layers = [L(f"l{i}") for i in range(10)]
    hist = {l.name: SETTLED for l in layers}
    p = FreezePolicy("apply", max_share=0.3)
    assert p.decide(hist, layers).freeze == ["l0", "l1", "l2"]
    assert p.decide(hist, layers).freeze == []           # cap reached, nothing new
    assert FreezePolicy("apply", max_share=0.0).decide(hist, layers).freeze == []


def test_unfreeze_on_drift_with_margin_and_flags():
    p = FreezePolicy("suggest", max_share=1.0, unfreeze=True, unfreeze_margin=0.5, band="weightwatcher")
    layers = [L("a"), L("b"), L("head")]
    hist = {l.name: SETTLED for l in layers}
    assert p.decide(hist, layers).freeze == ["a", "b"]
    # a drifts to 6.3 (inside the margin), b gets a trap
    d = p.decide(hist, [L("a", 6.3), L("b", flags=["correlation-trap"]), L("head")])
    assert d.unfreeze == ["b"] and "correlation-trap" in d.reasons["b"]
    d = p.decide(hist, [L("a", 6.7), L("b", flags=["correlation-trap"]), L("head")])
    assert d.unfreeze == ["a"] and "left band" in d.reasons["a"]
    assert p.frozen == []
    # without unfreeze=True nothing is ever released
    q = FreezePolicy("apply", max_share=1.0)
    q.decide(hist, layers)
    assert q.decide(hist, [L("a", 9.0), L("b"), L("head")]).unfreeze == []


def test_off_mode_decides_nothing_and_state_round_trip():
    layers = [L("a"), L("b"), L("head")]
    hist = {l.name: SETTLED for l in layers}
    off = FreezePolicy()
    assert off.mode == "off" and not off.decide(hist, layers) and off.frozen == []
    p = FreezePolicy("apply", max_share=1.0)
    p.decide(hist, layers, step=5, epoch=0)
    state = json.loads(json.dumps(p.state_dict()))
    q = FreezePolicy("apply", max_share=1.0)
    q.load_state_dict(state)
    assert q.frozen == ["a", "b"] and q.head == "head"
    assert q.decisions == [{"mode": "apply", "step": 5, "epoch": 0, "freeze": ["a", "b"],
                            "unfreeze": [], "reasons": p.decisions[0]["reasons"]}]
    assert q.decide(hist, layers).freeze == []            # nothing frozen twice


def test_prefix_order_freezes_front_to_back_only():
    layers = [L("a"), L("b", 7.0), L("c"), L("head")]       # b is out of the band
    hist = {l.name: SETTLED for l in layers}
    hist["b"] = [7.0] * 3
    assert FreezePolicy("apply", max_share=1.0, band="weightwatcher", order="any").decide(
        hist, layers).freeze == ["a", "c"]
    p = FreezePolicy("apply", max_share=1.0, band="weightwatcher")   # order="prefix" by default
    assert p.decide(hist, layers).freeze == ["a"]            # b stops the prefix
    # frozen layers are no longer analysed: the next analysis starts at b
    assert p.decide(hist, layers[1:]).freeze == []
    # band=None: the settle test alone decides, so b (7.0) freezes and c follows
    q = FreezePolicy("apply", max_share=1.0, order="prefix", band=None)
    assert q.decide(hist, layers).freeze == ["a", "b", "c"]


def test_frozen_stays_in_model_order_when_frozen_layers_are_no_longer_analysed():
    layers = [L("a"), L("b"), L("c"), L("d"), L("head")]
    hist = {l.name: SETTLED for l in layers}
    p = FreezePolicy("apply", max_share=0.2)             # one layer at a time
    assert p.decide(hist, layers).freeze == ["a"]
    p.max_share = 0.4
    assert p.decide(hist, layers[1:]).freeze == ["b"]     # a is frozen: not analysed any more
    assert p.frozen == ["a", "b"]


def test_prefix_order_passes_over_layers_too_small_to_judge():
    layers = [L("stem"), L("dw", 1.7, flags=["too-few-evals"]), L("pw"),
              L("trap", flags=["correlation-trap"]), L("late"), L("head")]
    hist = {l.name: SETTLED for l in layers}
    p = FreezePolicy("apply", max_share=1.0, order="prefix")
    d = p.decide(hist, layers)
    assert d.freeze == ["stem", "dw", "pw"]                  # dw rides along, the trap stops it
    assert "rides along" in d.reasons["dw"]


@pytest.mark.parametrize("kwargs", [dict(mode="maybe"), dict(tol=-1), dict(window=1),
                                    dict(band=(6, 2)), dict(band="audio"), dict(max_share=1.5),
                                    dict(metric="beta"), dict(protect="("), dict(order="random"),
                                    dict(order="prefix", unfreeze=True)])
def test_freeze_policy_validates(kwargs):
    with pytest.raises(ValueError):
        FreezePolicy(**kwargs)


# ---------------------------------------------------------------- TempBalance
def test_tempbalance_factors_match_np_interp_exactly():
    rng = np.random.default_rng(0)
    alphas = {f"l{i}": float(a) for i, a in enumerate(rng.uniform(1.5, 7.0, 20))}
    for s1, s2 in [(0.5, 1.5), (0.6, 1.4), (1.0, 2.0)]:
        got = tempbalance_factors(alphas, s1, s2)
        lo, hi = min(alphas.values()), max(alphas.values())
        for k, a in alphas.items():
            assert got[k] == np.interp(a, [lo, hi], [s1, s2])
        assert min(got.values()) == s1 and max(got.values()) == s2
    assert tempbalance_factors({"a": 3.0, "b": 3.0}) == {"a": 1.0, "b": 1.0}
    assert tempbalance_factors({"a": math.nan, "b": 2.0}) == {"b": 1.0}
    with pytest.raises(ValueError):
        tempbalance_factors({"a": 1.0}, s1=1.5, s2=0.5)


def test_lr_policy_tunes_like_tempbalance():
    layers = [L("stem", alpha_hill=7.0), L("b1", alpha_hill=2.0), L("small", alpha_hill=9.0,
              num_evals=27), L("b2", alpha_hill=3.0), L("b3", alpha_hill=2.5),
              L("head", alpha_hill=1.0)]
    p = LRBalancePolicy(True)
    d = p.compute(layers, step=3)
    assert d.factors == {"b1": 0.5, "b2": 1.5, "b3": 1.0}      # higher alpha -> larger LR
    assert set(d.untuned) == {"stem", "small", "head"} and d.factor("head") == 1.0
    assert LRBalancePolicy(True, metric="alpha").compute(layers).factors != {}
    keep_all = LRBalancePolicy("suggest", exclude_first=False, exclude_last=False, min_layer_evals=0)
    assert set(keep_all.compute(layers).factors) == {l.name for l in layers}
    assert not LRBalancePolicy(False).compute(layers)
    state = json.loads(json.dumps(p.state_dict()))
    q = LRBalancePolicy(True)
    q.load_state_dict(state)
    assert q.factors == d.factors and q.log[-1]["step"] == 3
    for bad in [dict(mode="yes"), dict(s1=0), dict(min_layer_evals=-1), dict(metric="x")]:
        with pytest.raises(ValueError):
            LRBalancePolicy(**bad)


# ---------------------------------------------------------------- early stop
def test_early_stop_plateau_and_lower_bound():
    p = EarlyStopPolicy(patience=2, min_delta=0.05)
    assert not p.should_stop([5.0, 4.0, 3.5])
    assert not p.should_stop([5.0, 4.0, 3.5, 3.6])              # one analysis without improving
    d = p.should_stop([5.0, 4.0, 3.5, 3.6, 3.47])               # 3.47 > 3.5 - 0.05
    assert d.stop and "not improved" in d.reason
    assert not p.should_stop([5.0, 4.0, 3.5, 3.6, 3.4])         # improved by 0.1
    d = p.should_stop([3.0, 1.95])
    assert d.stop and "over-trained" in d.reason
    assert not EarlyStopPolicy(lower_bound=None, patience=2).should_stop([3.0, 1.0])
    assert not p.should_stop([math.nan, 4.0])
    for bad in [dict(patience=0), dict(min_delta=-1), dict(patience=None, lower_bound=None)]:
        with pytest.raises(ValueError):
            EarlyStopPolicy(**bad)


# ---------------------------------------------------------------- controller glue
class FakeController:
    def __init__(self):
        self.history = SimpleNamespace(rows=[])
        self.events = []

    def add(self, step, layers):
        self.history.rows += [{"step": step, "name": l.name, "alpha": l.alpha,
                               "alpha_hill": l.alpha_hill} for l in layers]

    def log_event(self, step, kind, payload):
        self.events.append((step, kind, payload))


def test_actions_run_policies_from_the_history():
    ctl, applied, stops = FakeController(), [], []
    freeze = FreezeAction(FreezePolicy("apply", max_share=1.0),
                          apply_fn=lambda f, u: applied.append((f, u)))
    lr = LRBalanceAction(LRBalancePolicy("suggest"))
    stop = EarlyStopAction(EarlyStopPolicy(patience=2), stop_fn=stops.append)
    for step, alpha in enumerate([3.0, 3.0, 3.0, 3.0], start=1):
        layers = [L("a", alpha), L("b", alpha + 1), L("head")]
        ctl.add(step, layers)
        for action in (freeze, lr, stop):
            action.on_analysis(ctl, layers, step, 0)
    assert series_from_rows(ctl.history.rows)["a"] == [3.0] * 4
    assert mean_series_from_rows(ctl.history.rows)[-1] == pytest.approx(10 / 3)
    assert applied == [(["a", "b"], [])]
    kinds = [k for _, k, _ in ctl.events]
    assert kinds.count("freeze") == 1 and "lr-factors-suggestion" in kinds
    assert stops and "not improved" in stops[0] and stop.policy.stopped["step"] == 3
    # resume: a fresh action re-applies the frozen set
    again = []
    fresh = FreezeAction(FreezePolicy("apply", max_share=1.0), apply_fn=lambda f, u: again.append(f))
    fresh.load_state_dict(json.loads(json.dumps(freeze.state_dict())))
    fresh.reapply()
    assert again == [["a", "b"]]
    with pytest.raises(ValueError):
        FreezeAction(FreezePolicy("apply"))                     # apply without an apply_fn
