"""README "What you see": the summary scalars reach a Lightning logger other than CSVLogger
(DVCLive's ``DVCLiveLogger``) and the Keras callbacks listed after ours (``CSVLogger``,
``EarlyStopping(monitor="ww/...")``), read back from what those wrote.

Each test runs a real (small, CPU) ``fit``.
"""

import csv
import json
import math
import os
import statistics

import pytest

from helpers import keras_classifier, lightning_classifier
from ww_callbacks.trackers.base import SUMMARY_KEYS

pytestmark = pytest.mark.slow

#: The summary keys that do not depend on actions (``num_frozen`` needs ``freeze``).
VALUE_KEYS = ("alpha_mean", "alpha_median", "alpha_min", "alpha_max", "log_norm_mean", "num_layers",
              "num_flagged", "num_under_trained", "num_over_trained")


def _fitted(r):
    """Whether a history row is a successful fit (``LayerResult.ok``)."""
    return r["status"] == "success" and r["alpha"] is not None and math.isfinite(r["alpha"])


def _flags(r):
    flags = r["flags"]
    return [f for f in flags.split(",") if f] if isinstance(flags, str) else list(flags or ())


def _expected_by_step(rows, key="step"):
    """The summary values recomputed from the per-layer history rows of each analysis.

    ``log_norm_mean`` is ``AnalysisResult.summary()["log_norm"]``: the mean over the successful
    fits only (README "Reading the numbers"), like the alpha statistics.
    """
    grouped = {}
    for r in rows:
        grouped.setdefault(r[key], []).append(r)
    out = {}
    for k, layer_rows in grouped.items():
        alphas = [r["alpha"] for r in layer_rows if _fitted(r)]
        norms = [r["log_norm"] for r in layer_rows if _fitted(r) and math.isfinite(r["log_norm"])]
        out[k] = {"alpha_mean": statistics.fmean(alphas), "alpha_median": statistics.median(alphas),
                  "alpha_min": min(alphas), "alpha_max": max(alphas),
                  "log_norm_mean": statistics.fmean(norms), "num_layers": len(layer_rows),
                  # a layer flagged only too-few-evals could not be judged: not counted
                  "num_flagged": sum(1 for r in layer_rows if set(_flags(r)) - {"too-few-evals"}),
                  "num_under_trained": sum(1 for r in layer_rows if "under-trained" in _flags(r)),
                  "num_over_trained": sum(1 for r in layer_rows if "over-trained" in _flags(r))}
    return out


# ----------------------------------------------------------------------------------- DVCLive


def _lightning_module():
    pytest.importorskip("torch")
    pl = pytest.importorskip("lightning.pytorch")
    module, loader = lightning_classifier(depth=3, width=16, seed=0)
    return pl, module, loader


