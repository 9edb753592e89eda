"""Failure isolation: a full disk at a tracker, a plotting failure, an exception inside one layer's
analysis, a history line cut short by a crash (history files that cannot be written:
``test_history_write_failure.py``). Each is reported once and training goes on;
``strict=True`` re-raises.

The controller-level tests analyse numpy weights and run without torch (marked ``core``); the
framework tests import theirs inside."""

import importlib

import numpy as np
import pytest

from ww_callbacks.controller import WeightWatcherController
from ww_callbacks.history import HistoryWarning, read_jsonl
from ww_callbacks.trackers.base import Tracker

LAYERS = ["fc1", "fc2"]


def net():
    """Two dense layers, fc1 (64×32: 32 eigenvalues) and fc2 (48×64: 48), as a numpy state dict."""
    rng = np.random.default_rng(0)
    return {"fc1.weight": (rng.standard_normal((64, 32)) / 8).astype(np.float32),
            "fc1.bias": np.zeros(64, np.float32),
            "fc2.weight": (rng.standard_normal((48, 64)) / 8).astype(np.float32),
            "fc2.bias": np.zeros(48, np.float32)}


class DiskFull(Tracker):
    """Works for the first analysis, then the disk is full."""

    name = "diskfull"

    def __init__(self):
        self.calls = 0

    def log_analysis(self, **kwargs):
        self.calls += 1
        if self.calls > 1:
            raise OSError(28, "No space left on device")


def controller(tmp_path, current_step=0, **kw):
    lines = []
    kw.setdefault("trackers", ["local"])
    ctl = WeightWatcherController(start_fraction=0.0, every_n_steps=1, output_dir=str(tmp_path / "ww"),
                                  log_fn=lines.append, async_analysis=False, **kw)
    ctl.configure(total_steps=3, current_step=current_step)
    return ctl, lines


def errors(lines):
    return [l for l in lines if "training continues" in l]


def assert_history(tmp_path, steps):
    disk = read_jsonl(str(tmp_path / "ww" / "history.jsonl"))
    assert [(r["step"], r["name"]) for r in disk] == [(s, n) for s in steps for n in LAYERS]


def test_tracker_disk_full_mid_run_degrades_to_local_record(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("lightning")
    from lightning.pytorch import LightningModule, Trainer

    class Model(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 48))

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    from ww_callbacks.lightning import WeightWatcherCallback

    lines, disk_full = [], DiskFull()
    out = tmp_path / "ww"
    cb = WeightWatcherCallback(start_fraction=0.0, every_n_epochs=1, output_dir=str(out),
                               trackers=[disk_full, "local"], log_fn=lines.append,
                               async_analysis=False)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 32)), batch_size=8)
    trainer = Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[cb])
    trainer.fit(Model(), data)
    assert trainer.current_epoch == 4 and trainer.global_step == 16    # training finished
    assert disk_full.calls == 2                                         # disabled after failing
    errs = errors(lines)
    assert len(errs) == 1 and "No space left on device" in errs[0] and "diskfull" in errs[0]
    assert cb.history.steps == [4, 8, 12, 16]                           # nothing lost
    disk = read_jsonl(str(out / "history.jsonl"))
    assert sorted({r["step"] for r in disk}) == [4, 8, 12, 16]
    from ww_callbacks.trackers.report_live import read_report_data  # the live report's data files

    assert (out / "report.html").exists() and read_report_data(str(out))["latest_step"] == 16


@pytest.mark.core
def test_strict_reraises_tracker_oserror(tmp_path):
    ctl, _ = controller(tmp_path, trackers=[DiskFull()], strict=True)
    ctl.run(net(), step=1, epoch=0)
    with pytest.raises(OSError, match="No space left"):
        ctl.run(net(), step=2, epoch=0)


