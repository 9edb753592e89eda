"""``ww_callbacks.drift``: each analysis of a run compared with a reference (the pretrained model
or a saved analysis), as tracker scalars."""

import math

import numpy as np
import pytest

import ww_core
from helpers import heavy_tailed
from ww_callbacks.drift import DriftMonitor, DriftReport

pytestmark = pytest.mark.core


def _pretrained(seed=0):
    rng = np.random.default_rng(seed)
    return {"enc.fc1.weight": heavy_tailed(rng, (240, 120)),
            "enc.fc2.weight": heavy_tailed(rng, (300, 150)),
            "head.weight": heavy_tailed(rng, (160, 80))}


def _randomised(sd, key):
    out = dict(sd)
    r = np.random.default_rng(1).standard_normal(sd[key].shape)
    out[key] = (r * np.linalg.norm(sd[key]) / np.linalg.norm(r)).astype(np.float32)
    return out


def test_no_drift_on_the_reference_itself():
    sd = _pretrained()
    report = DriftMonitor(sd).measure(ww_core.analyze(sd))
    s = report.scalars()
    assert s["drift_newly_flagged"] == 0 and s["drift_regressions"] == 0 and s["drift_compared"] == 3
    assert s["drift_max_abs_delta_alpha"] == 0.0 and s["drift_max_spectrum_change"] == 0.0
    assert set(s) == {"drift_newly_flagged", "drift_max_abs_delta_alpha", "drift_max_spectrum_change",
                      "drift_regressions", "drift_compared", "drift_delta_alpha_weighted"}


def test_a_damaged_layer_shows_up():
    sd = _pretrained()
    monitor = DriftMonitor(sd)
    report = monitor.measure(ww_core.analyze(_randomised(sd, "enc.fc2.weight")))
    assert report.newly_flagged == ["enc.fc2"] and report.regressions == ["enc.fc2"]
    assert report.max_delta_alpha_layer == "enc.fc2" and report.max_abs_delta_alpha > 1
    assert report.to_dict()["newly_flagged"] == ["enc.fc2"]
    assert report.scalars(prefix="ref_")["ref_newly_flagged"] == 1


def test_reference_from_a_saved_analysis_and_a_partial_analysis(tmp_path):
    sd = _pretrained()
    ww_core.analyze(sd).save(tmp_path / "pretrained.json")
    monitor = DriftMonitor(str(tmp_path / "pretrained.json"))
    report = monitor.measure(ww_core.analyze(sd, layers="enc"))      # a rotation's subset
    assert report.compared == 2 and report.not_analysed == 1 and report.regressions == []


def test_a_live_model_is_measured_when_the_monitor_is_made():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(120, 240), torch.nn.ReLU(), torch.nn.Linear(240, 64))
    with torch.no_grad():
        for i, layer in enumerate((model[0], model[2])):
            shape = tuple(layer.weight.shape)
            layer.weight.copy_(torch.from_numpy(heavy_tailed(np.random.default_rng(i), shape)))
    monitor = DriftMonitor(model)
    with torch.no_grad():
        w = model[0].weight
        w.copy_(torch.randn(w.shape) * (w.norm() / math.sqrt(w.numel())))   # training damages it
    report = monitor.measure(ww_core.analyze(model))
    assert "0" in report.regressions and "2" not in report.regressions


def test_an_empty_report_is_nan_not_zero():
    report = DriftReport()
    assert math.isnan(report.scalars()["drift_max_abs_delta_alpha"])
    assert report.to_dict()["max_abs_delta_alpha"] is None


def test_the_controller_logs_drift_against_a_reference(tmp_path):
    """``reference=`` on the controller (and so on every callback): drift keys in the summary
    scalars, and a ``drift`` decision naming only the damaged layer."""
    import json

    from ww_callbacks.controller import WeightWatcherController
    from ww_callbacks.trackers.base import decision_rows

    sd = _pretrained()
    ctl = WeightWatcherController(start_fraction=0.0, every_n_steps=1, reference=dict(sd),
                                  output_dir=str(tmp_path / "ww"), trackers=None, log_fn=None,
                                  async_analysis=False)
    ctl.configure(total_steps=4, current_step=0)
    ctl.run(sd, step=1, epoch=0)
    assert ctl.last_scalars["drift_regressions"] == 0 and ctl.last_scalars["drift_newly_flagged"] == 0
    ctl.run(_randomised(sd, "enc.fc2.weight"), step=2, epoch=0)
    assert ctl.last_scalars["drift_regressions"] == 1 and ctl.last_scalars["drift_max_abs_delta_alpha"] > 1
    ctl.close()
    lines = [json.loads(x) for x in (tmp_path / "ww" / "decisions.jsonl").read_text().splitlines()]
    drift = [d for d in lines if d.get("kind") == "drift"]
    assert len(drift) == 1 and drift[0]["step"] == 2
    rows = decision_rows(2, "drift", drift[0]["payload"])
    assert [(r["layer"], r["action"]) for r in rows] == [("enc.fc2", "drift")]
    with pytest.raises(FileNotFoundError):
        WeightWatcherController(reference=str(tmp_path / "missing.json"), output_dir=str(tmp_path / "x"))
