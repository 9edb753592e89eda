"""Checkpoint state at the size of real runs (100+ layers, 100+ analyses), per-run folders and
the decisions file (numpy only)."""

import json
import os
import re

import pytest

from ww_callbacks import MEMORY_ONLY, Freeze
from ww_callbacks.controller import WeightWatcherController
from ww_core.result import AnalysisResult, LayerResult

pytestmark = pytest.mark.core

NAMES = [f"encoder.layer.{i}.attention.self.query" for i in range(120)]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def scripted(model, layers=None, **options):
    """120 layers; alphas drift with the step the model object carries, then settle."""
    step = model["step"]
    out = []
    for i, name in enumerate(NAMES):
        alpha = 3.0 + (i % 7) * 0.3 + 2.0 / (1 + step / 10)
        out.append(LayerResult(name=name, type="dense", N=768, M=768, num_evals=768, alpha=alpha,
                               alpha_hill=alpha, log_norm=alpha / 10, stable_rank=10.0 + i % 5))
    return AnalysisResult(layers=out)


def controller(out, **kw):
    kw.setdefault("trackers", None)
    return WeightWatcherController(every_n_steps=1, start_fraction=0.0, analyze_fn=scripted,
                                   async_analysis=False, log_fn=lambda line: None, output_dir=out,
                                   freeze=Freeze.suggest(window=2, tol=0.5, max_share=0.9),
                                   balance_lr="suggest", **kw)


def test_state_stays_small_whatever_the_number_of_analyses(tmp_path):
    out = str(tmp_path / "ww")
    ctl = controller(out)
    ctl.configure(total_steps=150, current_step=0)
    sizes, shapes = {}, {}
    for step in range(1, 151):
        ctl.maybe_run({"step": step}, step=step, epoch=0)
        if step in (12, 150):
            text = json.dumps(ctl.state_dict())
            sizes[step] = len(text)
            shapes[step] = len(NUMBER.sub("0", text))   # the size with every number cut to one digit
    assert ctl.history.steps == list(range(1, 151)) and len(ctl.history) == 150 * 120
    # Measured 35,103 / 35,108 bytes before the layer rotation's per-layer state (two values per
    # layer, ~15 kB at 120 layers) joined it: 49,416 / 50,610 bytes. The bound is that + 25 %; what
    # matters is below: the size does not grow with the analyses.
    assert sizes[150] <= 63_000, sizes
    assert shapes[150] == shapes[12], (shapes, sizes)    # does not grow with the analyses
    # every decision is on disk even though the state keeps only the latest ones
    with open(os.path.join(out, "decisions.jsonl")) as fh:
        kinds = [json.loads(line)["kind"] for line in fh]
    assert kinds.count("lr-factors-suggestion") == 150 and "freeze-suggestion" in kinds

    # resume at step 100 from that state: rows come back from the file, later ones are dropped
    state = ctl.state_dict()
    state["last_step"], state["history"]["last_step"] = 100, 100   # as saved at step 100
    ctl2 = controller(out)
    ctl2.load_state_dict(state)
    assert ctl2.history.steps == list(range(1, 101))
    ctl2.configure(total_steps=150, current_step=100)
    assert ctl2.history.steps == list(range(1, 101))
    with open(os.path.join(out, "history.jsonl")) as fh:
        assert max(json.loads(line)["step"] for line in fh) == 100   # the file was rewritten
    with open(os.path.join(out, "decisions.jsonl")) as fh:
        assert max(json.loads(line)["step"] for line in fh) == 100
    ctl2.maybe_run({"step": 101}, step=101, epoch=0)
    assert ctl2.history.steps[-2:] == [100, 101]


def test_memory_only_history_keeps_its_rows_in_the_state():
    ctl = controller(MEMORY_ONLY)
    ctl.configure(total_steps=3, current_step=0)
    for step in (1, 2, 3):
        ctl.maybe_run({"step": step}, step=step, epoch=0)
    other = controller(MEMORY_ONLY)
    other.load_state_dict(ctl.state_dict())
    assert other.history.steps == [1, 2, 3] and len(other.history) == 360