@pytest.mark.core
def test_plot_failure_reported_once_history_still_written(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    def broken_savefig(self, *args, **kwargs):
        raise RuntimeError("matplotlib exploded")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    ctl, lines = controller(tmp_path)
    model = net()
    for step in (1, 2, 3):
        assert ctl.run(model, step=step, epoch=0) is not None
    ctl.finish(model, step=3, epoch=0)
    errs = errors(lines)
    assert len(errs) == 1 and "matplotlib exploded" in errs[0] and "alpha plot" in errs[0]
    assert len([l for l in lines if l.startswith("ww step")]) == 3   # every analysis logged
    assert_history(tmp_path, [1, 2, 3])
    assert not (tmp_path / "ww" / "alpha_over_time.png").exists()
    # the report keeps being written without the plot, up to the last analysis
    from ww_callbacks.trackers.report_live import read_report_data  # the live report's data files

    assert read_report_data(str(tmp_path / "ww"))["latest_step"] == 3

    strict, _ = controller(tmp_path / "strict", strict=True)
    with pytest.raises(RuntimeError, match="matplotlib exploded"):
        strict.run(model, step=1, epoch=0)


@pytest.mark.core
def test_exception_inside_one_layer_names_the_layer(tmp_path, monkeypatch):
    engine = importlib.import_module("ww_core.layer_analysis")
    real = engine.fit_powerlaw

    def fit_fails_on_second_layer(evals, **kwargs):
        # fc2 is the layer with 48 eigenvalues (by size, not by call count: the default precision
        # may fit a layer twice, float32 then float64)
        if len(evals) == 48:
            raise FloatingPointError("overflow in the KS scan")
        return real(evals, **kwargs)

    monkeypatch.setattr(engine, "fit_powerlaw", fit_fails_on_second_layer)
    ctl, lines = controller(tmp_path)
    model = net()
    assert ctl.run(model, step=1, epoch=0) is None
    assert ctl.run(model, step=2, epoch=0) is None
    errs = errors(lines)
    assert len(errs) == 1, lines                                    # once, not per analysis
    assert "in layer 'fc2'" in errs[0] and "FloatingPointError" in errs[0]
    assert "overflow in the KS scan" in errs[0] and "step 1" in errs[0]
    monkeypatch.setattr(engine, "fit_powerlaw", real)               # the next analysis works
    assert ctl.run(model, step=3, epoch=0) is not None
    assert_history(tmp_path, [3])

    monkeypatch.setattr(engine, "fit_powerlaw", fit_fails_on_second_layer)
    strict, _ = controller(tmp_path / "strict", strict=True)
    with pytest.raises(FloatingPointError, match="overflow"):
        strict.run(model, step=1, epoch=0)


@pytest.mark.core
def test_failure_outside_a_layer_has_no_layer_name(tmp_path):
    ctl, lines = controller(tmp_path, trackers=None)
    assert ctl.run(object(), step=1, epoch=0) is None              # not a model: SourceError
    errs = errors(lines)
    assert len(errs) == 1 and "SourceError" in errs[0] and "in layer" not in errs[0]


@pytest.mark.core
def test_history_line_cut_short_by_a_crash_is_skipped_on_resume(tmp_path):
    ctl, _ = controller(tmp_path, trackers=None)
    model = net()
    ctl.run(model, step=1, epoch=0)
    ctl.run(model, step=2, epoch=0)
    path = tmp_path / "ww" / "history.jsonl"
    with open(path, "a") as fh:                      # a hard kill in the middle of a write
        fh.write('{"step": 3, "epoch": 0, "name": "fc1", "alp')
    with pytest.warns(HistoryWarning, match="cut short"):       # readers skip it, and say so
        assert [r["step"] for r in read_jsonl(str(path))] == [1, 1, 2, 2]
    # resume from a checkpoint at step 2 that did not hold the history (fresh controller)
    with pytest.warns(HistoryWarning, match="cut short"):
        resumed, lines = controller(tmp_path, trackers=None, current_step=2)
    assert resumed.history.steps == [1, 2]
    assert_history(tmp_path, [1, 2])                 # rewritten: the partial line is gone
    resumed.run(model, step=3, epoch=0)
    assert_history(tmp_path, [1, 2, 3])
