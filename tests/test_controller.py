"""Framework-free tests of the schedule, the history, the controller and the local tracker."""

import csv
import json
import math
import os
import re
import subprocess
import sys

import pytest

from ww_callbacks import MEMORY_ONLY
from ww_callbacks.controller import WeightWatcherController
from ww_callbacks.history import read_jsonl
from ww_callbacks.schedule import Schedule
from ww_callbacks.trackers.base import Tracker
from ww_callbacks.trackers.local import LocalTracker
from ww_core.result import COLUMNS, AnalysisResult, LayerResult

# numpy/scipy only (fake or numpy analyses; the TensorBoard test skips itself without it)
pytestmark = pytest.mark.core


# ---------------------------------------------------------------------------- fakes
class FakeModel:
    """Stands for a model: the fake analysis reads ``alphas`` (name -> alpha)."""

    def __init__(self, alphas):
        self.alphas = dict(alphas)


def fake_analyze(model, layers=None, keep_evals=False, **options):
    fake_analyze.calls.append({"layers": layers, "keep_evals": keep_evals, **options})
    out = []
    for name, alpha in model.alphas.items():
        flags = ("under-trained",) if alpha > 6 else (("over-trained",) if alpha < 2 else ())
        out.append(LayerResult(name=name, type="dense", N=64, M=32, num_evals=32, alpha=alpha,
                               log_norm=alpha / 10, flags=flags,
                               warning=flags[0] if flags else ""))
    return AnalysisResult(layers=out)


fake_analyze.calls = []


class ListTracker(Tracker):
    name = "list"

    def __init__(self, wants_evals=False):
        self.calls, self.closed, self.wants_evals = [], 0, wants_evals

    def log_analysis(self, *, step, epoch, rows, summary, result, history):
        self.calls.append((step, epoch, len(rows), summary["alpha"], len(history)))

    def close(self):
        self.closed += 1


class BrokenTracker(Tracker):
    name = "broken"

    def __init__(self):
        self.calls = 0

    def log_analysis(self, **kwargs):
        self.calls += 1
        raise RuntimeError("backend down")


def make(tmp_path, **kw):
    lines = []
    kw.setdefault("output_dir", str(tmp_path / "ww"))
    kw.setdefault("trackers", ["local"])
    ctl = WeightWatcherController(log_fn=lines.append, analyze_fn=fake_analyze, **kw)
    return ctl, lines


MODEL = FakeModel({"fc1": 3.0, "fc2": 7.5, "fc3": float("nan")})


# ---------------------------------------------------------------------------- schedule
def test_schedule_steps_and_epochs():
    s = Schedule(start_fraction=0.5, every_n_steps=10)
    assert s.mode == "steps"
    assert s.configure(total_steps=100) is None
    assert [t for t in range(1, 101) if s.should_run(t, 0)] == [50, 60, 70, 80, 90, 100]
    assert not s.should_run(60, 0, epoch_end=True)  # epoch ends do not count in step mode

    e = Schedule(start_fraction=0.5, every_n_epochs=2)
    e.configure(total_steps=80, total_epochs=8)  # 10 steps per epoch
    due = [ep for ep in range(8) if e.should_run((ep + 1) * 10, ep, epoch_end=True)]
    assert due == [3, 5, 7]  # epochs 4, 6, 8 (1-based) once 40 steps are done
    assert not e.should_run(40, 3, epoch_end=False)


def test_schedule_start_fraction_edges():
    s0 = Schedule(start_fraction=0.0)
    s0.configure(total_steps=40, total_epochs=4)
    assert [ep for ep in range(4) if s0.should_run((ep + 1) * 10, ep, True)] == [0, 1, 2, 3]
    s1 = Schedule(start_fraction=1.0)
    s1.configure(total_steps=40, total_epochs=4)
    assert [ep for ep in range(4) if s1.should_run((ep + 1) * 10, ep, True)] == [3]
    s1 = Schedule(start_fraction=1.0, every_n_steps=7)
    s1.configure(total_steps=40)
    assert [t for t in range(1, 41) if s1.should_run(t, 0)] == []  # only the final analysis
    # a fraction that is not exact in binary: 0.3 * 10 -> start at step 3, not 4
    s = Schedule(start_fraction=0.3, every_n_steps=1)
    s.configure(total_steps=10)
    assert s.start_step == 3


