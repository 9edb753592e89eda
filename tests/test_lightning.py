"""Real Lightning Trainer runs on CPU (no mocked trainer) with the WeightWatcher callback."""

import csv
import json
import math
import os
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.demos.boring_classes import BoringModel  # noqa: E402

import ww_core  # noqa: E402
from helpers import TRACKER_TIMEOUT, assert_alpha_float32_close, assert_due_steps_accounted_for  # noqa: E402
from ww_callbacks.history import read_jsonl  # noqa: E402
from ww_callbacks.lightning import WeightWatcherCallback as _Callback  # noqa: E402
from ww_callbacks.trackers.base import Tracker  # noqa: E402


def WeightWatcherCallback(**kwargs):
    """The callback, synchronous unless asked: these tests assert exact analysis steps, and a
    background analysis still running when the next one falls due is skipped by design (the
    asynchronous mode has its own test below). Trackers get a generous timeout
    (helpers.TRACKER_TIMEOUT): none of these tests is about it."""
    kwargs.setdefault("async_analysis", False)
    kwargs.setdefault("tracker_timeout", TRACKER_TIMEOUT)
    return _Callback(**kwargs)


LAYERS = ["layer.0", "layer.2"]  # layer.4 (32x2) has too few eigenvalues and is skipped


def make_model(base=BoringModel):
    class Model(base):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Sequential(
                torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48), torch.nn.ReLU(),
                torch.nn.Linear(48, 2))

    return Model()


def make_trainer(tmp_path, callbacks, trainer_cls=Trainer, **kw):
    kw.setdefault("max_epochs", 4)
    kw.setdefault("limit_train_batches", 4)
    kw.setdefault("limit_val_batches", 1)
    return trainer_cls(default_root_dir=str(tmp_path), callbacks=callbacks, logger=False,
                       enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                       enable_progress_bar=False, enable_model_summary=False, **kw)


def steps_of(cb):
    return cb.history.steps


def assert_consistent(cb, out):
    """One row per layer per analysis, steps increasing, files equal to memory."""
    rows = cb.history.rows
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps)
    for step in cb.history.steps:
        assert [r["name"] for r in cb.history.rows_at(step)] == LAYERS
    disk = read_jsonl(os.path.join(out, "history.jsonl"))
    assert [(r["step"], r["name"]) for r in disk] == [(r["step"], r["name"]) for r in rows]
    with open(os.path.join(out, "history.csv")) as fh:
        on_disk = [(int(r["step"]), r["name"]) for r in csv.DictReader(fh)]
        assert on_disk == [(r["step"], r["name"]) for r in rows]


def same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b


def test_epoch_schedule_history_files_report_and_values(tmp_path):
    lines = []
    out = str(tmp_path / "ww")
    cb = WeightWatcherCallback(output_dir=out, log_fn=lines.append)  # start_fraction 0.5, every epoch
    model = make_model()
    make_trainer(tmp_path, [cb]).fit(model)
    # 16 optimizer steps; analyses from step 8: epoch ends at 8, 12, 16; final (16) not repeated
    assert steps_of(cb) == [8, 12, 16]
    assert [cb.history.rows_at(s)[0]["epoch"] for s in (8, 12, 16)] == [1, 2, 3]
    assert_consistent(cb, out)
    expected = ww_core.analyze(model).to_records()
    got = cb.history.rows_at(16)
    for exp, row in zip(expected, got):
        for key, value in exp.items():
            assert same(row[key], value), key
    assert len(lines) == 3 and lines[0].startswith("ww step 8 epoch 1: mean alpha ")
    from ww_callbacks.trackers.report_live import read_report_data  # the live report's data files

    report = read_report_data(out)
    assert report["layers"] == LAYERS and report["latest_step"] == 16
    with open(os.path.join(out, "alpha_over_time.png"), "rb") as fh:
        assert fh.read(4) == b"\x89PNG"
    json.dumps(cb.state_dict())


@pytest.mark.parametrize("fraction, expected", [(0.0, [4, 8, 12, 16]), (1.0, [16])])
def test_start_fraction_edges(tmp_path, fraction, expected):
    cb = WeightWatcherCallback(start_fraction=fraction, output_dir=str(tmp_path / "ww"), log_fn=None)
    make_trainer(tmp_path, [cb]).fit(make_model())
    assert steps_of(cb) == expected


