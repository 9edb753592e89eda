"""Trackers behind real trainers, read back from what the backends stored.

* Lightning ``TensorBoardLogger`` + ``MLFlowLogger``: the callback logs into the trainer's own
  writer and run; the event files (``EventAccumulator``) and the MLflow store
  (``get_metric_history``) hold exactly the callback's history, at its steps.
* ``trackers=["tensorboard"]`` without a trainer logger: the tracker's own event files, read back.
* Hugging Face ``report_to="mlflow"``: the ww metrics land in the run HF's ``MLflowCallback``
  opened, next to HF's own metrics.
* A tracker that cannot be created (its backend module does not import) and a real backend that
  fails at its first analysis (MLflow on an unusable store): training finishes, the error is
  reported once through ``log_fn``, the local record has every analysis.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest

from helpers import TRACKER_TIMEOUT

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*``noload`` loader strategy is deprecated.*"),
              pytest.mark.filterwarnings("ignore:.*is deprecated.*:FutureWarning")]


@pytest.fixture(autouse=True)
def _fresh_mlflow_uri():
    """Lightning's MLFlowLogger and HF's MLflowCallback set MLflow's process-wide tracking URI
    (and ``MLFLOW_TRACKING_URI``); start and leave each test without one."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)


# -- shared helpers -------------------------------------------------------------------------------
def _tb_scalars(logdir):
    """``{tag: [(step, value), ...]}`` of every scalar in the event files under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def _expected(history, metric="alpha"):
    """``{layer: [(step, value), ...]}`` of the finite ``metric`` values in the callback's history."""
    out = {}
    for row in history.rows:
        value = row.get(metric)
        if value is not None and value == value:
            out.setdefault(row["name"], []).append((row["step"], float(value)))
    return out


def _summary_alpha(history):
    """``[(step, mean alpha over the finite fits)]``, as ``AnalysisResult.summary()`` computes it."""
    out = []
    for step in history.steps:
        alphas = [r["alpha"] for r in history.rows_at(step) if r["alpha"] == r["alpha"]]
        out.append((step, sum(alphas) / len(alphas)))
    return out


def _lightning():
    pytest.importorskip("lightning")
    from lightning.pytorch import Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Model(BoringModel):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Sequential(
                torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48), torch.nn.ReLU(),
                torch.nn.Linear(48, 2))

        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            self.log("train_loss", out["loss"], on_step=False, on_epoch=True)  # the trainer's own
            return out

    return Trainer, Model


