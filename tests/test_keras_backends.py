"""The Keras callback's background analysis keeps up with training on every backend (torch, JAX,
TensorFlow): no analysis skipped, the local record written, the engine set up once per fit.

Timing is measured in ``benchmarks/keras_backends.py``, not asserted here: the model is tiny (an
analysis takes milliseconds) and an epoch is 32 steps, so a skip means the analysis was starved,
as it was on JAX/TF before :func:`ww_callbacks.keras_utils.prepare_fit`.
"""

from __future__ import annotations

import os

# KERAS_BACKEND (default torch) and a temporary KERAS_HOME are set by conftest.py / tox, before
# keras is imported.
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from ww_callbacks.history import read_jsonl  # noqa: E402
from ww_callbacks.keras import WeightWatcherCallback  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*__array__ implementation.*:DeprecationWarning")]

N, D, C, BS, EPOCHS = 512, 8, 4, 16, 5      # 32 steps per epoch


def _fit(tmp_path, **kw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype("float32")
    y = rng.integers(0, C, N)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(16, activation="relu", name="d0"),
                              keras.layers.Dense(16, activation="relu", name="d1"),
                              keras.layers.Dense(C, name="head")], name="tiny")
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    cb = WeightWatcherCallback(start_fraction=0.0, every_n_epochs=1, output_dir=str(tmp_path / "ww"),
                               log_fn=lambda line: None, **kw)
    model.fit(x, y, epochs=EPOCHS, batch_size=BS, verbose=0, callbacks=[cb])
    return model, cb


def test_async_analysis_every_epoch_skips_none(tmp_path):
    model, cb = _fit(tmp_path, trackers=["local"])          # async_analysis="auto": background
    assert cb.controller.asynchronous
    assert cb.controller.skipped_analyses == 0
    assert cb.controller.num_analyses == EPOCHS
    steps = sorted({r["step"] for r in read_jsonl(str(tmp_path / "ww" / "history.jsonl"))})
    assert steps == [32 * (e + 1) for e in range(EPOCHS)]
    assert os.path.exists(tmp_path / "ww" / "report.html")
    assert os.path.exists(tmp_path / "ww" / "alpha_over_time.png")


def test_thread_limits_are_restored_after_the_fit(tmp_path):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from ww_callbacks.keras_utils import _warm_up

    _warm_up(plots=False)
    before = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()}
    _, cb = _fit(tmp_path, trackers=None)
    after = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()}
    assert {k: after[k] for k in before} == before
    assert cb.controller.skipped_analyses == 0
