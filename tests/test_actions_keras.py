"""freeze / balance_lr / early_stop in real Keras 3 fits (any backend: torch, JAX, TensorFlow; CPU,
tiny MLP)."""

from __future__ import annotations

import json

# KERAS_BACKEND (default torch) and a temporary KERAS_HOME are set by conftest.py / tox, before
# keras is imported.
import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")

from helpers import LOOSE_FREEZE as LOOSE  # noqa: E402
from helpers import events_tracker as Events
from ww_callbacks import EarlyStop, Freeze  # noqa: E402
from ww_callbacks.actions import tempbalance_factors  # noqa: E402
from ww_callbacks.keras import WeightWatcherCallback  # noqa: E402
from ww_callbacks.keras_utils import is_frozen  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*__array__ implementation.*:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

N, D, C, BS = 128, 32, 8, 32          # 4 steps per epoch
LAYERS = ["d0", "d1", "d2", "d3", "head"]


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype("float32")
    y = (x @ rng.standard_normal((D, C))).argmax(1)
    return x, y


def _model(opt):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((D,))]
                             + [keras.layers.Dense(64, activation="relu", name=f"d{i}") for i in range(4)]
                             + [keras.layers.Dense(C, name="head")], name="mlp")
    model.compile(opt, "sparse_categorical_crossentropy")
    return model


def _ww(tmp_path, **kw):
    kw.setdefault("start_fraction", 0.0)
    kw.setdefault("every_n_steps", 2)
    kw.setdefault("async_analysis", False)
    kw.setdefault("trackers", None)
    return WeightWatcherCallback(output_dir=str(tmp_path / "ww"), **kw)


def _numpy(w):
    return np.array(keras.ops.convert_to_numpy(w.value))


def _kernels(model):
    return {l.name: [_numpy(w) for w in l.weights] for l in model.layers}


def _frozen(model):
    """``{layer: frozen}`` (JAX masks the updates and keeps ``trainable``: see keras_utils)."""
    return {l.name: is_frozen(model, l.name) for l in model.layers}


class Snapshot:
    def __init__(self):
        self.model, self.at = None, {}

    def on_analysis(self, controller, result, step, epoch):
        for layer in self.model.layers:
            if is_frozen(self.model, layer.name) and layer.name not in self.at:
                self.at[layer.name] = (step, [_numpy(w) for w in layer.weights])


@pytest.mark.parametrize("make_opt", [
    lambda: keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=0.01),
    lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
], ids=["sgd-momentum-wd", "adamw-wd"])
def test_freeze_apply_keeps_frozen_weights_bit_identical(tmp_path, make_opt):
    x, y = _data()
    model = _model(make_opt())
    snap, events = Snapshot(), Events()
    snap.model = model
    cb = _ww(tmp_path, freeze=Freeze.apply(**LOOSE), actions=[snap], trackers=[events])
    hist = model.fit(x, y, batch_size=BS, epochs=3, callbacks=[cb], verbose=0)
    assert len(hist.history["loss"]) == 3
    assert cb.frozen_layers == ["mlp.d0", "mlp.d1"]          # floor(0.5 * 5) = 2, front first
    assert {n: s for n, (s, _) in snap.at.items()} == {"d0": 4, "d1": 4}
    now = _kernels(model)
    for name, (_, ws) in snap.at.items():
        assert all(np.array_equal(a, b) for a, b in zip(now[name], ws)), name
    assert not any(_frozen(model)[n] for n in ("d2", "d3", "head"))
    assert [(s, k) for s, k, _ in events.events] == [(4, "freeze")]
    json.dumps(cb.state_dict())


def test_freeze_resume_keeps_layers_frozen_and_decisions(tmp_path):
    x, y = _data()
    model = _model(keras.optimizers.AdamW(0.01, weight_decay=0.1))
    cb = _ww(tmp_path, freeze=Freeze.apply(**LOOSE))
    model.fit(x, y, batch_size=BS, epochs=2, callbacks=[cb], verbose=0)
    weights = str(tmp_path / "m.weights.h5")
    model.save_weights(weights)
    saved = _kernels(model)["d0"]

    seen = {}

    class Probe(keras.callbacks.Callback):
        # before the first batch of the resumed fit (the callback re-freezes when it learns
        # initial_epoch, at the first on_epoch_begin; it runs before this probe)
        def on_epoch_begin(self, epoch, logs=None):
            seen.setdefault("frozen", _frozen(self.model))

    model2 = _model(keras.optimizers.AdamW(0.01, weight_decay=0.1))
    model2.load_weights(weights)
    cb2 = _ww(tmp_path, freeze=Freeze.apply(**LOOSE))
    hist = model2.fit(x, y, batch_size=BS, epochs=4, initial_epoch=2, callbacks=[cb2, Probe()],
                      verbose=0)
    assert len(hist.history["loss"]) == 2
    assert seen["frozen"] == {"d0": True, "d1": True, "d2": False, "d3": False, "head": False}
    assert all(np.array_equal(a, b) for a, b in zip(_kernels(model2)["d0"], saved))
    assert cb2.frozen_layers == ["mlp.d0", "mlp.d1"]
    assert cb2.action_set.freeze_policy.decisions[0]["step"] == 4


