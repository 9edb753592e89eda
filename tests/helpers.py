"""Plain helpers shared by several test modules (``from helpers import ...``; pytest puts tests/ on
``sys.path``). Fixtures live in ``conftest.py``.

Only numpy and the standard library are imported here: ``tox -e core`` imports this module without
torch installed. Framework objects are touched only inside the functions that need them.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

#: The repository root (the working directory of the subprocess tests).
REPO = Path(__file__).resolve().parents[1]

#: Freeze-policy options under which any settled-enough alpha counts, decided at the 2nd analysis
#: (the framework action tests: Lightning, HF, Keras).
#: Freeze whatever is analysed twice, any layer (``order="any"``): tests of the freezing mechanics.
LOOSE_FREEZE = {"band": (0.0, 100.0), "tol": 10.0, "window": 2, "max_share": 0.5, "order": "any"}


# ----------------------------------------------------------------------- weights

def spec_matrices():
    """The engine tests' deterministic reference matrices, float32 (draw order matters; WeightWatcher
    0.7.7's results on them are in ``tests/data/ww077_reference.json``):
    ``A`` (fc1, 1000×500 Gaussian), ``B`` (fc2, heavy-tailed Pareto(2.5)), ``C`` (conv, 128×64×3×3)."""
    rng = np.random.default_rng(12345)
    A = rng.standard_normal((1000, 500)) / np.sqrt(1000)
    signs = rng.choice([-1.0, 1.0], size=(1000, 500))
    B = signs * (rng.pareto(2.5, size=(1000, 500)) + 1) / np.sqrt(1000)
    C = rng.standard_normal((128, 64, 3, 3)) * np.sqrt(2 / (64 * 9))
    return [x.astype(np.float32) for x in (A, B, C)]


def reference_model():
    """A torch module holding :func:`spec_matrices`: ``conv``, ``fc1``, ``fc2`` (float32), plus
    ``small`` (5 < min_evals columns) and a LayerNorm, which both tools skip. WeightWatcher
    0.7.7's results on it are ``tests/data/ww077_reference.json`` (written by
    ``benchmarks/ww_reference_tables.py``, which imports this function)."""
    import torch

    A, B, C = spec_matrices()
    m = torch.nn.Module()
    m.conv = torch.nn.Conv2d(64, 128, 3, bias=False)
    m.fc1 = torch.nn.Linear(500, 1000)
    m.fc2 = torch.nn.Linear(500, 1000)
    m.small = torch.nn.Linear(5, 7)
    m.ln = torch.nn.LayerNorm(10)
    with torch.no_grad():
        m.conv.weight.copy_(torch.from_numpy(C))
        m.fc1.weight.copy_(torch.from_numpy(A))
        m.fc2.weight.copy_(torch.from_numpy(B))
    return m.eval()


def heavy_tailed(rng, shape, mu=2.5):
    """Random-sign Pareto(mu) entries scaled by 1/sqrt(rows), float32: alpha in the trained range."""
    signs = rng.choice([-1.0, 1.0], size=shape)
    return (signs * (rng.pareto(mu, size=shape) + 1) / np.sqrt(shape[0])).astype(np.float32)


# ----------------------------------------------------------------------- float32 tolerances

def float32_alpha_tol(ref) -> float:
    """How far the default ``precision="auto"`` alpha of a layer may be from its float64 alpha.

    ``ref`` is the layer's float64 :class:`~ww_core.LayerResult` (or its ``to_dict()`` record).
    From ww_core/precision.py: a layer is kept in float32 only when its fit passed the checks, so
    its alpha moves by at most the winner's own shift ``(α-1)²·ν/xmin`` (ν = ``resolution(λ_max,
    N, M)``, itself 8-100× above the measured eigenvalue errors) plus ``ALPHA_TOL`` (a KS near-tie
    won by a candidate of nearly the same alpha). The shift term is doubled to cover that
    candidate's own shift. A layer re-solved in float64 agrees to rounding, well inside this.
    """
    from ww_core.precision import ALPHA_TOL

    alpha, xmin = _field(ref, "alpha"), _field(ref, "xmin")
    return ALPHA_TOL + 2.0 * (alpha - 1.0) ** 2 * float32_resolution(ref) / xmin


def assert_alpha_float32_close(got, ref, label=None):
    """``got`` (an alpha from the default ``precision="auto"``) is within :func:`float32_alpha_tol`
    of the float64 layer ``ref``'s alpha; a failed fit (NaN) must fail in both."""
    expected = _field(ref, "alpha")
    if expected != expected:
        assert got != got, (label, got)
        return
    tol = float32_alpha_tol(ref)
    assert abs(got - expected) <= tol, (label, got, expected, tol)


def float32_resolution(ref) -> float:
    """ν of ww_core/precision.py for a layer: the bound on the absolute error of any of its
    (scaled) eigenvalues solved in float32, so also of ``xmin``, ``xmax`` and ``spectral_norm``."""
    from ww_core.precision import resolution

    N, M = _field(ref, "N"), _field(ref, "M")
    return resolution(_field(ref, "spectral_norm"), max(N, M), min(N, M))


