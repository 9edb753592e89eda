"""MLflow and TensorBoard at the size of a real model: 110 layers, 12 analyses, decisions.

The trackers are driven directly (as the controller does) with rows of ``ww_core.analyze`` on a
dict of small numpy matrices, then read back from what the backends stored:

* MLflow: ``MlflowClient`` run metrics and ``get_metric_history``; the ``ww/layers.json`` and
  ``ww/decisions.json`` artifacts downloaded.
* TensorBoard: ``EventAccumulator`` scalars and the ``ww/layers`` / ``ww/decisions`` text.

Asserted: the number of distinct ``ww`` keys stays within ``layers + 40``, every layer's alpha
is under ``ww_alpha/`` with keys that sort in model order, and a freeze decision reads back with
its step, layer, action, reason and alpha.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest

import ww_core
from ww_callbacks.trackers.base import SUMMARY_KEYS

pytestmark = pytest.mark.filterwarnings("ignore:.*``noload`` loader strategy is deprecated.*")

N_LAYERS = 110
N_ANALYSES = 12
PARTS = ("attn.in_proj:q", "mlp.fc1", "mlp.fc2", "mlp.gate-up", "norm.proj")  # odd characters too


def _state_dict(seed: int):
    rng = np.random.default_rng(seed)
    return {f"blocks.{i // len(PARTS)}.{PARTS[i % len(PARTS)]}.weight":
            rng.standard_normal((32, 16)) * (1.0 + 0.02 * seed) for i in range(N_LAYERS)}


@pytest.fixture(scope="module")
def analyses():
    """``(step, epoch, result, rows, summary, history)`` for 12 analyses of 110 layers."""
    out, history = [], []
    for i in range(N_ANALYSES):
        step = 10 * (i + 1)
        res = ww_core.analyze(_state_dict(i))
        rows = [dict(r, step=step, epoch=i) for r in res.to_records()]
        history = history + rows
        summary = dict(res.summary(), hook_seconds=0.01, analysis_seconds=0.1, num_frozen=min(i, 2),
                       overhead=0.02, drift_newly_flagged=0, drift_regressions=0,
                       drift_max_abs_delta_alpha=0.1 * i, drift_max_spectrum_change=0.01 * i,
                       drift_delta_alpha_weighted=0.0)
        out.append((step, i, res, rows, summary, list(history)))
    assert len(out[0][3]) == N_LAYERS
    return out


def _expected_keys(rows):
    """The layer key of each row, built here from the documented rule (not with ``LayerKeys``)."""
    return {r["name"]: f"{i:03d}_" + re.sub(r"[^A-Za-z0-9_]+", "_", r["name"]).strip("_")
            for i, r in enumerate(rows)}


FREEZE_AT, FREEZE_LAYER = 60, "blocks.3.mlp.fc1"
EVENTS = {
    60: [("freeze", {"freeze": [FREEZE_LAYER], "unfreeze": [],
                     "reasons": {FREEZE_LAYER: "alpha settled (|d alpha| < 0.05 for 3 analyses)"}}),
         ("lr-factors-suggestion", {"factors": {"blocks.0.mlp.fc1": 0.8, "blocks.0.mlp.fc2": 1.2}})],
    120: [("early-stop", {"reason": "alpha plateau"})],
}


def _feed(tracker, analyses):
    """Every analysis, and the events of ``EVENTS`` after the analysis of their step."""
    for step, epoch, res, rows, summary, history in analyses:
        tracker.log_analysis(step=step, epoch=epoch, rows=rows, summary=summary, result=res,
                             history=history)
        for kind, payload in EVENTS.get(step, ()):
            tracker.log_event(step=step, kind=kind, payload=payload)


def _alpha_at(analyses, step, name):
    (rows,) = [a[3] for a in analyses if a[0] == step]
    return next(r["alpha"] for r in rows if r["name"] == name)


def _check_keys(keys, analyses):
    """Key count bounded, every layer under ``ww_alpha/`` in model order, the summary section."""
    rows = analyses[0][3]
    ww = {k for k in keys if k.startswith("ww")}
    assert len(ww) <= N_LAYERS + 40, len(ww)
    alpha = sorted(k for k in ww if k.startswith("ww_alpha/"))
    want = _expected_keys(rows)
    assert alpha == sorted(f"ww_alpha/{want[r['name']]}" for r in rows if r["alpha"] == r["alpha"])
    assert alpha == [f"ww_alpha/{want[r['name']]}" for r in rows if r["alpha"] == r["alpha"]]
    assert len(alpha) >= N_LAYERS - 5
    assert {f"ww/{k}" for k in SUMMARY_KEYS} <= ww
    assert {"ww/event/freeze", "ww/event/early-stop"} <= ww
    assert ww <= set(alpha) | {f"ww/{k}" for k in SUMMARY_KEYS} | {
        f"ww/event/{kind}" for events in EVENTS.values() for kind, _ in events}
    return want


def _check_decisions(decisions, analyses, rel=1e-12):
    """``decisions``: dicts of the decisions table, in the order they were logged."""
    freeze = [d for d in decisions if d["action"] == "freeze"]
    assert freeze == [{"step": FREEZE_AT, "layer": FREEZE_LAYER, "action": "freeze",
                       "reason": EVENTS[FREEZE_AT][0][1]["reasons"][FREEZE_LAYER],
                       "alpha": pytest.approx(_alpha_at(analyses, FREEZE_AT, FREEZE_LAYER), rel=rel),
                       "factor": None}]
    lr = [d for d in decisions if d["action"] == "lr-factor (suggested)"]
    assert [(d["step"], d["layer"], d["factor"]) for d in lr] == [
        (60, "blocks.0.mlp.fc1", pytest.approx(0.8)), (60, "blocks.0.mlp.fc2", pytest.approx(1.2))]
    stop = [d for d in decisions if d["action"] == "early-stop"]
    assert [(d["step"], d["layer"], d["reason"]) for d in stop] == [(120, None, "alpha plateau")]
    assert len(decisions) == 4


# -- MLflow -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mlflow_many_layers_keys_tables_decisions(tmp_path, analyses):
    pytest.importorskip("mlflow")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    from ww_callbacks.trackers.mlflow import MLflowTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # SQLAlchemy `noload`
        tracker = MLflowTracker(tracking_uri=uri, experiment_name="ww-scale")
        _feed(tracker, analyses)
        tracker.close()
        client = MlflowClient(tracking_uri=uri)
        run_id = tracker.run_id
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        want = _check_keys(set(run.data.metrics), analyses)
        assert dict(tracker.layer_keys.items()) == want

        # every layer's alpha at every step, exact doubles
        steps = [a[0] for a in analyses]
        for name, key in want.items():
            values = [next(r["alpha"] for r in a[3] if r["name"] == name) for a in analyses]
            if values[0] != values[0]:
                continue
            hist = client.get_metric_history(run_id, f"ww_alpha/{key}")
            assert [(m.step, m.value) for m in hist] == list(zip(steps, values)), name
        hist = client.get_metric_history(run_id, "ww/alpha_mean")
        assert [m.step for m in hist] == steps
        finite = [r["alpha"] for r in analyses[-1][3] if r["alpha"] == r["alpha"]]
        assert hist[-1].value == pytest.approx(sum(finite) / len(finite), rel=1e-12)
        assert [m.value for m in client.get_metric_history(run_id, "ww/num_layers")] == [N_LAYERS] * 12
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "ww/event/freeze")] == [
            (60, 1.0)]

        # artifacts: the latest layer table (every column + the key), the decisions table
        arts = {f.path for f in client.list_artifacts(run_id, "ww")}
        assert arts == {"ww/layers.json", "ww/layers.csv", "ww/decisions.json"}
        with open(client.download_artifacts(run_id, "ww/layers.json", str(tmp_path / "dl"))) as fh:
            table = json.load(fh)
        assert table["step"] == 120
        assert [(r["name"], r["key"]) for r in table["layers"]] == list(want.items())
        assert set(ww_core.result.COLUMNS) <= set(table["layers"][0])
        with open(client.download_artifacts(run_id, "ww/decisions.json", str(tmp_path / "dl"))) as fh:
            dec = json.load(fh)
        assert dec["columns"] == ["step", "layer", "action", "reason", "alpha", "factor"]
        # (log_table writes with pandas' default 10 significant digits)
        _check_decisions([dict(zip(dec["columns"], row)) for row in dec["data"]], analyses, rel=1e-9)
        # log_table registers the file as a table of the run (MLflow's artifact/evaluation view)
        tagged = json.loads(run.data.tags.get("mlflow.loggedArtifacts", "[]"))
        assert {"path": "ww/decisions.json", "type": "table"} in tagged


def test_mlflow_decisions_without_pandas(tmp_path, analyses, monkeypatch):
    """mlflow-skinny has no pandas (``log_table`` needs it): the whole table is re-written."""
    import sys

    pytest.importorskip("mlflow")
    from ww_callbacks.trackers.mlflow import MLflowTracker

    class Client:
        def __init__(self):
            self.texts = {}

        def log_text(self, run_id, text, path):
            self.texts[path] = text

        def log_batch(self, run_id, metrics, synchronous=True):
            pass

    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    client = Client()
    tracker = MLflowTracker(client, "run")
    _feed(tracker, analyses[:6] + analyses[-1:])
    dec = json.loads(client.texts["ww/decisions.json"])
    _check_decisions([dict(zip(dec["columns"], row)) for row in dec["data"]], analyses)


# -- TensorBoard --------------------------------------------------------------------------------
def _read_tb(logdir):
    """``(scalars {tag: [(step, value)]}, texts {tag: [(step, markdown)]})`` of the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    texts = {}
    for tag in ea.Tags()["tensors"]:
        events = ea.Tensors(tag)
        arrays = [tensor_util.make_ndarray(e.tensor_proto) for e in events]
        if all(a.shape == () and a.dtype.kind == "f" for a in arrays):  # tensorboard's Writer
            scalars[tag] = [(e.step, float(a)) for e, a in zip(events, arrays)]
        elif all(a.dtype.kind in "OSU" for a in arrays):
            texts[tag.removesuffix("/text_summary")] = [
                (e.step, a.reshape(-1)[0].decode(errors="replace")) for e, a in zip(events, arrays)]
    return scalars, texts