def test_balance_lr_scales_updates_under_a_schedule_and_survives_resume(tmp_path):
    x, y = _data()
    sched = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.9)
    model = _model(keras.optimizers.SGD(sched))
    events = Events()
    cb = _ww(tmp_path, balance_lr=True, trackers=[events])
    model.fit(x, y, batch_size=BS, epochs=2, callbacks=[cb], verbose=0)
    rows = {r["name"]: r for r in cb.history.rows_at(cb.history.steps[-1])}
    tuned = ["mlp.d1", "mlp.d2", "mlp.d3"]          # not first, not last (head: 8 eigenvalues)
    expect = tempbalance_factors({n: rows[n]["alpha_hill"] for n in tuned})
    assert cb.lr_factors == pytest.approx(expect)
    assert cb.lr_scaler.installed and cb.lr_scaler.factors == pytest.approx(expect)
    assert [k for _, k, _ in events.events] == ["lr-factors"] * len(cb.history.steps)

    # the next step moves each tuned layer by factor x the scheduled step, the others by 1 x
    before = _kernels(model)
    it = int(model.optimizer.iterations.numpy())
    model.train_on_batch(x[:BS], y[:BS])
    scaled = _kernels(model)
    for layer in model.layers:
        for w, b in zip(layer.weights, before[layer.name]):
            w.assign(b)
    model.optimizer.iterations.assign(it)
    cb.lr_scaler.uninstall()
    model.train_on_batch(x[:BS], y[:BS])
    plain = _kernels(model)
    for name in LAYERS:
        f = expect.get(f"mlp.{name}", 1.0)
        for s, p, b in zip(scaled[name], plain[name], before[name]):
            np.testing.assert_allclose(s - b, f * (p - b), rtol=1e-4, atol=1e-7)

    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):     # before the first resumed batch
            seen.setdefault("installed", "apply" in vars(self.model.optimizer))
            seen.setdefault("factors", dict(cb2.lr_scaler.factors))

    model2 = _model(keras.optimizers.SGD(sched))
    cb2 = _ww(tmp_path, balance_lr=True)
    model2.fit(x, y, batch_size=BS, epochs=3, initial_epoch=2, callbacks=[cb2, Probe()], verbose=0)
    assert seen["installed"] and seen["factors"] == pytest.approx(expect)


def test_suggest_changes_nothing_but_logs(tmp_path):
    x, y = _data()
    model = _model(keras.optimizers.AdamW(0.01, weight_decay=0.1))
    events = Events()
    cb = _ww(tmp_path, freeze=Freeze.suggest(**LOOSE), balance_lr="suggest",
             trackers=[events])
    model.fit(x, y, batch_size=BS, epochs=2, callbacks=[cb], verbose=0)
    assert not any(_frozen(model).values())
    assert cb.lr_scaler is None and "apply" not in vars(model.optimizer)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.01)
    assert cb.frozen_layers == ["mlp.d0", "mlp.d1"]
    assert {k for _, k, _ in events.events} == {"freeze-suggestion", "lr-factors-suggestion"}


def test_early_stop_sets_stop_training(tmp_path):
    x, y = _data()
    model = _model(keras.optimizers.SGD(0.05))
    events = Events()
    cb = _ww(tmp_path, early_stop=EarlyStop.apply(lower_bound=100.0), trackers=[events])
    hist = model.fit(x, y, batch_size=BS, epochs=5, callbacks=[cb], verbose=0)
    assert len(hist.history["loss"]) == 1 and cb.global_step == 2
    assert [k for _, k, _ in events.events] == ["early-stop"]


def test_fresh_fit_does_not_take_over_an_earlier_runs_actions(tmp_path):
    x, y = _data()
    model = _model(keras.optimizers.AdamW(0.01, weight_decay=0.1))
    cb = _ww(tmp_path, freeze=Freeze.apply(**LOOSE))
    model.fit(x, y, batch_size=BS, epochs=2, callbacks=[cb], verbose=0)
    assert cb.frozen_layers                        # the first run froze something
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.setdefault("frozen", _frozen(self.model))

    model2 = _model(keras.optimizers.AdamW(0.01, weight_decay=0.1))
    cb2 = _ww(tmp_path, freeze=Freeze.apply(**LOOSE))   # same output_dir, initial_epoch=0
    model2.fit(x, y, batch_size=BS, epochs=1, callbacks=[cb2, Probe()], verbose=0)
    assert not any(seen["frozen"].values())
