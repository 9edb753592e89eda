"""The Keras callback's background analysis on every backend (torch, JAX, TensorFlow): every epoch
analysed in the background and recorded, the local record written, and the analysis' thread pools
limited to one thread for the fit on the traced backends' CPU training, then restored.

That limit and the engine's warm-up (:func:`ww_callbacks.keras_utils.prepare_fit`) are what keep
the background analysis from being starved on JAX/TF: without them, on 2 cores, a first eigensolve
took 0.4-0.7 s instead of 5 ms and analyses fell behind (skipped). Whether the analyses keep up is
a matter of speed, measured in ``benchmarks/keras_backends.py``, not asserted here: on a slow or
busy machine a skip is the designed behaviour. So the tests check the mechanism (the pools' size
during the fit) and the record (with a callback that waits for each background analysis; and,
without one, that every due epoch was analysed or skipped).
"""

from __future__ import annotations

import os

# KERAS_BACKEND (default torch) and a temporary KERAS_HOME are set by conftest.py / tox, before
# keras is imported.
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from helpers import TRACKER_TIMEOUT, assert_due_steps_accounted_for  # noqa: E402
from ww_callbacks.history import read_jsonl  # noqa: E402
from ww_callbacks.keras import WeightWatcherCallback  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*__array__ implementation.*:DeprecationWarning")]

N, D, C, BS, EPOCHS = 512, 8, 4, 16, 5      # 32 steps per epoch
DUE = [32 * (e + 1) for e in range(EPOCHS)]


class WaitForAnalysis(keras.callbacks.Callback):
    """After the WeightWatcher callback: waits for the background analysis it started at the epoch
    end, so every epoch is recorded however slow the machine (the analysis stays asynchronous)."""

    def __init__(self, cb):
        super().__init__()
        self.cb = cb

    def on_epoch_end(self, epoch, logs=None):
        self.cb.controller.poll(wait=True)


class BlasThreads(keras.callbacks.Callback):
    """The BLAS pools' sizes at each epoch end, i.e. during the fit (``{library: threads}``)."""

    def __init__(self, threadpoolctl):
        super().__init__()
        self.threadpoolctl, self.seen = threadpoolctl, []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(blas_threads(self.threadpoolctl))


def blas_threads(threadpoolctl):
    return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas"}


def _fit(tmp_path, wait=False, extra=(), **kw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype("float32")
    y = rng.integers(0, C, N)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(16, activation="relu", name="d0"),
                              keras.layers.Dense(16, activation="relu", name="d1"),
                              keras.layers.Dense(C, name="head")], name="tiny")
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    lines = []
    cb = WeightWatcherCallback(start_fraction=0.0, every_n_epochs=1, output_dir=str(tmp_path / "ww"),
                               log_fn=lines.append, tracker_timeout=TRACKER_TIMEOUT, **kw)
    after = [WaitForAnalysis(cb)] if wait else []
    model.fit(x, y, epochs=EPOCHS, batch_size=BS, verbose=0, callbacks=[cb, *after, *extra])
    return model, cb, lines


def test_async_analysis_records_every_epoch(tmp_path):
    _, cb, _ = _fit(tmp_path, wait=True, trackers=["local"])  # "auto": background
    assert cb.controller.asynchronous
    assert cb.controller.skipped_analyses == 0               # (the wait makes this hold anywhere)
    assert cb.controller.num_analyses == EPOCHS
    steps = sorted({r["step"] for r in read_jsonl(str(tmp_path / "ww" / "history.jsonl"))})
    assert steps == cb.history.steps == DUE
    assert os.path.exists(tmp_path / "ww" / "report.html")
    assert os.path.exists(tmp_path / "ww" / "alpha_over_time.png")


def test_thread_limits_hold_during_the_fit_and_are_restored_after(tmp_path):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from ww_callbacks.keras_utils import _trains_on_cpu, _warm_up, traced_backend

    _warm_up(plots=False)                                    # loads the engine's BLAS libraries
    before = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()}
    blas_before = blas_threads(threadpoolctl)
    probe = BlasThreads(threadpoolctl)
    _, cb, lines = _fit(tmp_path, extra=[probe], trackers=None)      # no waiting: real timing
    after = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()}
    assert {k: after[k] for k in before} == before
    # during the fit: one thread per pool where XLA trains on the CPU (else left alone)
    limited = traced_backend() and _trains_on_cpu()
    expected = {k: 1 for k in blas_before} if limited else blas_before
    assert len(probe.seen) == EPOCHS
    assert all({k: seen[k] for k in blas_before} == expected for seen in probe.seen), probe.seen
    assert cb.controller.asynchronous
    assert_due_steps_accounted_for(cb.history.steps, lines, cb.controller, DUE)
