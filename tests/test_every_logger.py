"""Every logger gets something: Lightning's other loggers, EarlyStopping on a ww key, Keras
``logs``, the per-analysis line by default, and a small checkpoint state on a 100-layer model."""

import csv
import glob
import json
import os

import pytest

from helpers import keras_classifier, lightning_classifier

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from ww_callbacks.lightning import WeightWatcherCallback  # noqa: E402

pytestmark = pytest.mark.slow


def _trainer(tmp_path, callbacks, **kw):
    kw.setdefault("logger", False)
    return pl.Trainer(default_root_dir=str(tmp_path), callbacks=callbacks, max_epochs=kw.pop("epochs", 4),
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def test_csv_logger_gets_the_summary_scalars(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    cb = WeightWatcherCallback(every_n_epochs=1, start_fraction=0.0, async_analysis=False)
    logger = CSVLogger(str(tmp_path / "csv"), name="run")
    _trainer(tmp_path, [cb], logger=logger, enable_checkpointing=False).fit(*lightning_classifier())
    assert "MetricsLoggerTracker" in [type(t).__name__ for t in cb.controller.trackers]
    with open(os.path.join(logger.log_dir, "metrics.csv")) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("ww/alpha_mean")]
    assert [int(r["step"]) for r in rows] == cb.history.steps
    by_step = {}
    for r in cb.history.rows:
        by_step.setdefault(r["step"], []).append(r["alpha"])
    for r in rows:
        alphas = [a for a in by_step[int(r["step"])] if a == a]
        assert float(r["ww/alpha_mean"]) == pytest.approx(sum(alphas) / len(alphas), rel=1e-6)
        assert float(r["ww/num_layers"]) == 4          # the 16x4 head has too few eigenvalues


def test_early_stopping_on_a_ww_key_waits_for_the_first_analysis(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    cb = WeightWatcherCallback(every_n_epochs=1, start_fraction=0.5, async_analysis=False)
    stop = EarlyStopping(monitor="ww/alpha_mean", mode="min", patience=3)   # strict by default
    trainer = _trainer(tmp_path, [cb, stop], epochs=6, enable_checkpointing=False)
    trainer.fit(*lightning_classifier())                  # no analysis in the first 3 epochs: no crash
    assert trainer.current_epoch == 6 and cb.history.steps[0] == 6
    assert float(trainer.callback_metrics["ww/alpha_mean"]) == pytest.approx(
        cb.controller.last_scalars["alpha_mean"], rel=1e-6)
    assert stop.best_score is not None and torch.isfinite(stop.best_score)
    assert stop.strict          # lenient during the fit only: the user's setting is given back


def test_the_per_analysis_line_is_visible_by_default(tmp_path, caplog):
    cb = WeightWatcherCallback(every_n_epochs=1, start_fraction=0.0, async_analysis=False)
    with caplog.at_level("INFO"):
        _trainer(tmp_path, [cb], epochs=2, enable_checkpointing=False).fit(*lightning_classifier())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ww step")]
    assert len(lines) == 2 and "mean alpha" in lines[0]
    # ... through Lightning's own logger, which has a console handler by default
    assert all(r.name.split(".")[0] in ("lightning", "pytorch_lightning") for r in caplog.records
               if r.getMessage().startswith("ww step"))


def test_checkpoint_state_of_a_100_layer_model_is_small(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = WeightWatcherCallback(every_n_steps=1, start_fraction=0.0, async_analysis=False,
                               freeze="suggest", min_evals=8)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _trainer(tmp_path, [cb, ckpt], epochs=7).fit(*lightning_classifier(depth=100))
    assert len(cb.history.steps) == 14 and len({r["name"] for r in cb.history.rows}) == 100
    state = torch.load(str(tmp_path / "ckpt" / "last.ckpt"), weights_only=False)["callbacks"]
    (ours,) = [v for k, v in state.items() if k.startswith("WeightWatcherCallback")]
    assert len(json.dumps(ours)) <= 45_000     # README: 36 KB at 120 layers; +25%
    # the default folder is per run, under the trainer's root, and the state points into it
    (folder,) = glob.glob(str(tmp_path / "ww-output" / "*"))
    assert ours["history"]["output_dir"] == folder == cb.controller.output_dir
    assert os.path.exists(os.path.join(folder, "history.jsonl"))


def test_keras_writes_its_values_into_logs(tmp_path, capsys):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.config.backend() != "torch":  # pragma: no cover
        pytest.skip("Keras on the torch backend only here")
    from ww_callbacks.keras import WeightWatcherCallback as KerasCallback

    model, x, y = keras_classifier(keras)
    cb = KerasCallback(every_n_epochs=1, start_fraction=0.0, async_analysis=False,
                       output_dir=str(tmp_path / "ww"))
    log = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    hist = model.fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=[cb, log])
    assert len(hist.history["ww/alpha_mean"]) == 3
    assert hist.history["ww/alpha_mean"][-1] == pytest.approx(cb.controller.last_scalars["alpha_mean"])
    with open(tmp_path / "log.csv") as fh:
        assert "ww/alpha_mean" in next(csv.reader(fh))
    out = capsys.readouterr().out
    assert out.count("ww step") >= 3 and "mean alpha" in out     # Keras' console, by default