def _read_tsv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.mark.parametrize("async_analysis", [False, "auto"])
def test_dvclive_lightning_logger_gets_the_summary_scalars(tmp_path, monkeypatch, async_analysis):
    pytest.importorskip("dvclive")
    from dvclive.lightning import DVCLiveLogger

    from ww_callbacks.lightning import WeightWatcherCallback

    # Outside its test mode, DVCLive runs `dvc init` at the root of the git repository around
    # the working directory (dvclive.dvc.get_dvc_repo): DVCLIVE_TEST skips the repository (its
    # paths, absolute here, stay under tmp_path); work outside the checkout anyway, offline
    monkeypatch.setenv("DVCLIVE_TEST", "true")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_STUDIO_OFFLINE", "true")
    for var in ("DVC_STUDIO_TOKEN", "STUDIO_TOKEN", "DVC_ROOT", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    pl, module, loader = _lightning_module()
    live_dir = tmp_path / "dvclive"
    logger = DVCLiveLogger(dir=str(live_dir), save_dvc_exp=False, dvcyaml=str(tmp_path / "dvc.yaml"),
                           report=None)
    cb = WeightWatcherCallback(every_n_epochs=1, start_fraction=0.0, async_analysis=async_analysis,
                               output_dir=str(tmp_path / "ww"))
    trainer = pl.Trainer(default_root_dir=str(tmp_path), callbacks=[cb], logger=logger, max_epochs=4,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, loader)

    assert "MetricsLoggerTracker" in [type(t).__name__ for t in cb.controller.trackers]
    steps = cb.history.steps
    assert steps and (async_analysis or steps == [2, 4, 6, 8])       # 2 batches per epoch
    expected = _expected_by_step(cb.history.rows)
    # DVCLive: one <plots>/metrics/<name>.tsv per metric, one row per log_metrics call
    metrics_dir = live_dir / "plots" / "metrics" / "ww"
    logged = {p[:-len(".tsv")] for p in os.listdir(metrics_dir)}
    assert set(VALUE_KEYS) <= logged <= set(SUMMARY_KEYS)
    for key in VALUE_KEYS:
        rows = _read_tsv(metrics_dir / f"{key}.tsv")
        assert [int(r["step"]) for r in rows] == steps, key
        for r in rows:
            assert float(r[key]) == pytest.approx(expected[int(r["step"])][key], rel=1e-9), (key, r)
    # ... and the latest value of each in DVCLive's summary, metrics.json
    with open(live_dir / "metrics.json") as fh:
        summary = json.load(fh)["ww"]
    for key in VALUE_KEYS:
        assert summary[key] == pytest.approx(expected[steps[-1]][key], rel=1e-9), key
    assert summary["alpha_mean"] == pytest.approx(cb.controller.last_scalars["alpha_mean"], rel=1e-12)
    assert not (tmp_path / ".dvc").exists() and not os.path.exists(".dvc")


# ----------------------------------------------------------------------------------- Keras


def _keras_fit(tmp_path, ww_kwargs, extra_callbacks, epochs, before=None):
    """``fit`` with our callback, then ``extra_callbacks`` (each ``make(keras)``); ``before(keras,
    callback)`` gives callbacks listed ahead of ours."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.config.backend() != "torch":  # pragma: no cover - the py311 env runs Keras on torch
        pytest.skip("Keras on the torch backend only here")
    from ww_callbacks.keras import WeightWatcherCallback

    model, x, y = keras_classifier(keras)
    cb = WeightWatcherCallback(output_dir=str(tmp_path / "ww"), trackers=None, **ww_kwargs)
    callbacks = [cb] + [make(keras) for make in extra_callbacks]
    ahead = before(keras, cb) if before else []
    hist = model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, callbacks=ahead + callbacks)
    return cb, callbacks[1:], hist


def _csv_logger(path):
    return lambda keras: keras.callbacks.CSVLogger(str(path))


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_keras_csvlogger_and_early_stopping_after_the_callback_read_ww_values(tmp_path):
    log_path = tmp_path / "log.csv"
    # min_delta so large that nothing after the first value counts as an improvement: with
    # patience=1, EarlyStopping stops the 10-epoch fit after epoch 1 only if it sees the metric
    stopper = lambda keras: keras.callbacks.EarlyStopping(  # noqa: E731
        monitor="ww/alpha_mean", mode="min", min_delta=1e9, patience=1)
    cb, (log, stop), hist = _keras_fit(
        tmp_path, dict(every_n_epochs=1, start_fraction=0.0, async_analysis=False),
        [_csv_logger(log_path), stopper], epochs=10)

    expected = _expected_by_step(cb.history.rows, key="epoch")
    assert hist.epoch == [0, 1] and stop.stopped_epoch == 1
    assert sorted(expected) == [0, 1]
    assert stop.best == pytest.approx(expected[0]["alpha_mean"], rel=1e-9)
    assert stop.best == hist.history["ww/alpha_mean"][0]

    # start_fraction=0, async_analysis=False: the end of epoch 0 is analysed before CSVLogger
    # fixes its columns, so its file has them, each row the analysis of its own epoch end
    rows = _read_csv(log_path)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert [float(r["ww/analysis_step"]) for r in rows] == [4, 8] == hist.history["ww/analysis_step"]
    for key in VALUE_KEYS:
        column = f"ww/{key}"
        assert column in rows[0], f"{column} missing from the CSVLogger header {sorted(rows[0])}"
        for r in rows:
            assert float(r[column]) == pytest.approx(expected[int(r["epoch"])][key], rel=1e-9), (key, r)
            assert float(r[column]) == pytest.approx(hist.history[column][int(r["epoch"])], rel=1e-12)


def _check_history(hist, cb, steps_per_epoch=4):
    """History's ``ww/`` lists: one value per epoch from the first finished analysis on (the keys
    are absent before it), each the latest analysis finished by then (``ww/analysis_step``).
    Returns ``{epoch: analysis step}``."""
    expected = _expected_by_step(cb.history.rows)
    steps = hist.history.get("ww/analysis_step", [])
    epochs = hist.epoch[len(hist.epoch) - len(steps):]
    by_epoch = dict(zip(epochs, steps))
    assert steps == sorted(steps)
    for i, (epoch, step) in enumerate(by_epoch.items()):
        assert step <= (epoch + 1) * steps_per_epoch, (epoch, step)     # never an analysis to come
        for key in VALUE_KEYS:
            values = hist.history[f"ww/{key}"]
            assert len(values) == len(steps), key
            assert values[i] == pytest.approx(expected[step][key], rel=1e-9), (key, epoch, step)
    return by_epoch


def _no_ww_columns(rows):
    return not any(k.startswith("ww/") for k in rows[0])


def test_keras_history_gets_ww_values_from_the_first_analysis_on(tmp_path):
    log_path = tmp_path / "log.csv"
    cb, _, hist = _keras_fit(tmp_path, dict(every_n_epochs=1, async_analysis=False),
                             [_csv_logger(log_path)], epochs=6)
    assert cb.history.steps == [12, 16, 20, 24]          # analyses did run (epochs 2 to 5: 12 >= 24/2)
    # no placeholder before the first analysis: History has the keys from epoch 2 on, each
    # epoch end's own analysis (synchronous)
    assert _check_history(hist, cb) == {2: 12, 3: 16, 4: 20, 5: 24}
    # CSVLogger fixed its columns at the end of epoch 0, before any analysis: no ww/ column
    # (README: the callback's own history.csv holds every analysis then)
    rows = _read_csv(log_path)
    assert [int(r["epoch"]) for r in rows] == list(range(6)) and _no_ww_columns(rows), sorted(rows[0])


@pytest.mark.filterwarnings("ignore:Early stopping conditioned on metric:UserWarning")   # epochs 0, 1
def test_keras_early_stopping_waits_for_the_first_analysis(tmp_path):
    # default start_fraction: the first analysis at epoch 2 (step 12 of 24). Before it the key is
    # absent and EarlyStopping waits (no start_from_epoch needed); with patience=1 and min_delta so
    # large that only the first value improves, the fit stops at epoch 3, one epoch after it
    stopper = lambda keras: keras.callbacks.EarlyStopping(  # noqa: E731
        monitor="ww/alpha_mean", mode="min", min_delta=1e9, patience=1)
    cb, (stop,), hist = _keras_fit(tmp_path, dict(every_n_epochs=1, async_analysis=False),
                                   [stopper], epochs=6)
    assert hist.epoch == [0, 1, 2, 3] and stop.stopped_epoch == 3
    assert cb.history.steps == [12, 16]
    assert stop.best == pytest.approx(_expected_by_step(cb.history.rows)[12]["alpha_mean"], rel=1e-9)
    assert _check_history(hist, cb) == {2: 12, 3: 16}


def test_keras_csvlogger_has_no_ww_columns_with_the_default_settings(tmp_path):
    log_path = tmp_path / "log.csv"
    cb, _, hist = _keras_fit(tmp_path, {}, [_csv_logger(log_path)], epochs=6)
    assert cb.controller.asynchronous and cb.history.steps
    # README: with the default start_fraction (and background analysis) the first epoch end has
    # no analysis, so CSVLogger's columns have no ww/ key; the callback's history.csv has them all
    rows = _read_csv(log_path)
    assert len(rows) == 6 and _no_ww_columns(rows), sorted(rows[0])
    assert cb.history.csv_path == os.path.join(str(tmp_path / "ww"), "history.csv")
    with open(cb.history.csv_path, newline="") as fh:
        assert sorted({int(r["step"]) for r in csv.DictReader(fh)}) == cb.history.steps
    # History: the latest finished analysis, once there is one (never one started at this epoch end)
    for epoch, step in _check_history(hist, cb).items():
        assert step < (epoch + 1) * 4, (epoch, step)


def test_keras_logs_carry_the_latest_finished_background_analysis(tmp_path):
    """With the background analysis, the logs of epoch e hold the latest analysis finished by
    then, here (made deterministic by waiting for it before our callback runs) epoch e-1's."""

    def wait_for_the_analysis(keras, ww):
        class WaitForTheAnalysis(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                ww.controller.poll(wait=True)       # records the analysis of the previous epoch

        return [WaitForTheAnalysis()]

    cb, _, hist = _keras_fit(tmp_path, dict(every_n_epochs=1, start_fraction=0.0, async_analysis=True),
                             [], epochs=4, before=wait_for_the_analysis)
    assert cb.controller.asynchronous and cb.history.steps == [4, 8, 12, 16]
    # epoch 0: nothing finished yet, so no key; then each epoch the previous epoch end's analysis
    assert _check_history(hist, cb) == {1: 4, 2: 8, 3: 12}