def test_schedule_unknown_length_fallbacks():
    s = Schedule(start_fraction=0.5, every_n_steps=5)
    assert s.configure(total_steps=float("inf"), total_epochs=4) is None
    assert s.start_step is None and s.start_epoch == 2
    assert not s.should_run(100, 1) and s.should_run(105, 2)  # epochs decide when steps are unknown
    warning = s.configure(total_steps=-1, total_epochs=-1)
    assert "unknown" in warning
    assert s.should_run(5, 0)  # starts immediately
    assert Schedule(start_fraction=0.0).configure(None, None) is None  # nothing to warn about


@pytest.mark.parametrize("kwargs, match", [
    (dict(start_fraction=1.5), "start_fraction"),
    (dict(start_fraction=-0.1), "start_fraction"),
    (dict(start_fraction="half"), "start_fraction"),
    (dict(every_n_epochs=0), "every_n_epochs"),
    (dict(every_n_steps=2.5), "every_n_steps"),
    (dict(every_n_steps=True), "every_n_steps"),
    (dict(every_n_epochs=1, every_n_steps=10), "not both"),
])
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(every_n_steps=0), "every_n_steps"),
    (dict(layers="fc(("), "regex"),
    (dict(layers=[1]), "regex"),
    (dict(trackers=["nope"]), "unknown tracker"),
    (dict(trackers=[object()]), "neither a name nor a Tracker"),
    (dict(actions=[object()]), "on_analysis"),
    (dict(min_evalz=3), "unknown analysis option"),
    (dict(output_dir=3), "output_dir"),
])
def test_controller_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightWatcherController(**kwargs)  # the real ww_core.analyze signature is checked


