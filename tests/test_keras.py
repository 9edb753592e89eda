"""The Keras 3 adapter with real fits and a W&B offline run read back (any backend: torch in py311,
JAX and TensorFlow in ``tox -e keras-jax`` / ``keras-tf``)."""

from __future__ import annotations

import json
import os

# KERAS_BACKEND (default torch) and a temporary KERAS_HOME are set by conftest.py / tox, before
# keras is imported.
import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")

import ww_core  # noqa: E402
from helpers import TRACKER_TIMEOUT  # noqa: E402
from ww_callbacks.history import read_jsonl  # noqa: E402
from ww_callbacks.keras import WeightWatcherCallback  # noqa: E402
from ww_callbacks.trackers.base import LayerKeys  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*__array__ implementation.*:DeprecationWarning")]

N, D, C, BS = 256, 32, 8, 32  # 8 steps per epoch


@pytest.fixture(autouse=True)
def _env(wandb_offline):
    """W&B offline under tmp_path, started afresh (conftest.py)."""


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype("float32")
    y = (x @ rng.standard_normal((D, C))).argmax(1)
    return x, y


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(64, activation="relu", name="d0"),
                              keras.layers.Dense(48, activation="relu", name="d1"),
                              keras.layers.Dense(C, name="head")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _steps(rows):
    return sorted({r["step"] for r in rows})


def test_epoch_schedule_with_wandb(tmp_path):
    wandb = pytest.importorskip("wandb")
    from wandb_offline import read_offline_run

    x, y = _data()
    model = _model()
    run = wandb.init(project="ww-keras-test", mode="offline", dir=str(tmp_path))
    run_dir = os.path.dirname(run.dir)
    ww = WeightWatcherCallback(start_fraction=0.5, every_n_epochs=1, output_dir=str(tmp_path / "ww"),
                               async_analysis=False,  # exact steps asserted below
                               tracker_timeout=TRACKER_TIMEOUT)  # cold backends: slow, not hung
    model.fit(x, y, epochs=4, batch_size=BS, verbose=0, callbacks=[ww])
    assert [type(t).__name__ for t in ww.controller.trackers] == ["WandbTracker", "LocalTracker"]
    assert _steps(ww.history.rows) == [16, 24, 32]  # epochs 2..4; the final one is the last
    assert {r["epoch"] for r in ww.history.rows} == {1, 2, 3}
    final = ww_core.analyze(model)
    assert len(final.layers) == 3
    run.finish()
    wandb.teardown()
    data = read_offline_run(run_dir, timeout=120)
    assert data["exited"]
    rows = [r for r in data["history"] if "ww/alpha_mean" in r]
    assert [r["global_step"] for r in rows] == [16, 24, 32]
    assert [r["_step"] for r in rows] == sorted(r["_step"] for r in rows)
    keys = LayerKeys()
    keys.update(layer.name for layer in final.layers)
    for layer in final.layers:
        assert rows[-1][f"ww_alpha/{keys[layer.name]}"] == pytest.approx(layer.alpha, rel=1e-9)
    assert rows[-1]["ww/log_norm_mean"] == pytest.approx(final.summary()["log_norm"], rel=1e-9)
    assert rows[-1]["ww/layers/nrows"] == 3
    state = json.load(open(tmp_path / "ww" / "ww_state.json"))
    assert state["states"][-1]["last_step"] == 32     # the run folder's state, one per analysis


def test_step_schedule_and_resume(tmp_path):
    x, y = _data()
    model = _model()
    out = str(tmp_path / "ww")
    kw = dict(start_fraction=0.0, every_n_steps=4, output_dir=out, trackers=None, async_analysis=False)
    ww = WeightWatcherCallback(**kw)
    model.fit(x, y, epochs=2, batch_size=BS, verbose=0, callbacks=[ww])
    assert _steps(ww.history.rows) == [4, 8, 12, 16]

    # a new process would build a new callback on the same output_dir: the history continues
    ww2 = WeightWatcherCallback(**kw)
    model.fit(x, y, epochs=4, initial_epoch=2, batch_size=BS, verbose=0, callbacks=[ww2])
    assert _steps(ww2.history.rows) == [4, 8, 12, 16, 20, 24, 28, 32]
    file_steps = [r["step"] for r in read_jsonl(os.path.join(out, "history.jsonl"))]
    assert file_steps == [r["step"] for r in ww2.history.rows]
    assert len(file_steps) == 8 * 3  # no duplicates (3 layers per analysis)
    final = ww_core.analyze(model)
    last = {r["name"]: r["alpha"] for r in ww2.history.rows if r["step"] == 32}
    assert last == pytest.approx({l.name: l.alpha for l in final.layers})

    # restarting from an earlier epoch (a run that went further than its checkpoint) redoes
    # the steps after it instead of duplicating them
    ww3 = WeightWatcherCallback(**kw)
    model.fit(x, y, epochs=3, initial_epoch=1, batch_size=BS, verbose=0, callbacks=[ww3])
    rows = read_jsonl(os.path.join(out, "history.jsonl"))
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert _steps(rows) == [4, 8, 12, 16, 20, 24]
    assert len(rows) == 6 * 3

    # initial_epoch=0 on the same folder starts a fresh record
    ww4 = WeightWatcherCallback(start_fraction=1.0, output_dir=out, trackers=None)
    model.fit(x, y, epochs=1, batch_size=BS, verbose=0, callbacks=[ww4])
    assert _steps(read_jsonl(os.path.join(out, "history.jsonl"))) == [8]


def test_named_trackers_without_a_run_write_under_output_dir(tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow import MlflowClient

    x, y = _data()
    out = tmp_path / "ww"
    ww = WeightWatcherCallback(start_fraction=0.0, every_n_epochs=1, output_dir=str(out),
                               trackers=["mlflow", "tensorboard"], async_analysis=False,
                               tracker_timeout=TRACKER_TIMEOUT)  # the store is created cold
    _model().fit(x, y, epochs=2, batch_size=BS, verbose=0, callbacks=[ww])
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    client = MlflowClient(tracking_uri="sqlite:///" + str(out / "mlflow.db"))
    (exp,) = [e for e in client.search_experiments() if e.name == "ww-callbacks"]
    (run,) = client.search_runs([exp.experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "ww/alpha_mean")]
    assert steps == [8, 16]