def _field(layer, key):
    return layer[key] if isinstance(layer, dict) else getattr(layer, key)


def assert_records_close(got, expected, rel=1e-12, label=None):
    """Two records (``LayerResult.to_dict()``) equal, floats to ``rel`` (NaN equals NaN)."""
    assert got.keys() == expected.keys(), label
    for key, value in expected.items():
        if isinstance(value, float) and isinstance(got[key], float):
            if value != value:
                assert got[key] != got[key], (label, key, got[key])
            else:
                assert abs(got[key] - value) <= rel * abs(value) + 1e-300, (label, key, got[key], value)
        else:
            assert got[key] == value, (label, key, got[key], value)


# ----------------------------------------------------------------------- trackers and timeouts

#: ``tracker_timeout`` for tests whose trackers are real backends (MLflow, TensorBoard, W&B) and
#: that are not about the timeout. A backend's first call is cold: an MLflow tracker creating its
#: sqlite store (imports, schema migrations) took 11 s on 2 busy cores, against the default 30 s.
#: Generous, so that only a real hang drops a tracker.
TRACKER_TIMEOUT = 300.0


# ----------------------------------------------------------------------- background analyses

_SKIPPED = re.compile(r"ww step (\d+): previous analysis still running, skipped")


def assert_due_steps_accounted_for(steps, log_lines, controller, due):
    """The record of a run with background analyses (``async_analysis``), whatever the CPU's speed.

    A step falling due while the previous analysis still runs is skipped by design (logged and
    counted in ``skipped_analyses``); which ones depends on the machine. Whatever they are: each
    due step was analysed or skipped, none twice, in order, and the last one is always analysed
    (``finish()`` analyses the final weights). Only that one can be both: skipped at its hook,
    then analysed synchronously by ``finish()``.

    Args:
        steps: the analysed steps (``history.steps``).
        log_lines: what the controller's ``log_fn`` received.
        controller: the ``WeightWatcherController``.
        due: every step the schedule made due, ascending.
    """
    skipped = [int(m.group(1)) for m in map(_SKIPPED.match, log_lines) if m]
    due = list(due)
    assert len(skipped) == controller.skipped_analyses, (skipped, controller.skipped_analyses)
    assert steps == sorted(set(steps)) and skipped == sorted(set(skipped)), (steps, skipped)
    assert steps and steps[-1] == due[-1], steps
    assert sorted(set(steps) | set(skipped)) == due, (steps, skipped)
    assert set(steps) & set(skipped) <= {due[-1]}, (steps, skipped)


# ----------------------------------------------------------------------- processes

#: Timeout of a subprocess test run (torchrun, the CLI), against a hang only: 10x and more the
#: longest such run's cold time on 2 busy cores (~40 s), so a slow machine never trips it.
SUBPROCESS_TIMEOUT = 600


def torchrun_command(nproc=2):
    """``torchrun --standalone --nproc-per-node N`` next to this interpreter, or skip the test."""
    import pytest

    exe = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not os.path.exists(exe):
        pytest.skip("torchrun not installed")
    return [exe, "--standalone", "--nproc-per-node", str(nproc)]


# ----------------------------------------------------------------------- trackers and actions

def events_tracker():
    """A tracker that records ``log_event`` calls in ``.events`` and ignores analyses."""
    from ww_callbacks.trackers.base import Tracker

    class Events(Tracker):
        name = "events"

        def __init__(self):
            self.events = []

        def log_analysis(self, **kw):
            pass

        def log_event(self, *, step, kind, payload):
            self.events.append((step, kind, payload))

    return Events()


class FrozenParamSnapshot:
    """An action run after the callback's own: copies each torch parameter of ``module`` that is
    frozen (``requires_grad=False``) when it is first seen frozen, with the step: ``.at[name]``."""

    def __init__(self, module):
        self.module, self.at = module, {}

    def on_analysis(self, controller, result, step, epoch):
        for name, p in self.module.named_parameters():
            if not p.requires_grad and name not in self.at:
                self.at[name] = (step, p.detach().clone())


def keras_classifier(keras):
    """A small compiled Keras classifier (16 → 32 → 32 → 4, seeded) and its data ``(x, y)``."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 16)).astype("float32")
    y = (x @ rng.standard_normal((16, 4))).argmax(1)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, x, y


def lightning_classifier(depth=4, width=16, seed=None):
    """A LightningModule of ``depth`` square Linear layers (``body.0`` ...) and a 4-way ``head``
    (4 eigenvalues: below min_evals, not analysed), and a seeded loader of 64 examples.

    Returns:
        ``(module, loader)``; ``seed`` seeds the module's initialisation.
    """
    import torch
    from lightning.pytorch import LightningModule

    class Deep(LightningModule):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
            self.head = torch.nn.Linear(width, 4)

        def training_step(self, batch, _):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.head(torch.tanh(self.body(x))), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, width, generator=g),
                                          torch.randint(0, 4, (64,), generator=g))
    if seed is not None:
        torch.manual_seed(seed)
    return Deep(), torch.utils.data.DataLoader(data, batch_size=32)
