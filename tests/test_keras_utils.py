"""Keras 3 helpers on the current backend (torch, JAX, TensorFlow): mid-fit freezing, per-layer LR
scaling and the fit-time set-up of the analysis."""

from __future__ import annotations

# KERAS_BACKEND (default torch) and a temporary KERAS_HOME are set by conftest.py / tox, before
# keras is imported.
import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")
BACKEND = keras.config.backend()

import ww_core  # noqa: E402
from ww_callbacks.keras_utils import (  # noqa: E402
    LayerLRScaler,
    find_layers,
    freeze_layers,
    is_frozen,
    prepare_fit,
    unfreeze_layers,
)

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*__array__ implementation.*:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

rng = np.random.default_rng(0)
X = rng.standard_normal((64, 8)).astype("float32")
Y = rng.standard_normal((64, 2)).astype("float32")


def make_model(opt):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="d0"),
                              keras.layers.Dense(16, name="d1"), keras.layers.Dense(2, name="head")])
    model.compile(opt, "mse")
    return model


def value(variable):
    """A numpy copy of a Keras variable (any backend)."""
    return np.array(keras.ops.convert_to_numpy(variable.value))


def kernel(model, name):
    return value(model.get_layer(name).kernel)


@pytest.mark.parametrize("make_opt", [
    lambda: keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=0.01),
    lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
], ids=["sgd-momentum-wd", "adamw-wd"])
def test_frozen_layer_bit_identical_after_more_fit_steps(make_opt):
    model = make_model(make_opt())
    names = ww_core.analyze(model).names            # ww_core names: "<model>.d0", ...
    d0 = [n for n in names if n.endswith(".d0")][0]
    seen = {}

    class Freeze(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                assert freeze_layers(self.model, [d0]) == [d0]
                seen["kernel"] = kernel(self.model, "d0")
                seen["bias"] = value(self.model.get_layer("d0").bias)
                seen["d1"] = kernel(self.model, "d1")

    model.fit(X, Y, epochs=3, batch_size=16, verbose=0, callbacks=[Freeze()])
    assert np.array_equal(kernel(model, "d0"), seen["kernel"])
    assert np.array_equal(value(model.get_layer("d0").bias), seen["bias"])
    assert not np.array_equal(kernel(model, "d1"), seen["d1"])
    assert is_frozen(model, "d0") and not is_frozen(model, "d1")
    # JAX masks the updates (the optimizer's variable list is fixed); the others drop the layer
    assert model.get_layer("d0").trainable is (BACKEND == "jax")
    if BACKEND == "torch":
        assert not model.get_layer("d0").kernel.value.requires_grad
    unfreeze_layers(model, ["d0"])                   # short names work when unambiguous
    assert not is_frozen(model, "d0")
    model.fit(X, Y, epochs=1, batch_size=16, verbose=0)
    assert not np.array_equal(kernel(model, "d0"), seen["kernel"])


@pytest.mark.parametrize("make_opt", [
    lambda: keras.optimizers.SGD(0.05),
    lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
], ids=["sgd", "sgd-momentum", "adamw"])
def test_lr_scaling_scales_each_layer_update(make_opt):
    """Same init, same batches: the scaled layer's update is exactly f x the reference update,
    i.e. the run behaves as if that layer's LR were f x lr (Adam included, unlike grad scaling)."""
    ref, model = make_model(make_opt()), make_model(make_opt())
    start = {n: kernel(model, n) for n in ("d0", "d1")}
    scaler = LayerLRScaler(model).install()
    assert scaler.set_factors({"d0": 0.5, "d1": 1.0}) == {"d0": 0.5, "d1": 1.0}
    ref.fit(X, Y, epochs=1, batch_size=64, verbose=0, shuffle=False)    # one step each
    model.fit(X, Y, epochs=1, batch_size=64, verbose=0, shuffle=False)
    d_ref = kernel(ref, "d0") - start["d0"]
    d_got = kernel(model, "d0") - start["d0"]
    np.testing.assert_allclose(d_got, 0.5 * d_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(kernel(model, "d1"), kernel(ref, "d1"), rtol=1e-5, atol=1e-7)
    # idempotent and removable; state round trip
    scaler.install()
    state = scaler.state_dict()
    other = LayerLRScaler(model)
    other.load_state_dict(state)
    assert other.factors == {"d0": 0.5, "d1": 1.0}
    scaler.uninstall()
    assert not scaler.installed and "apply" not in vars(model.optimizer)


def test_lr_scaling_effect_over_several_steps():
    """Measurable over a longer fit: factor 0.25 moves the layer much less than factor 2."""
    small, big = make_model(keras.optimizers.Adam(0.01)), make_model(keras.optimizers.Adam(0.01))
    start = kernel(small, "d0")
    LayerLRScaler(small).install().set_factors({"d0": 0.25})
    LayerLRScaler(big).install().set_factors({"d0": 2.0})
    for m in (small, big):
        m.fit(X, Y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    move_small = float(np.linalg.norm(kernel(small, "d0") - start))
    move_big = float(np.linalg.norm(kernel(big, "d0") - start))
    assert move_big > 4 * move_small


def test_validation():
    model = make_model(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="match no layer"):
        find_layers(model, ["nope"])
    with pytest.raises(ValueError):
        LayerLRScaler(model).set_factors({"d0": -1.0})
    with pytest.raises(ValueError):
        freeze_layers(model, "d0")


def test_factor_changes_mid_fit_reach_the_traced_train_function():
    """On JAX/TF the wrapper is traced with the factors as constants: a new factor set between
    two steps of the same fit must still apply at the next step (the train function is rebuilt)."""
    ref, model = make_model(keras.optimizers.Adam(0.01)), make_model(keras.optimizers.Adam(0.01))
    scaler = LayerLRScaler(model).install()
    moves = {}

    class Change(keras.callbacks.Callback):
        def __init__(self, factors):
            super().__init__()
            self.factors, self.before = factors, None

        def on_train_batch_begin(self, batch, logs=None):
            self.before = kernel(self.model, "d0")

        def on_train_batch_end(self, batch, logs=None):
            moves.setdefault(id(self), []).append(kernel(self.model, "d0") - self.before)
            if batch == 0 and self.factors:
                scaler.set_factors(self.factors)

    plain, scaled = Change(None), Change({"d0": 0.25})
    ref.fit(X, Y, epochs=1, batch_size=32, verbose=0, shuffle=False, callbacks=[plain])
    model.fit(X, Y, epochs=1, batch_size=32, verbose=0, shuffle=False, callbacks=[scaled])
    (p0, p1), (s0, s1) = moves[id(plain)], moves[id(scaled)]
    np.testing.assert_allclose(s0, p0, rtol=1e-5, atol=1e-7)          # step 1: factor 1
    np.testing.assert_allclose(s1, 0.25 * p1, rtol=1e-4, atol=1e-7)   # step 2: factor 0.25


def test_prepare_fit_limits_and_restores_blas_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import ww_callbacks.keras_utils as ku

    def blas():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

    ku._warm_up(plots=False)                         # loads the engine's BLAS libraries
    before = blas()
    undo = prepare_fit(plots=False)
    if BACKEND == "torch":                           # eager: nothing to set up
        assert blas() == before
    elif ku._trains_on_cpu():
        assert blas() and set(blas()) == {1}
    undo()
    assert blas() == before
