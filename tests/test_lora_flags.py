"""A fit on too few eigenvalues (a rank-8 LoRA update B·A) is flagged ``too-few-evals`` only:
never over-/under-trained in ``flags``, not counted or coloured as flagged in the summaries, the
local report and W&B; its ``warning`` column keeps WeightWatcher's value."""

from __future__ import annotations

import os

import numpy as np
import pytest

import ww_core
from ww_callbacks.trackers.base import is_flagged, summary_scalars
from ww_callbacks.trackers.report_html import build_data, render_report
from ww_core.metrics import layer_flags
from ww_core.result import AnalysisResult

LORA = "net.fc.lora_BA.default"


def _lora_state_dict(seed=3, r=8, out=48, n_in=40):
    """B·A of rank r with singular values 1, 2, 4, ... (alpha of the 8-value fit about 1.2)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((out, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n_in, r)))
    return {"net.fc.base_layer.weight": rng.standard_normal((out, n_in)),
            "net.fc.lora_A.default.weight": v.T,
            "net.fc.lora_B.default.weight": u * 2.0 ** np.arange(r)}


def _analyses():
    """A LoRA update (8 eigenvalues, alpha < 2) and an ordinary heavy-tailed layer (alpha < 2)."""
    lora = ww_core.analyze(_lora_state_dict(), peft=True, keep_evals=True)
    rng = np.random.default_rng(3)
    dense = rng.choice([-1, 1], size=(200, 100)) * (rng.pareto(1.0, size=(200, 100)) + 1)
    other = ww_core.analyze({"dense.weight": dense}, keep_evals=True)
    return AnalysisResult(layers=list(lora.layers) + list(other.layers))


@pytest.mark.core
def test_lora_update_is_only_too_few_evals_and_warning_keeps_weightwatchers_value():
    res = _analyses()
    lora, dense = res[LORA], res["dense"]
    assert lora.num_evals == 8 and lora.alpha < 2
    assert lora.flags == ("too-few-evals",)
    assert lora.warning == "over-trained"        # WeightWatcher 0.7.7's column, by alpha alone
    assert dense.num_evals == 100 and dense.alpha < 2 and dense.flags == ("over-trained",)
    # the rule itself: small_n never adds over-/under-trained
    for alpha in (1.5, 4.0, 7.0):
        assert layer_flags(alpha=alpha, fit_ok=True, small_n=True, collapse=0.0,
                           collapse_share=0.1, num_traps=0.0) == ["too-few-evals"]
    assert layer_flags(alpha=7.0, fit_ok=True, small_n=False, collapse=0.0, collapse_share=0.1,
                       num_traps=0.0) == ["under-trained"]


@pytest.mark.core
def test_summary_and_report_do_not_count_or_colour_it_as_flagged():
    res = _analyses()
    history = []
    for step in (10, 20):
        history += [dict(r, step=step, epoch=0, time=1.7e9 + step) for r in res.to_records()]
    rows = [r for r in history if r["step"] == 20]
    scal = summary_scalars(rows, res.summary())
    assert scal["num_over_trained"] == 1 and scal["num_under_trained"] == 0   # the dense layer
    assert scal["num_flagged"] == 1
    assert not is_flagged(res[LORA].flags) and is_flagged(res["dense"].flags)

    data = build_data(history, summaries={20: res.summary()})
    i = data["layers"].index(LORA)
    assert data["unjudged"] == [[i, 0], [i, 1]] and data["unjudged_flags"] == ["too-few-evals"]
    cols = data["summary_columns"]
    last = data["summary"][-1]
    assert last[cols.index("num_over_trained")] == 1 and last[cols.index("num_flagged")] == 1
    assert [r[-1] for r in data["latest"]] == ["too-few-evals", "over-trained"]
    page = render_report(data)
    assert "2 layers, 1 flagged" in page and "purple: too few" in page


@pytest.mark.core
def test_lora_only_run_counts_nothing_as_flagged():
    lora = ww_core.analyze(_lora_state_dict(), peft=True)
    rows = [dict(r, step=5, epoch=0) for r in lora.to_records()]
    scal = summary_scalars(rows, lora.summary())
    assert scal["num_flagged"] == 0 and scal["num_over_trained"] == 0
    assert lora.summary()["num_flagged"] == 0          # ww_core's summary: the same rule


@pytest.fixture
def wandb_env(wandb_offline):
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    yield wandb
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()


def test_wandb_offline_run_excludes_it_from_flagged_and_alerts(wandb_env, tmp_path):
    from wandb_offline import read_offline_run
    from ww_callbacks.trackers.wandb import WandbTracker

    wandb = wandb_env
    res = _analyses()
    run = wandb.init(project="ww-lora", dir=str(tmp_path))
    tracker = WandbTracker(step_metric="trainer/global_step", alert_on_flagged=True, max_images=2)
    history = []
    for step in (10, 20):
        rows = [dict(r, step=step, epoch=0) for r in res.to_records()]
        history += rows
        tracker.log_analysis(step=step, epoch=0, rows=rows, summary=res.summary(), result=res,
                             history=history)
    _, _, _, few, _ = tracker._heatmap_grid(20, history)
    assert few.tolist() == [[True, True], [False, False]]       # drawn purple, not as alpha
    tracker.close()
    run_dir = os.path.dirname(run.dir)
    run.finish()
    wandb.teardown()
    data = read_offline_run(run_dir, timeout=15)
    ww = [r for r in data["history"] if "ww/num_flagged" in r]
    assert [r["ww/num_flagged"] for r in ww] == [1, 1]              # the dense layer only
    assert [r["ww/num_over_trained"] for r in ww] == [1, 1]
    assert len(data["alerts"]) == 1                                  # one alert, for it
    assert "dense" in data["alerts"][0]["text"] and LORA not in data["alerts"][0]["text"]