# ---------------------------------------------------------------------------- controller + history
def test_run_writes_history_files_and_line(tmp_path):
    ctl, lines = make(tmp_path, start_fraction=0.0, min_evals=4)
    ctl.configure(total_steps=30, total_epochs=3, is_global_zero=True, current_step=0)
    for epoch in range(3):
        step = (epoch + 1) * 10
        assert ctl.should_run(step, epoch, epoch_end=True)
        assert ctl.run(MODEL, step=step, epoch=epoch) is not None
    assert ctl.run(MODEL, step=30, epoch=2) is None          # a step is analysed once
    assert not ctl.should_run(30, 2, epoch_end=True)
    assert ctl.finish(MODEL, step=30, epoch=2) is None       # final skipped: 30 was analysed
    # the local tracker asks for eigenvalues (ESDs of flagged layers in report.html)
    assert fake_analyze.calls[-1]["min_evals"] == 4 and fake_analyze.calls[-1]["keep_evals"] is True

    rows = ctl.history.rows
    assert [r["step"] for r in rows] == [10] * 3 + [20] * 3 + [30] * 3
    assert set(COLUMNS) | {"step", "epoch", "time"} <= set(rows[0])
    out = tmp_path / "ww"
    disk = read_jsonl(out / "history.jsonl")
    assert [(r["step"], r["name"]) for r in disk] == [(r["step"], r["name"]) for r in rows]
    assert math.isnan(disk[2]["alpha"]) and disk[1]["alpha"] == 7.5
    with open(out / "history.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == 9 and list(csv_rows[0])[:3] == ["step", "epoch", "time"]
    assert float(csv_rows[1]["alpha"]) == 7.5 and csv_rows[1]["flags"] == "under-trained"
    for line in (out / "history.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))

    assert re.fullmatch(r"ww step 10 epoch 0: mean alpha 5\.25 \(3 layers\), flagged: fc2 under-trained"
                        r" \[training waited \d+\.\d{3} s; overhead \d+\.\d%\]", lines[0]), lines[0]
    report = "".join(p.read_text() for p in sorted(out.glob("report*")))   # the page and its data
    assert all(name in report for name in ("fc1", "fc2", "fc3")) and '"under-trained"' in report
    assert (out / "alpha_over_time.png").read_bytes()[:4] == b"\x89PNG"


def test_start_fraction_one_leaves_only_final(tmp_path):
    ctl, _ = make(tmp_path, start_fraction=1.0)
    ctl.configure(total_steps=40, total_epochs=4)
    ran = [ep for ep in range(3) if ctl.should_run((ep + 1) * 10, ep, True)]
    assert ran == []
    ctl.finish(MODEL, step=37, epoch=3)  # e.g. stopped early: the final analysis still runs
    assert ctl.history.steps == [37]


def test_state_roundtrip_resume_drops_rows_after_checkpoint(tmp_path):
    ctl, _ = make(tmp_path, start_fraction=0.0, every_n_steps=5)
    ctl.configure(total_steps=40, current_step=0)
    for step in (5, 10):
        ctl.run(MODEL, step=step, epoch=0)
    state = json.loads(json.dumps(ctl.state_dict()))  # JSON-serialisable (HF stores JSON)
    for step in (15, 20):                              # ... then the run crashes at step 22
        ctl.run(MODEL, step=step, epoch=1)
    assert read_jsonl(tmp_path / "ww" / "history.jsonl")[-1]["step"] == 20

    # resume from the checkpoint taken at step 12
    new, _ = make(tmp_path, start_fraction=0.0, every_n_steps=5)
    new.load_state_dict(state)
    new.configure(total_steps=40, current_step=12)
    assert new.history.steps == [5, 10]
    assert read_jsonl(tmp_path / "ww" / "history.jsonl")[-1]["step"] == 10  # files rewritten
    assert not new.should_run(10, 0)
    for step in range(13, 41):
        if new.should_run(step, step // 10):
            new.run(MODEL, step=step, epoch=step // 10)
    new.finish(MODEL, step=40, epoch=3)
    assert new.history.steps == [5, 10, 15, 20, 25, 30, 35, 40]
    disk = read_jsonl(tmp_path / "ww" / "history.jsonl")
    assert [r["step"] for r in disk] == [r["step"] for r in new.history.rows]
    assert math.isnan(new.history.rows[2]["alpha"])  # None in the state came back as nan
    with open(tmp_path / "ww" / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(new.history.rows)


def test_resume_recovers_rows_analysed_after_the_checkpoint_was_saved(tmp_path):
    # Lightning saves the epoch-end checkpoint at validation end, before on_train_epoch_end runs
    # the analysis of that same step: the rows are on disk but not in the checkpoint.
    ctl, _ = make(tmp_path, start_fraction=0.0, every_n_steps=5)
    ctl.configure(total_steps=40, current_step=0)
    ctl.run(MODEL, step=5, epoch=0)
    state = ctl.state_dict()                  # checkpoint at step 10 ...
    ctl.run(MODEL, step=10, epoch=0)          # ... then the analysis of step 10
    ctl.run(MODEL, step=15, epoch=1)          # after the checkpoint: must go
    new, lines = make(tmp_path, start_fraction=0.0, every_n_steps=5)
    new.load_state_dict(state)
    new.configure(total_steps=40, current_step=10)
    assert new.history.steps == [5, 10] and len(new.history.rows) == 6
    assert not new.should_run(10, 0) and new.should_run(15, 1)
    assert "dropped 0" in lines[0] and "recovered 3" in lines[0]
    assert [r["step"] for r in read_jsonl(tmp_path / "ww" / "history.jsonl")] == [5] * 3 + [10] * 3


def test_fresh_run_starts_new_files(tmp_path):
    ctl, _ = make(tmp_path, start_fraction=0.0, every_n_steps=1)
    ctl.configure(total_steps=3, current_step=0)
    ctl.run(MODEL, step=1, epoch=0)
    again, _ = make(tmp_path, start_fraction=0.0, every_n_steps=1)
    again.configure(total_steps=3, current_step=0)
    assert read_jsonl(tmp_path / "ww" / "history.jsonl") == []


def test_failing_tracker_is_disabled_local_record_continues(tmp_path):
    broken, good = BrokenTracker(), ListTracker()
    ctl, lines = make(tmp_path, start_fraction=0.0, every_n_steps=1,
                      trackers=[broken, good, "local"])
    ctl.configure(total_steps=3)
    for step in (1, 2, 3):
        ctl.run(MODEL, step=step, epoch=0)
    assert broken.calls == 1 and len(good.calls) == 3
    errors = [l for l in lines if "backend down" in l]
    assert len(errors) == 1 and "tracker broken failed at step 1" in errors[0] and "disabled" in errors[0]
    assert len(read_jsonl(tmp_path / "ww" / "history.jsonl")) == 9
    ctl.finish(MODEL, step=3, epoch=0)
    assert good.closed == 1

    strict, _ = make(tmp_path, start_fraction=0.0, trackers=[BrokenTracker()], strict=True)
    strict.configure(total_steps=3)
    with pytest.raises(RuntimeError, match="backend down"):
        strict.run(MODEL, step=1, epoch=0)


def test_failing_analysis_reported_once(tmp_path):
    def boom(model, **kw):
        raise ValueError("bad weights")

    lines = []
    ctl = WeightWatcherController(start_fraction=0.0, every_n_steps=1, output_dir=MEMORY_ONLY,
                                  log_fn=lines.append, analyze_fn=boom)
    ctl.configure(total_steps=3)
    assert ctl.run(MODEL, step=1, epoch=0) is None and ctl.run(MODEL, step=2, epoch=0) is None
    assert len(lines) == 1 and "analysis at step 1 (epoch 0) failed: ValueError: bad weights" in lines[0]
    strict = WeightWatcherController(output_dir=MEMORY_ONLY, analyze_fn=boom, strict=True)
    strict.configure(total_steps=3)
    with pytest.raises(ValueError):
        strict.run(MODEL, step=1, epoch=0)


def test_actions_hook_and_events(tmp_path):
    seen = []

    class Action:
        def on_analysis(self, controller, result, step, epoch):
            seen.append((step, epoch, result.names, len(controller.history.rows)))
            controller.log_event(step=step, kind="note", payload={"n": 1})

    class EventTracker(ListTracker):
        def log_event(self, *, step, kind, payload):
            self.calls.append(("event", step, kind))

    tracker = EventTracker()
    ctl, lines = make(tmp_path, start_fraction=0.0, actions=[Action()], trackers=[tracker])
    ctl.configure(total_steps=4, total_epochs=2)
    ctl.run(MODEL, step=2, epoch=0)
    assert seen == [(2, 0, ["fc1", "fc2", "fc3"], 3)]
    assert tracker.calls[-1] == ("event", 2, "note")
    assert lines[0].startswith("ww step 2 epoch 0:") and "note" in lines[1]


def test_keep_evals_only_when_a_tracker_wants_them(tmp_path):
    ctl, _ = make(tmp_path, start_fraction=0.0, trackers=[ListTracker(wants_evals=True)])
    ctl.configure(total_steps=4)
    ctl.run(MODEL, step=1, epoch=0)
    assert fake_analyze.calls[-1]["keep_evals"] is True


def test_non_zero_rank_writes_nothing(tmp_path):
    tracker = ListTracker()
    ctl, lines = make(tmp_path, start_fraction=0.0, trackers=[tracker, "local"])
    ctl.configure(total_steps=4, is_global_zero=False)
    ctl.run(MODEL, step=1, epoch=0)
    ctl.finish(MODEL, step=4, epoch=0)
    assert len(ctl.history.rows) == 6  # analysed (actions could use it) ...
    assert not (tmp_path / "ww").exists() and lines == [] and tracker.calls == []  # ... but silent


def test_auto_trackers_and_framework_trackers(tmp_path):
    fw = ListTracker()
    ctl, _ = make(tmp_path, start_fraction=0.0, trackers="auto")
    ctl.configure(total_steps=4, trackers=[fw])
    assert [type(t).__name__ for t in ctl.trackers] == ["ListTracker", "LocalTracker"]
    named, _ = make(tmp_path, trackers=["local"])
    named.configure(total_steps=4, trackers=[fw])
    assert [type(t).__name__ for t in named.trackers] == ["LocalTracker"]
    none, _ = make(tmp_path, trackers=None)
    none.configure(total_steps=4, trackers=[fw])
    assert none.trackers == []


def test_format_line_truncates_flagged():
    model = FakeModel({f"l{i}": 7.0 for i in range(8)})
    line = WeightWatcherController.format_line(fake_analyze(model), step=5, epoch=1)
    assert line.startswith("ww step 5 epoch 1: mean alpha 7.00 (8 layers), flagged: l0 under-trained")
    assert line.endswith("+3 more")


def test_local_tracker_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    lines = []
    tracker = LocalTracker(str(tmp_path), log_fn=lines.append)
    history = []
    for step in (1, 2):
        rows = [{"step": step, "epoch": 0, **r} for r in fake_analyze(MODEL).to_records()]
        history += rows
        tracker.log_analysis(step=step, epoch=0, rows=rows, summary={}, result=None, history=history)
    assert len(lines) == 1 and "matplotlib" in lines[0]
    assert not (tmp_path / "alpha_over_time.png").exists()
    report = "".join(p.read_text() for p in sorted(tmp_path.glob("report*")))   # page and data
    assert "<html" in report and "fc2" in report          # drawn without matplotlib


def test_package_import_is_light():
    code = ("import sys, ww_callbacks, ww_callbacks.trackers; "
            "from ww_callbacks import WeightWatcherController, __version__; "
            "heavy = [m for m in ('torch', 'lightning', 'pytorch_lightning', 'wandb', 'mlflow', "
            "'tensorboard', 'transformers', 'keras', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_named_trackers_without_a_trainer_write_under_output_dir(tmp_path):
    pytest.importorskip("tensorboard")
    ctl, _ = make(tmp_path, trackers=["tensorboard"])
    ctl.configure(total_steps=10, current_step=0)
    ctl.run(MODEL, step=10, epoch=0)
    ctl.close()
    events = list((tmp_path / "ww" / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from ww_callbacks.trackers.base import LayerKeys

    ea = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    got = {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    for tag in ea.Tags()["tensors"]:  # tensor-based scalars (tensorboard's own writer), not the layout
        arrays = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in ea.Tensors(tag)]
        if all(a.shape == () and a.dtype.kind == "f" for _, a in arrays):
            got[tag] = [(step, float(a)) for step, a in arrays]
    keys = LayerKeys()
    keys.update(MODEL.alphas)
    # the finite alphas, one point each at step 10; fc3's nan is not logged
    alpha_tags = {t for t in got if t.startswith("ww_alpha/")}
    assert alpha_tags == {f"ww_alpha/{keys['fc1']}", f"ww_alpha/{keys['fc2']}"}, sorted(got)
    assert got[f"ww_alpha/{keys['fc1']}"] == [(10, 3.0)] and got[f"ww_alpha/{keys['fc2']}"] == [(10, 7.5)]
    assert got["ww/alpha_mean"] == [(10, 5.25)] and got["ww/num_layers"] == [(10, 3.0)]
    assert got["ww/num_under_trained"] == [(10, 1.0)]


def test_async_checkpoint_state_does_not_wait_and_waits_are_counted(tmp_path):
    import threading

    import numpy as np

    import ww_core

    gate = threading.Event()          # the background analysis cannot finish before it is set

    def slow_analyze(source, **kw):
        gate.wait(timeout=60)          # (the timeout only guards against a hang)
        return ww_core.analyze(source, **kw)

    sd = {"fc.weight": np.random.default_rng(0).standard_normal((200, 100))}
    ctl = WeightWatcherController(output_dir=str(tmp_path / "ww"), trackers=None, log_fn=None,
                                  analyze_fn=slow_analyze, async_analysis=True)
    ctl.configure(total_steps=10, current_step=0)
    assert ctl.run(sd, step=5, epoch=0) is None and ctl.pending
    state = ctl.state_dict()                       # a checkpoint while it runs: no waiting
    assert ctl.pending                             # (it returned with the analysis unfinished)
    assert state["last_step"] is None and state["history"] == ctl.history.state_dict()
    before = ctl.blocking_seconds
    threading.Timer(0.1, gate.set).start()         # released while poll() waits for it
    assert ctl.poll(wait=True) is not None          # training waits here: counted
    assert ctl.blocking_seconds > before            # (how long is not asserted: no timing)
    assert ctl.state_dict()["last_step"] == 5 and ctl.history.steps == [5]
    ctl.close()