def _parse_markdown(md):
    """A markdown table back into dicts of strings."""
    lines = [line.strip() for line in md.strip().splitlines()]
    split = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
             for line in lines]
    return [dict(zip(split[0], cells)) for cells in split[2:]]


def test_tensorboard_many_layers_keys_tables_decisions(tmp_path, analyses):
    pytest.importorskip("tensorboard")
    pytest.importorskip("torch")
    from ww_callbacks.trackers.tensorboard import TensorBoardTracker

    tracker = TensorBoardTracker(log_dir=str(tmp_path / "tb"), backend="torch")
    _feed(tracker, analyses)
    tracker.close()
    scalars, texts = _read_tb(tmp_path / "tb")
    want = _check_keys(set(scalars), analyses)

    steps = [a[0] for a in analyses]
    for name, key in want.items():
        values = [next(r["alpha"] for r in a[3] if r["name"] == name) for a in analyses]
        if values[0] == values[0]:
            got = scalars[f"ww_alpha/{key}"]
            assert [s for s, _ in got] == steps, name
            assert [v for _, v in got] == pytest.approx(values, rel=1e-6), name  # float32 on disk
    assert [s for s, _ in scalars["ww/alpha_median"]] == steps
    assert scalars["ww/event/freeze"] == [(60, 1.0)]
    assert scalars["ww/event/lr-factors-suggestion"] == [(60, 2.0)]
    # an own writer's custom-scalars layout: one chart of every layer's alpha, by tag regex
    assert "ww_alpha/.*" in texts["custom_scalars__config__"][0][1]

    # the layer table of every analysis: key, name and every column
    assert [s for s, _ in texts["ww/layers"]] == steps
    layers = _parse_markdown(texts["ww/layers"][-1][1])
    assert [(r["name"], r["key"]) for r in layers] == list(want.items())
    assert set(ww_core.result.COLUMNS) <= set(layers[0])
    assert float(layers[7]["alpha"]) == pytest.approx(analyses[-1][3][7]["alpha"], rel=1e-3)

    # decisions: one text per event step
    assert [s for s, _ in texts["ww/decisions"]] == [60, 60, 120]
    decisions = [r for _, md in texts["ww/decisions"] for r in _parse_markdown(md)]
    for d in decisions:
        d["step"] = int(d["step"])
        d["layer"] = d["layer"] or None
        d["alpha"] = float(d["alpha"]) if d["alpha"] else None
        d["factor"] = float(d["factor"]) if d["factor"] else None
    _check_decisions(decisions, analyses, rel=1e-3)  # 4 significant digits in the text


def test_tensorboard_opt_in_metrics(tmp_path, analyses):
    pytest.importorskip("tensorboard")
    from ww_callbacks.trackers.tensorboard import TensorBoardTracker

    with pytest.raises(ValueError, match="alpah"):
        TensorBoardTracker(log_dir=str(tmp_path / "x"), log_metrics=("alpah",))
    tracker = TensorBoardTracker(log_dir=str(tmp_path / "tb"), backend="tensorboard",
                                 log_metrics=("alpha", "stable_rank"))
    _feed(tracker, analyses[:2])
    tracker.close()
    scalars, _ = _read_tb(tmp_path / "tb")
    want = _expected_keys(analyses[0][3])
    name = analyses[0][3][4]["name"]
    assert scalars[f"ww_stable_rank/{want[name]}"][0] == (
        10, pytest.approx(analyses[0][3][4]["stable_rank"], rel=1e-6))
    sections = {k.split("/")[0] for k in scalars}
    assert sections == {"ww", "ww_alpha", "ww_stable_rank"}
