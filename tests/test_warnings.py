"""Misconfiguration is a filterable ``WeightWatcherWarning`` (besides its ``ww:`` log line):
``configure()`` never called, a ``start_fraction`` that cannot be applied, a schedule that never
falls due, a named local tracker without a folder, a Lightning ``EarlyStopping`` on a key never
published. ``warnings.filterwarnings("ignore", category=WeightWatcherWarning)`` silences each, and
``HistoryWarning`` is one too."""

import re
import warnings

import numpy as np
import pytest

from ww_callbacks import MEMORY_ONLY, WeightWatcherWarning
from ww_callbacks.controller import WeightWatcherController
from ww_callbacks.history import HistoryWarning

WEIGHTS = {"fc.weight": np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)}


def ctl(lines=None, **kw):
    opts = dict(output_dir=MEMORY_ONLY, trackers=None, async_analysis=False,
                log_fn=(lines.append if lines is not None else (lambda line: None)))
    return WeightWatcherController(**{**opts, **kw})


def no_configure(c):
    c.maybe_run(WEIGHTS, step=1, epoch=0, epoch_end=True)


def unknown_length(c):
    c.configure(total_steps=None, total_epochs=None, is_global_zero=True)


def steps_never_due(c):
    c.configure(total_steps=10, is_global_zero=True)


def epochs_never_due(c):
    c.configure(total_steps=100, total_epochs=2, is_global_zero=True)


CASES = [
    (no_configure, dict(start_fraction=0.0), "configure\\(\\) was not called"),
    (unknown_length, {}, "total training length is unknown"),
    (steps_never_due, dict(every_n_steps=25), "every_n_steps=25 .* first falls due at step 25"),
    (epochs_never_due, dict(every_n_epochs=3), "every_n_epochs=3 is more than the planned 2"),
    (steps_never_due, dict(every_n_steps=5, trackers=["local"]), "local record needs a folder"),
]


@pytest.mark.core
@pytest.mark.parametrize("call, kw, match", CASES, ids=[c[2][:20] for c in CASES])
def test_misconfiguration_warns_and_keeps_its_log_line(call, kw, match):
    lines = []
    c = ctl(lines, **kw)
    with pytest.warns(WeightWatcherWarning, match=match):
        call(c)
    if "local" not in match:
        assert any(line.startswith("ww: ") and re.search(match, line) for line in lines)


@pytest.mark.core
@pytest.mark.parametrize("call, kw, match", CASES, ids=[c[2][:20] for c in CASES])
def test_the_category_filter_silences_it(call, kw, match):
    c = ctl(**kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=WeightWatcherWarning)
        call(c)
    assert not [w for w in caught if issubclass(w.category, WeightWatcherWarning)]


@pytest.mark.core
def test_a_correct_setup_does_not_warn():
    c = ctl(every_n_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeightWatcherWarning)
        c.configure(total_steps=20, is_global_zero=True)
        for step in range(1, 21):
            c.maybe_run(WEIGHTS, step=step, epoch=0)
    assert c.history.steps == [10, 15, 20]


@pytest.mark.core
def test_only_rank_zero_warns():
    c = ctl(every_n_steps=25)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeightWatcherWarning)
        c.configure(total_steps=10, is_global_zero=False)


@pytest.mark.core
def test_the_warning_points_at_the_callers_line():
    with pytest.warns(WeightWatcherWarning) as record:
        steps_never_due(ctl(every_n_steps=25))
    assert record[0].filename == __file__


@pytest.mark.core
def test_history_warning_is_a_weightwatcher_warning_and_still_a_runtime_warning():
    assert issubclass(HistoryWarning, WeightWatcherWarning) and issubclass(HistoryWarning, RuntimeWarning)
    assert issubclass(WeightWatcherWarning, UserWarning)


def test_lightning_early_stopping_on_an_unknown_key_warns(tmp_path):
    pytest.importorskip("lightning")
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import EarlyStopping

    from ww_callbacks.lightning import WeightWatcherCallback

    cb = WeightWatcherCallback(output_dir=str(tmp_path), trackers=None, log_fn=lambda line: None)
    typo, known = EarlyStopping(monitor="ww/alpha_mena"), EarlyStopping(monitor="ww/alpha_mean")
    trainer = Trainer(callbacks=[cb, typo, known], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.warns(WeightWatcherWarning, match="ww/alpha_mena"):
        cb._make_early_stopping_lenient(trainer)
    # the unknown key is left as the user set it; the known one is lenient until the fit ends
    assert typo.strict and not known.strict
    cb._restore_early_stopping()
    assert known.strict
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=WeightWatcherWarning)
        cb._make_early_stopping_lenient(trainer)
    assert not [w for w in caught if issubclass(w.category, WeightWatcherWarning)]