def test_every_n_steps_with_max_steps(tmp_path):
    # max_steps=10 beats max_epochs=100: 10 planned steps, start at 5, every 3 -> 6, 9, final 10
    cb = WeightWatcherCallback(every_n_steps=3, output_dir=str(tmp_path / "ww"))
    trainer = make_trainer(tmp_path, [cb], max_epochs=100, max_steps=10)
    trainer.fit(make_model())
    assert trainer.global_step == 10
    assert steps_of(cb) == [6, 9, 10]
    assert [cb.history.rows_at(s)[0]["epoch"] for s in (6, 9, 10)] == [1, 2, 2]


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    # 8 batches per epoch / 2 accumulated = 4 optimizer steps per epoch, 8 in all
    cb = WeightWatcherCallback(start_fraction=0.0, every_n_steps=2, output_dir=str(tmp_path / "ww"))
    trainer = make_trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=8, accumulate_grad_batches=2)
    trainer.fit(make_model())
    assert trainer.global_step == 8
    assert steps_of(cb) == [2, 4, 6, 8]  # on_train_batch_end sees each step twice; analysed once
    assert_consistent(cb, str(tmp_path / "ww"))


def test_unknown_length_falls_back_to_epochs(tmp_path):
    class Iterable(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(4):
                yield torch.randn(32, generator=g)

    class Model(type(make_model())):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(Iterable(), batch_size=2)

    lines = []
    cb = WeightWatcherCallback(every_n_steps=1, output_dir=str(tmp_path / "ww"), log_fn=lines.append)
    make_trainer(tmp_path, [cb], max_epochs=4, limit_train_batches=None, limit_val_batches=0).fit(Model())
    # 2 steps per epoch, unknown to the trainer; start after 2 of 4 epochs -> steps 5..8
    assert steps_of(cb) == [5, 6, 7, 8]


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_continues_history_without_gap_or_duplicate(tmp_path):
    out = str(tmp_path / "ww")
    ckpt_dir = str(tmp_path / "ckpt")
    kw = dict(start_fraction=0.0, every_n_epochs=1, output_dir=out)
    first = WeightWatcherCallback(**kw)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)
    make_trainer(tmp_path, [first, ckpt], max_epochs=3).fit(make_model())
    assert steps_of(first) == [4, 8, 12]
    first_rows = {(r["step"], r["name"]): r["time"] for r in first.history.rows}
    # resume from the checkpoint after epoch 2 (step 8): the analysis at step 12 is after it
    path = os.path.join(ckpt_dir, "epoch=1-step=8.ckpt")
    assert os.path.exists(path)
    saved = torch.load(path, weights_only=False)["callbacks"]
    assert any(k.startswith("WeightWatcherCallback") for k in saved)
    lines = []
    second = WeightWatcherCallback(log_fn=lines.append, **kw)
    ckpt2 = ModelCheckpoint(dirpath=str(tmp_path / "ckpt2"), save_top_k=-1, every_n_epochs=1)
    make_trainer(tmp_path, [second, ckpt2], max_epochs=5).fit(make_model(), ckpt_path=path)
    assert steps_of(second) == [4, 8, 12, 16, 20]
    assert_consistent(second, out)
    kept = {(r["step"], r["name"]): r["time"] for r in second.history.rows if r["step"] <= 8}
    assert kept == {k: v for k, v in first_rows.items() if k[0] <= 8}  # same rows, not redone
    # what the resumed run analysed itself (its per-analysis lines; not the wall clock, which
    # may step back): 12 was redone after resume
    redone = [int(ln.split()[2]) for ln in lines if re.match(r"ww step \d+ epoch ", ln)]
    assert redone == [12, 16, 20], lines


class Broken(Tracker):
    name = "broken"

    def log_analysis(self, **kwargs):
        raise RuntimeError("tracker exploded")


def test_failing_tracker_does_not_break_training(tmp_path):
    lines = []
    cb = WeightWatcherCallback(start_fraction=0.0, output_dir=str(tmp_path / "ww"),
                               trackers=[Broken(), "local"], log_fn=lines.append)
    trainer = make_trainer(tmp_path, [cb], max_epochs=2)
    trainer.fit(make_model())
    assert trainer.state.finished and steps_of(cb) == [4, 8]
    assert sum("tracker exploded" in l for l in lines) == 1
    assert os.path.exists(tmp_path / "ww" / "report.html")
    assert "ww/alpha_mean" in trainer.callback_metrics