def _fit(tmp_path, callback, logger=False, max_epochs=3):
    Trainer, Model = _lightning()
    trainer = Trainer(default_root_dir=str(tmp_path), callbacks=[callback], logger=logger,
                      max_epochs=max_epochs, limit_train_batches=4, limit_val_batches=1,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # SQLAlchemy inside MLflow
        trainer.fit(Model())
    return trainer


def _callback(tmp_path, **kw):
    from ww_callbacks.lightning import WeightWatcherCallback

    kw.setdefault("start_fraction", 0.0)
    kw.setdefault("every_n_epochs", 1)
    kw.setdefault("output_dir", str(tmp_path / "ww"))
    kw.setdefault("async_analysis", False)  # exact steps asserted
    kw.setdefault("tracker_timeout", TRACKER_TIMEOUT)  # a cold backend is slow, not hung
    return WeightWatcherCallback(**kw)


def _layer_keys(history):
    """The trackers' ``ww_alpha/<key>`` segments: model order of the first analysis."""
    from ww_callbacks.trackers.base import LayerKeys

    keys = LayerKeys()
    keys.update(r["name"] for r in history.rows_at(history.steps[0]))
    return keys


def _assert_scalars_match(got, history, rel):
    expected = _expected(history)
    assert expected, "no finite alpha in the history"
    keys = _layer_keys(history)
    assert sorted(k for k in got if k.startswith("ww_alpha/")) == [
        f"ww_alpha/{keys[n]}" for n in expected]  # one key per layer, sorted = model order
    for name, points in expected.items():
        series = got[f"ww_alpha/{keys[name]}"]
        assert [s for s, _ in series] == [s for s, _ in points], name
        assert [v for _, v in series] == pytest.approx([v for _, v in points], rel=rel), name
    summary = got["ww/alpha_mean"]
    want = _summary_alpha(history)
    assert [s for s, _ in summary] == [s for s, _ in want]
    assert [v for _, v in summary] == pytest.approx([v for _, v in want], rel=rel)


# -- Lightning loggers ----------------------------------------------------------------------------
def test_lightning_tensorboard_and_mlflow_loggers_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    pytest.importorskip("lightning")
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tb = TensorBoardLogger(str(tmp_path / "tb"), name="run")
    mlf = MLFlowLogger(experiment_name="ww-lightning", tracking_uri=uri,
                       artifact_location=str(tmp_path / "mlartifacts"))
    cb = _callback(tmp_path)
    trainer = _fit(tmp_path, cb, logger=[tb, mlf])
    assert trainer.state.finished
    names = sorted(type(t).__name__ for t in cb.controller.trackers)
    assert names == ["LocalTracker", "MLflowTracker", "TensorBoardTracker"]
    assert cb.history.steps == [4, 8, 12]

    # TensorBoard: the logger's own directory, next to Lightning's scalars (float32 on disk)
    got = _tb_scalars(tb.log_dir)
    assert [s for s, _ in got["train_loss"]] == [3, 7, 11]  # Lightning's own, same event files
    _assert_scalars_match(got, cb.history, rel=1e-6)

    # MLflow: the logger's run (not a second one), exact doubles
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([mlf.experiment_id])
    assert run.info.run_id == mlf.run_id
    assert "train_loss" in run.data.metrics
    got = {key: [(m.step, m.value) for m in client.get_metric_history(mlf.run_id, key)]
           for key in run.data.metrics if key.startswith("ww")}
    _assert_scalars_match(got, cb.history, rel=1e-12)


def test_own_tensorboard_tracker_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    cb = _callback(tmp_path, trackers=["tensorboard", "local"])
    _fit(tmp_path, cb, max_epochs=2)
    assert cb.history.steps == [4, 8]
    logdir = tmp_path / "ww" / "tensorboard"
    assert list(logdir.rglob("events.out.tfevents.*"))
    _assert_scalars_match(_tb_scalars(logdir), cb.history, rel=1e-6)
    assert os.path.exists(tmp_path / "ww" / "report.html")


# -- Hugging Face report_to="mlflow" -------------------------------------------------------------
def test_huggingface_report_to_mlflow_read_back(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    mlflow = pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from ww_callbacks.huggingface import WeightWatcherCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ww-hf")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = MlflowClient(tracking_uri=uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # artifacts (our layer table) under tmp_path, not in the working directory
        exp_id = client.create_experiment("ww-hf", artifact_location=str(tmp_path / "mlartifacts"))

    seq, vocab = 16, 64

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            start = torch.randint(0, vocab, (16, 1), generator=g)
            stride = torch.randint(1, 4, (16, 1), generator=g)
            self.ids = (start + stride * torch.arange(seq)) % vocab

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=32, n_layer=2, n_head=2,
                                  n_inner=64, bos_token_id=0, eos_token_id=0)
    ww = WeightWatcherCallback(start_fraction=0.0, every_n_epochs=1, output_dir=str(tmp_path / "ww"),
                               async_analysis=False, tracker_timeout=TRACKER_TIMEOUT)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_train_epochs=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="mlflow", use_cpu=True,
        disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(cfg), args=args,
                                   train_dataset=Tokens(), callbacks=[ww])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            trainer.train()  # 16 samples / 4 = 4 steps per epoch, 8 steps
    finally:
        if mlflow.active_run() is not None:
            mlflow.end_run()
    assert "MLflowTracker" in {type(t).__name__ for t in ww.controller.trackers}
    assert ww.history.steps == [4, 8]

    (run,) = client.search_runs([exp_id])  # HF's run; no second run was opened
    assert "loss" in run.data.metrics  # HF's own metrics share the run
    expected = _expected(ww.history)
    assert len(expected) >= 4
    keys = _layer_keys(ww.history)
    for name, points in expected.items():
        hist = client.get_metric_history(run.info.run_id, f"ww_alpha/{keys[name]}")
        assert [(m.step, m.value) for m in hist] == [(s, pytest.approx(v, rel=1e-12)) for s, v in points]
    summary = client.get_metric_history(run.info.run_id, "ww/alpha_mean")
    assert [m.step for m in summary] == [4, 8]
    assert [m.value for m in summary] == pytest.approx([v for _, v in _summary_alpha(ww.history)],
                                                       rel=1e-12)


# -- failing trackers -----------------------------------------------------------------------------
def test_tracker_that_cannot_be_created(tmp_path, monkeypatch):
    """A tracker name whose backend module does not import (as when its library is missing)."""
    from ww_callbacks.history import read_jsonl
    from ww_callbacks.trackers import TRACKERS

    monkeypatch.setitem(TRACKERS, "broken", ("ww_callbacks.trackers._no_such_backend", "Broken"))
    lines = []
    cb = _callback(tmp_path, trackers=["broken", "local"], log_fn=lines.append)
    trainer = _fit(tmp_path, cb)
    assert trainer.state.finished
    assert cb.history.steps == [4, 8, 12]
    assert [type(t).__name__ for t in cb.controller.trackers] == ["LocalTracker"]
    assert sum("_no_such_backend" in line for line in lines) == 1, lines
    disk = read_jsonl(str(tmp_path / "ww" / "history.jsonl"))
    assert sorted({r["step"] for r in disk}) == [4, 8, 12]
    assert os.path.exists(tmp_path / "ww" / "report.html")


def test_real_backend_failing_at_first_analysis(tmp_path):
    """MLflow on a store it cannot create: fails at the first analysis, is reported once and
    disabled; the other analyses and the local record carry on."""
    pytest.importorskip("mlflow")
    from ww_callbacks.history import read_jsonl
    from ww_callbacks.trackers.mlflow import MLflowTracker

    (tmp_path / "not-a-directory").write_text("a file where the store's folder should be")
    broken = MLflowTracker(tracking_uri=f"sqlite:///{tmp_path / 'not-a-directory' / 'mlflow.db'}")
    lines = []
    cb = _callback(tmp_path, trackers=[broken, "local"], log_fn=lines.append)
    trainer = _fit(tmp_path, cb)
    assert trainer.state.finished
    assert cb.history.steps == [4, 8, 12]
    assert broken not in cb.controller.trackers
    assert sum("not-a-directory" in line for line in lines) == 1, lines
    disk = read_jsonl(str(tmp_path / "ww" / "history.jsonl"))
    assert [(r["step"], r["name"]) for r in disk] == [(r["step"], r["name"]) for r in cb.history.rows]
    assert os.path.exists(tmp_path / "ww" / "report.html")
