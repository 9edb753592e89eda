"""Keras 3 (torch backend) helpers: mid-fit freezing and per-layer LR scaling."""

from __future__ import annotations

# KERAS_BACKEND=torch and a temporary KERAS_HOME are set by conftest.py, before keras is imported.
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("torch")
keras = pytest.importorskip("keras")
if keras.config.backend() != "torch":  # pragma: no cover - another backend was imported first
    pytest.skip("these tests run Keras on the torch backend", allow_module_level=True)

import ww_core  # noqa: E402
from ww_callbacks.keras_utils import LayerLRScaler, find_layers, freeze_layers, unfreeze_layers  # noqa: E402

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


def kernel(model, name):
    return model.get_layer(name).kernel.value.detach().clone()


@pytest.mark.parametrize("make_opt", [
    lambda: keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=0.01),
    lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
], ids=["sgd-momentum-wd", "adamw-wd"])
def test_frozen_layer_bit_identical_after_more_fit_steps(make_opt):
    import torch

    model = make_model(make_opt())
    names = ww_core.analyze(model).names            # ww_core names: "<model>.d0", ...
    d0 = [n for n in names if n.endswith(".d0")][0]
    seen = {}

    class Freeze(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                assert freeze_layers(self.model, [d0]) == [d0]
                seen["kernel"] = kernel(self.model, "d0")
                seen["bias"] = self.model.get_layer("d0").bias.value.detach().clone()
                seen["d1"] = kernel(self.model, "d1")

    model.fit(X, Y, epochs=3, batch_size=16, verbose=0, callbacks=[Freeze()])
    assert torch.equal(kernel(model, "d0"), seen["kernel"])
    assert torch.equal(model.get_layer("d0").bias.value.detach(), seen["bias"])
    assert not torch.equal(kernel(model, "d1"), seen["d1"])
    assert not model.get_layer("d0").kernel.value.requires_grad
    unfreeze_layers(model, ["d0"])                   # short names work when unambiguous
    model.fit(X, Y, epochs=1, batch_size=16, verbose=0)
    assert not torch.equal(kernel(model, "d0"), seen["kernel"])


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
    np.testing.assert_allclose(d_got.numpy(), 0.5 * d_ref.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(kernel(model, "d1").numpy(), kernel(ref, "d1").numpy(),
                               rtol=1e-5, atol=1e-7)
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
    move_small = float((kernel(small, "d0") - start).norm())
    move_big = float((kernel(big, "d0") - start).norm())
    assert move_big > 4 * move_small


def test_validation():
    model = make_model(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="match no layer"):
        find_layers(model, ["nope"])
    with pytest.raises(ValueError):
        LayerLRScaler(model).set_factors({"d0": -1.0})
    with pytest.raises(ValueError):
        freeze_layers(model, "d0")