def test_wandb_logger_is_mapped_to_a_tracker(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="ww-test")
    cb = WeightWatcherCallback(start_fraction=0.0, output_dir=str(tmp_path / "ww"))
    trainer = Trainer(default_root_dir=str(tmp_path), callbacks=[cb], logger=logger, max_epochs=2,
                      limit_train_batches=4, limit_val_batches=1, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(make_model())
    names = [type(t).__name__ for t in cb.controller.trackers]
    run_dir = os.path.dirname(logger.experiment.dir)
    logger.experiment.finish()
    assert names == ["WandbTracker", "LocalTracker"]
    assert steps_of(cb) == [4, 8]
    import wandb

    from wandb_offline import read_offline_run

    wandb.teardown()
    data = read_offline_run(run_dir, timeout=120)  # waits only while the exit record is missing
    assert data["exited"]
    rows = [r for r in data["history"] if "ww/alpha_mean" in r]
    assert [r["trainer/global_step"] for r in rows] == [4, 8]  # Lightning's x-axis
    alpha_keys = [k for k in rows[-1] if k.startswith("ww_alpha/")]
    assert alpha_keys and sorted(alpha_keys) == [f"ww_alpha/{k}" for _, k in
                                                 cb.controller.trackers[0].keys.items()
                                                 if f"ww_alpha/{k}" in alpha_keys]
    assert rows[-1]["ww/layers/_type"] == "table-file"
    assert data["metrics"]["ww_alpha/*"] == "trainer/global_step"


def test_pytorch_lightning_trainer(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.demos.boring_classes import BoringModel as PLBoringModel

    cb = WeightWatcherCallback(start_fraction=0.0, output_dir=str(tmp_path / "ww"))
    make_trainer(tmp_path, [cb], trainer_cls=pl.Trainer, max_epochs=2).fit(make_model(PLBoringModel))
    assert steps_of(cb) == [4, 8]
    assert_consistent(cb, str(tmp_path / "ww"))


def test_state_key_and_validation():
    a = WeightWatcherCallback(every_n_steps=5)
    b = WeightWatcherCallback(every_n_epochs=2)
    assert a.state_key != b.state_key and a.state_key.startswith("WeightWatcherCallback{")
    with pytest.raises(ValueError, match="not both"):
        WeightWatcherCallback(every_n_epochs=1, every_n_steps=1)
    with pytest.raises(ValueError, match="start_fraction"):
        WeightWatcherCallback(start_fraction=2)


class SlowBoring(BoringModel):
    """Each training step sleeps, so a background analysis overlaps it measurably."""

    def training_step(self, batch, batch_idx):
        import time

        time.sleep(0.02)
        return super().training_step(batch, batch_idx)


def test_async_analysis_records_every_result_with_its_step(tmp_path):
    lines = []
    cb = _Callback(start_fraction=0.0, every_n_steps=2, output_dir=str(tmp_path / "ww"),
                   log_fn=lines.append)                       # async_analysis="auto" -> on
    model = make_model(SlowBoring)
    make_trainer(tmp_path, [cb]).fit(model)
    ctl = cb.controller
    assert ctl.asynchronous and not ctl.pending
    steps = steps_of(cb)
    # which due steps (2, 4, ..., 16) were skipped depends on the CPU's speed; each was analysed
    # or skipped, none twice, and the final weights (16) always analysed
    assert_due_steps_accounted_for(steps, lines, ctl, due=range(2, 17, 2))
    assert_consistent(cb, str(tmp_path / "ww"))
    # the final analysis is of the final weights: analysed in the background thread (other BLAS
    # threads than this one), so the default float32 result is compared with a float64 analysis
    # within the documented float32 bound (helpers.float32_alpha_tol), not bit for bit
    final = {r["name"]: r["alpha"] for r in cb.history.rows_at(16)}
    ref = ww_core.analyze(model, precision="float64")
    assert sorted(final) == sorted(ref.names)
    for layer in ref:
        assert_alpha_float32_close(final[layer.name], layer, layer.name)
    analysis_lines = [ln for ln in lines if ln.startswith("ww step") and "skipped" not in ln]
    assert ctl.blocking_seconds > 0 and all("training waited" in ln for ln in analysis_lines)