def test_a_missing_history_file_is_reported_not_fatal(tmp_path):
    out = str(tmp_path / "ww")
    ctl = controller(out)
    ctl.configure(total_steps=3, current_step=0)
    ctl.maybe_run({"step": 1}, step=1, epoch=0)
    state = ctl.state_dict()
    os.remove(os.path.join(out, "history.jsonl"))
    lines = []
    other = WeightWatcherController(output_dir=out, trackers=None, log_fn=lines.append)
    other.load_state_dict(state)
    assert len(other.history) == 0 and any("missing" in line for line in lines)


def test_each_run_gets_its_own_folder_and_a_resume_continues_in_it(tmp_path):
    base = str(tmp_path / "root")

    def run(current_step, steps, state=None):
        ctl = WeightWatcherController(every_n_steps=1, start_fraction=0.0, analyze_fn=scripted,
                                      async_analysis=False, trackers=["local"], log_fn=lambda line: None)
        if state is not None:
            ctl.load_state_dict(state)
        ctl.configure(total_steps=10, current_step=current_step, base_dir=base)
        for step in steps:
            ctl.maybe_run({"step": step}, step=step, epoch=0)
        ctl.close()
        return ctl

    first = run(0, [1, 2])
    second = run(0, [1])
    assert first.output_dir != second.output_dir
    assert sorted(os.listdir(base)) == sorted(os.path.basename(c.output_dir) for c in (first, second))
    assert os.path.exists(os.path.join(first.output_dir, "report.html"))
    resumed = run(2, [3], state=first.state_dict())           # from a checkpoint of the first
    assert resumed.output_dir == first.output_dir and resumed.history.steps == [1, 2, 3]
    latest = run(1, [2])                                      # no state: the latest run folder
    assert latest.output_dir == first.output_dir and latest.history.steps == [1, 2]


def test_the_run_folder_is_named_by_the_tracker_run_id(tmp_path):
    class WithId:
        name, run_id = "wandb", "3xk9a1b2"

        def log_analysis(self, **kw):
            pass

        def close(self):
            pass

    ctl = WeightWatcherController(analyze_fn=scripted, trackers="auto", log_fn=lambda line: None)
    ctl.configure(total_steps=10, current_step=0, trackers=[WithId()], base_dir=str(tmp_path))
    assert os.path.basename(ctl.output_dir) == "3xk9a1b2"


def test_a_resumed_report_keeps_the_earlier_decisions(tmp_path):
    out = str(tmp_path / "ww")
    ctl = controller(out, trackers=["local"])
    ctl.configure(total_steps=20, current_step=0)
    for step in range(1, 6):
        ctl.maybe_run({"step": step}, step=step, epoch=0)
    ctl.close()
    first = [json.loads(line)["step"] for line in open(os.path.join(out, "decisions.jsonl"))]
    resumed = controller(out, trackers=["local"])
    resumed.load_state_dict(ctl.state_dict())
    resumed.configure(total_steps=20, current_step=5)
    resumed.maybe_run({"step": 6}, step=6, epoch=0)
    resumed.close()
    decided = set()
    with open(os.path.join(out, "report-data.js"), encoding="utf-8") as fh:
        for line in fh:                   # ww_report.decide([[step, layer, action, ...], ...]);
            if line.startswith("ww_report.decide("):
                decided |= {d[0] for d in json.loads(line[len("ww_report.decide("):-3])}
    assert decided == set(first) | {6}


@pytest.mark.usefixtures("wandb_offline")
def test_the_run_folder_is_named_by_the_wandb_run(tmp_path):
    wandb = pytest.importorskip("wandb")
    from ww_callbacks.trackers.wandb import WandbTracker

    run = wandb.init(project="ww-run-dir", mode="offline", dir=str(tmp_path))
    try:
        ctl = WeightWatcherController(analyze_fn=scripted, trackers="auto", log_fn=lambda line: None)
        ctl.configure(total_steps=10, current_step=0, trackers=[WandbTracker(step_metric="step")],
                      base_dir=str(tmp_path / "ww"))
        assert os.path.basename(ctl.output_dir) == run.id
        ctl.close()
    finally:
        run.finish()
