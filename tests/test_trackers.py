"""Tracker backends against the real libraries, read back from what they wrote.

* W&B: an offline run; the ``.wandb`` file is parsed with ``read_offline_run`` (LevelDB-style log
  of ``wandb.proto`` records) after ``wandb.teardown()`` (flush pitfall).
* MLflow: a sqlite store; ``MlflowClient.get_metric_history``.
* TensorBoard: event files through ``EventAccumulator``.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest

import ww_core
from ww_core.result import AnalysisResult, LayerResult


def _state_dict(seed: int):
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": rng.standard_normal((96, 48)),
        "fc2.weight": rng.standard_normal((64, 32)) @ np.diag(np.linspace(0.2, 3.0, 32)),
        "head.weight": rng.standard_normal((40, 20)),
    }


def _analyses(n: int = 3):
    """(step, epoch, result, rows, summary, history) for n real analyses of changing weights."""
    out, history = [], []
    for i in range(n):
        step = 10 * (i + 1)
        res = ww_core.analyze(_state_dict(i), keep_evals=True)
        rows = [dict(r, step=step, epoch=i) for r in res.to_records()]
        history = history + rows
        out.append((step, i, res, rows, res.summary(), list(history)))
    return out


def _feed(tracker, analyses):
    for step, epoch, res, rows, summary, history in analyses:
        tracker.log_analysis(step=step, epoch=epoch, rows=rows, summary=summary, result=res,
                             history=history)


@pytest.mark.core
def test_flat_metrics_and_nan_skipped():
    from ww_callbacks.trackers.base import flat_metrics

    layers = [LayerResult(name="a", type="dense", N=4, M=2, alpha=2.5, D=0.1),
              LayerResult(name="b", type="dense", N=4, M=2, status="failed", flags=("fit-failed",))]
    res = AnalysisResult(layers=layers)
    flat = flat_metrics(res.to_records(), res.summary())
    assert flat["ww/a/alpha"] == 2.5 and flat["ww/a/D"] == 0.1
    assert "ww/b/alpha" not in flat  # nan is not logged
    assert flat["ww/summary/num_failed"] == 1.0


# -- W&B ----------------------------------------------------------------------------------------
@pytest.fixture
def wandb_env(wandb_offline):
    # wandb_offline (conftest.py): W&B offline under tmp_path, an imported wandb torn down
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # wandb reads WANDB_DIR etc. once per process setup: start a fresh one
    yield wandb
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()


def _finish_and_read(wandb, run):
    from wandb_offline import read_offline_run

    run_dir = os.path.dirname(run.dir)  # .../offline-run-*/files -> .../offline-run-*
    run.finish()
    wandb.teardown()
    data = read_offline_run(run_dir, timeout=120)
    assert data["exited"], "no exit record in the .wandb file"
    return data, run_dir


def test_wandb_shared_run(wandb_env, tmp_path):
    from ww_callbacks.trackers.wandb import WandbTracker

    wandb = wandb_env
    run = wandb.init(project="ww-test", dir=str(tmp_path))
    # the trainer's own x-axis, as Lightning's WandbLogger declares it
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    tracker = WandbTracker(step_metric="trainer/global_step", max_images=2,
                           log_metrics=["alpha", "stable_rank"])
    assert tracker.wants_evals
    analyses = _analyses(3)
    for a in analyses:  # interleave the trainer's own rows
        step = a[0]
        run.log({"trainer/global_step": step, "train/loss": 1.0 / step})
        _feed(tracker, [a])
    assert tracker.run is run and wandb.run is run  # no second run
    tracker.close()
    run.log({"trainer/global_step": 99, "train/loss": 0.0})  # still the trainer's, not finished
    data, run_dir = _finish_and_read(wandb, run)

    ww_rows = [r for r in data["history"] if any(k.startswith("ww") for k in r)]
    assert len(ww_rows) == 3
    steps = [r["trainer/global_step"] for r in ww_rows]
    assert steps == [10, 20, 30]
    internal = [r["_step"] for r in data["history"]]
    assert internal == sorted(internal) and len(set(internal)) == len(internal)
    assert {"ww/*", "ww_alpha/*", "ww_stable_rank/*"} <= set(data["metrics"])
    for row, (step, epoch, res, rows, summary, history) in zip(ww_rows, analyses):
        exp = _expected_keyed(rows, summary)
        exp.update({f"ww_stable_rank/{i:02d}_{r['name']}": r["stable_rank"]
                    for i, r in enumerate(rows)})
        for key, value in exp.items():
            assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
        assert not any(k.startswith("ww_log_norm/") or k.startswith("ww/summary/") for k in row)
        assert row["ww/layers/_type"] == "table-file"
        assert row["ww/alpha_heatmap/_type"] == "image-file"
        assert not any("alpha_per_layer" in k for k in row)  # no growing chart any more
        # the layer table file holds the rows that were passed, all columns
        with open(os.path.join(run_dir, "files", row["ww/layers/path"])) as fh:
            table = json.load(fh)
        alpha_col = table["columns"].index("alpha")
        name_col = table["columns"].index("name")
        got = {r[name_col]: r[alpha_col] for r in table["data"]}
        assert got == pytest.approx({r["name"]: r["alpha"] for r in rows})
        assert [r[0] for r in table["data"]] == ["00_fc1", "01_fc2", "02_head"]  # layer_key
        try:
            import ww_core.plots  # noqa: F401
        except ImportError:
            continue
        assert row["ww/esd/_type"] == "images/separated" and row["ww/esd/count"] == 2
        for name in row["ww/esd/filenames"]:
            assert os.path.exists(os.path.join(run_dir, "files", name))


def test_wandb_no_run_and_open_run(wandb_env, tmp_path):
    from ww_callbacks.trackers.wandb import WandbTracker

    wandb = wandb_env
    assert wandb.run is None
    a = _analyses(2)
    with pytest.raises(RuntimeError, match="no W&B run"):
        _feed(WandbTracker(), a[:1])
    tracker = WandbTracker(open_run=True, project="ww-own", step_metric="step",
                           log_esd_images=False, init_kwargs={"dir": str(tmp_path)})
    assert not tracker.wants_evals
    _feed(tracker, a)
    run = tracker.run
    run_dir = os.path.dirname(run.dir)
    assert run_dir.startswith(str(tmp_path))
    tracker.close()  # owns it: finishes it
    assert wandb.run is None
    wandb.teardown()
    from wandb_offline import read_offline_run

    data = read_offline_run(run_dir, timeout=120)
    assert data["exited"]
    rows = [r for r in data["history"] if "ww/alpha_mean" in r]
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[1]["ww_alpha/01_fc2"] == pytest.approx(a[1][3][1]["alpha"])
    assert data["metrics"]["ww/*"] == "step"
    assert not any(k.startswith("ww/esd/") for r in rows for k in r)


# -- MLflow -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    pytest.importorskip("mlflow")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    d = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{d}/mlflow.db", d


def test_mlflow_sanitize():
    pytest.importorskip("mlflow")
    from mlflow.utils.validation import _validate_metric_name

    from ww_callbacks.trackers.mlflow import sanitize_metric_key

    assert sanitize_metric_key("ww/encoder.layer.0.attention.self.query/alpha") == \
        "ww/encoder.layer.0.attention.self.query/alpha"
    for key in ("ww/a:b[0](x)/alpha", "ww//../x/alpha", "ww/./alpha", "ww/" + "x" * 400 + "/a",
                "ww/ü-é/alpha"):
        _validate_metric_name(sanitize_metric_key(key))
    assert sanitize_metric_key("ww/a:b[0]/alpha") == "ww/a_b_0_/alpha"
    for key in ("ww_alpha/03_encoder_layer_0_attention_self_query", "ww/alpha_mean",
                "ww/event/lr-factors-suggestion"):  # the tracker's own keys pass unchanged
        assert sanitize_metric_key(key) == key


def _expected_keyed(rows, summary):
    """MLflow/TensorBoard scalars of one analysis of ``_state_dict``: alpha per layer under
    ``ww_alpha/<NN>_<layer>`` (model order) and the summary section ``ww/<key>``."""
    exp = {f"ww_alpha/{i:02d}_{r['name']}": float(r["alpha"]) for i, r in enumerate(rows)
           if r["alpha"] is not None and math.isfinite(float(r["alpha"]))}
    alphas = list(exp.values())
    exp.update({"ww/alpha_mean": sum(alphas) / len(alphas), "ww/alpha_min": min(alphas),
                "ww/alpha_max": max(alphas), "ww/log_norm_mean": summary["log_norm"],
                "ww/num_layers": summary["num_layers"], "ww/num_flagged": summary["num_flagged"]})
    return exp


FREEZE_FC1 = {"freeze": ["fc1"], "unfreeze": [], "reasons": {"fc1": "alpha settled"}}


def test_mlflow_own_run(mlflow_store):
    from mlflow import MlflowClient

    from ww_callbacks.trackers.mlflow import MLflowTracker

    uri, d = mlflow_store
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # SQLAlchemy `noload`
        tracker = MLflowTracker(tracking_uri=uri, experiment_name="ww-test")
        analyses = _analyses(3)
        _feed(tracker, analyses)
        tracker.log_event(step=30, kind="freeze", payload=FREEZE_FC1)
        tracker.close()
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        keys = set(run.data.metrics)
        for step, epoch, res, rows, summary, history in analyses:
            assert set(_expected_keyed(rows, summary)) <= keys
        assert not any(k.startswith("ww_") and not k.startswith("ww_alpha/") for k in keys)
        for key in ("ww_alpha/00_fc1", "ww_alpha/02_head", "ww/alpha_mean", "ww/num_layers"):
            hist = client.get_metric_history(tracker.run_id, key)
            assert [m.step for m in hist] == [10, 20, 30]
            assert [m.value for m in hist] == pytest.approx(
                [_expected_keyed(a[3], a[4])[key] for a in analyses], rel=1e-12)
        assert [m.value for m in client.get_metric_history(tracker.run_id, "ww/event/freeze")] == [1.0]
        arts = {f.path for f in client.list_artifacts(tracker.run_id, "ww")}
        assert arts == {"ww/layers.json", "ww/layers.csv", "ww/decisions.json"}
        local = client.download_artifacts(tracker.run_id, "ww/layers.json", str(d / "dl"))
        with open(local) as fh:
            table = json.load(fh)
        assert table["step"] == 30
        assert [r["key"] for r in table["layers"]] == ["00_fc1", "01_fc2", "02_head"]
        assert [r["alpha"] for r in table["layers"]] == pytest.approx([r["alpha"] for r in analyses[-1][3]])
        local = client.download_artifacts(tracker.run_id, "ww/decisions.json", str(d / "dl"))
        with open(local) as fh:
            dec = json.load(fh)
        (row,) = [dict(zip(dec["columns"], r)) for r in dec["data"]]
        assert row["step"] == 30 and row["layer"] == "fc1" and row["action"] == "freeze"
        assert row["reason"] == "alpha settled"
        assert row["alpha"] == pytest.approx(analyses[-1][3][0]["alpha"], rel=1e-9)


def test_mlflow_active_run_not_ended(mlflow_store, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from ww_callbacks.trackers.mlflow import MLflowTracker

    uri, d = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = MlflowClient(tracking_uri=uri)
        exp_id = client.create_experiment("ww-trainer", artifact_location=str(d / "trainer-art"))
        with mlflow.start_run(experiment_id=exp_id) as active:  # HF's MLflowCallback does this
            tracker = MLflowTracker()
            _feed(tracker, _analyses(2))
            assert tracker.run_id == active.info.run_id
            tracker.close()
            assert mlflow.active_run() is not None
            assert client.get_run(active.info.run_id).info.status == "RUNNING"
        hist = client.get_metric_history(active.info.run_id, "ww_alpha/01_fc2")
        assert [m.step for m in hist] == [10, 20]
        # Lightning style: MLFlowLogger.experiment (a client) + run_id passed in
        run = client.create_run(exp_id)
        tracker = MLflowTracker(client, run.info.run_id)
        _feed(tracker, _analyses(1))
        tracker.close()
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "ww_alpha/00_fc1")] == [10]


# -- TensorBoard --------------------------------------------------------------------------------
def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    out = {}
    for tag in ea.Tags()["scalars"]:
        out[tag] = [(e.step, e.value) for e in ea.Scalars(tag)]
    for tag in ea.Tags()["tensors"]:  # tensor-based scalars (tensorboard's own Writer)
        events = ea.Tensors(tag)
        arrays = [tensor_util.make_ndarray(e.tensor_proto) for e in events]
        if all(a.shape == () and a.dtype.kind == "f" for a in arrays):
            out[tag] = [(e.step, float(a)) for e, a in zip(events, arrays)]
    return out


@pytest.mark.parametrize("backend", ["torch", "tensorboard"])
def test_tensorboard_own_writer(tmp_path, backend):
    pytest.importorskip("tensorboard")
    if backend == "torch":
        pytest.importorskip("torch")
    from ww_callbacks.trackers.tensorboard import TensorBoardTracker

    tracker = TensorBoardTracker(log_dir=str(tmp_path / "tb"), backend=backend)
    analyses = _analyses(3)
    _feed(tracker, analyses)
    tracker.log_event(step=30, kind="freeze", payload=FREEZE_FC1)
    tracker.close()
    got = _scalars(tmp_path / "tb")
    for i, (step, epoch, res, rows, summary, history) in enumerate(analyses):
        for key, value in _expected_keyed(rows, summary).items():
            assert got[key][i][0] == step
            assert got[key][i][1] == pytest.approx(value, rel=1e-6)  # stored as float32
    assert [s for s, _ in got["ww_alpha/00_fc1"]] == [10, 20, 30]
    assert got["ww/event/freeze"] == [(30, 1.0)]
    assert {k.split("/")[0] for k in got} == {"ww", "ww_alpha"}


def test_tensorboard_trainer_writer_not_closed(tmp_path):
    pytest.importorskip("tensorboard")
    torch_tb = pytest.importorskip("torch.utils.tensorboard")
    from ww_callbacks.trackers.tensorboard import TensorBoardTracker

    writer = torch_tb.SummaryWriter(log_dir=str(tmp_path / "tb"))
    tracker = TensorBoardTracker(writer)
    _feed(tracker, _analyses(2))
    tracker.close()
    writer.add_scalar("train/loss", 0.5, 21)  # the trainer's writer still works
    writer.close()
    got = _scalars(tmp_path / "tb")
    assert [s for s, _ in got["ww_alpha/02_head"]] == [10, 20]
    assert got["train/loss"] == [(21, 0.5)]
