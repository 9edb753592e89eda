"""The record's work per analysis does not grow with the run (counted, not timed): rows held in
memory, rows the report writes per analysis, PNG redraws per N analyses; unwritten rows are
bounded; partial analyses (layer rotation) keep each layer's latest value and show gaps."""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import pytest

from ww_callbacks.actions import mean_series_from_rows, series_from_rows
from ww_callbacks.controller import WeightWatcherController
from ww_callbacks.history import History, HistoryWarning
from ww_callbacks.trackers.local import LocalTracker
from ww_callbacks.trackers.report_html import TABLE_COLUMNS, build_data
from ww_core.result import AnalysisResult, LayerResult

pytestmark = pytest.mark.core

NUM_LAYERS = 40
NAMES = [f"blocks.{i // 4}.{('q', 'k', 'v', 'o')[i % 4]}_proj" for i in range(NUM_LAYERS)]


def layer(i, step):
    alpha = 2.5 + (i % 9) * 0.4 + 3.0 / (1 + step / 7)
    return LayerResult(name=NAMES[i], type="dense", N=96, M=96, num_evals=96, alpha=alpha,
                       alpha_hill=alpha + 0.1, log_norm=alpha / 10, stable_rank=10.0 + i % 5)


def full(model, layers=None, **options):
    return AnalysisResult(layers=[layer(i, model["step"]) for i in range(NUM_LAYERS)])


def rotating(model, layers=None, **options):
    """Odd steps analyse the first half of the layers, even steps the second half; layer 0 only at
    step 1 (as a frozen layer that is never analysed again)."""
    step = model["step"]
    half = range(1, NUM_LAYERS // 2) if step % 2 else range(NUM_LAYERS // 2, NUM_LAYERS)
    picked = ([0] if step == 1 else []) + list(half)
    return AnalysisResult(layers=[layer(i, step) for i in picked])


def controller(out, analyze_fn=full, **kw):
    return WeightWatcherController(every_n_steps=1, start_fraction=0.0, analyze_fn=analyze_fn,
                                   async_analysis=False, log_fn=lambda line: None, output_dir=out,
                                   **kw)


def test_rows_leave_memory_once_written_and_read_back_from_disk(tmp_path):
    ctl = controller(str(tmp_path / "ww"), trackers=["local"])
    ctl.configure(total_steps=100, current_step=0)
    (local,) = ctl.trackers
    held, rendered = [], []
    for step in range(1, 81):
        ctl.maybe_run({"step": step}, step=step, epoch=0)
        held.append(ctl.history.rows_in_memory)
        rendered.append(local.rows_rendered)
    ctl.close()
    assert max(held) == 0                         # every row is on disk, none kept in memory
    # the report writes the analysis' rows and the latest table: the same at analysis 2 and 80
    assert set(rendered[1:]) == {2 * NUM_LAYERS}
    # PNG: analyses 1, 2, 4, 8, 16, 32, then every 32nd (64), and once at the end
    assert local.num_plots == 8 and os.path.exists(local.plot_path)
    history = ctl.history
    assert len(history) == 80 * NUM_LAYERS and history.steps == list(range(1, 81))
    rows = list(history.rows)
    with open(history.jsonl_path) as fh:
        assert [(r["step"], r["name"]) for r in rows] == [(d["step"], d["name"]) for d in map(json.loads, fh)]
    assert [r["name"] for r in history.rows_at(33)] == NAMES and history.rows[-1]["step"] == 80
    # the actions' view: the same values as from every row, at no cost per analysis
    assert history.series("alpha") == {n: s[-history.index.window:]
                                       for n, s in series_from_rows(rows).items()}
    assert history.mean_series("alpha_hill") == pytest.approx(mean_series_from_rows(rows, "alpha_hill"))


def test_png_redraws_are_bounded_and_can_follow_every_analysis(tmp_path):
    pytest.importorskip("matplotlib")
    counts = {}
    for every, analyses in ((1, 5), (10, 30)):
        tracker = LocalTracker(str(tmp_path / str(every)), report=False, plot_every=every)
        for step in range(1, analyses + 1):
            rows = [dict(r, step=step) for r in full({"step": step}).to_records()]
            tracker.log_analysis(step=step, epoch=0, rows=rows, summary={}, result=None, history=rows)
        tracker.close()
        counts[every] = tracker.num_plots
    assert counts == {1: 5, 10: 7}       # 1, 2, 4, 8, then 10, 20, 30; close: nothing new
    with pytest.raises(ValueError, match="plot_every"):
        LocalTracker(str(tmp_path), plot_every=0)


def test_unwritten_rows_are_bounded_and_land_once_the_folder_takes_them(tmp_path):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the folder should be")
    history = History(str(blocker / "ww"), max_pending_rows=2 * NUM_LAYERS + 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 6):
            with pytest.raises(OSError):
                history.append([dict(r, step=step) for r in full({"step": step}).to_records()])
            assert history.rows_in_memory <= 2 * NUM_LAYERS + 5
    assert history.dropped_rows == 5 * NUM_LAYERS - (2 * NUM_LAYERS + 5)
    assert sum("dropped" in str(w.message) for w in caught if w.category is HistoryWarning) == 1
    blocker.unlink()                               # the disk takes writes again
    history.append([dict(r, step=6) for r in full({"step": 6}).to_records()])
    assert history.rows_in_memory == 0
    on_disk = [json.loads(line) for line in open(history.jsonl_path)]
    assert len(on_disk) == 3 * NUM_LAYERS + 5 and on_disk[-1]["step"] == 6
    assert [r["step"] for r in history.rows] == [r["step"] for r in on_disk]


def test_a_rank_that_does_not_write_keeps_the_newest_rows_only(tmp_path):
    history = History(str(tmp_path), write=False, max_pending_rows=3 * NUM_LAYERS)
    for step in range(1, 11):
        history.append([dict(r, step=step) for r in full({"step": step}).to_records()])
    assert history.rows_in_memory == 3 * NUM_LAYERS and history.steps == list(range(1, 11))
    assert {r["step"] for r in history.rows} == {8, 9, 10} and history.dropped_rows == 0
    assert not os.listdir(tmp_path)


def test_partial_analyses_keep_latest_values_and_show_gaps(tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "ww")
    ctl = controller(out, analyze_fn=rotating, trackers=["local"])
    ctl.configure(total_steps=10, current_step=0)
    for step in range(1, 7):
        ctl.maybe_run({"step": step}, step=step, epoch=0)
    ctl.close()
    latest = ctl.history.latest()
    assert list(latest) == [NAMES[0]] + NAMES[1:]          # first-seen order, every layer
    assert latest[NAMES[0]]["step"] == 1                   # measured once, kept with its step
    assert {latest[n]["step"] for n in NAMES[1:NUM_LAYERS // 2]} == {5}
    assert {latest[n]["step"] for n in NAMES[NUM_LAYERS // 2:]} == {6}
    assert ctl.history.series("alpha")[NAMES[-1]] == [layer(NUM_LAYERS - 1, s).alpha for s in (2, 4, 6)]

    # live report: partial chunks carry their layer indices; the latest table has every layer
    chunks = [json.loads(line[len("ww_report.add("):-3])
              for line in open(os.path.join(out, "report-data.js")) if line.startswith("ww_report.add(")]
    assert [c["s"] for c in chunks] == list(range(1, 7)) and all("i" in c for c in chunks[1:])
    assert chunks[1]["i"] == list(range(NUM_LAYERS // 2, NUM_LAYERS))
    line = open(os.path.join(out, "report-latest.js")).read()
    table = json.loads(line[len("ww_report.set_latest("):-3])["latest"]
    step_col = 1 + TABLE_COLUMNS.index("step")
    assert len(table) == NUM_LAYERS and table[0][step_col] == 1 and table[-1][step_col] == 6

    # the self-contained page: gaps where a layer was not analysed, not a carried value
    data = build_data(list(ctl.history.rows))
    grid = np.array([[math.nan if a is None else a for a in row] for row in data["alpha"]])
    assert np.isnan(grid[0, 1:]).all() and not np.isnan(grid[0, 0])
    assert np.isnan(grid[NUM_LAYERS // 2:, 0::2]).all() and not np.isnan(grid[NUM_LAYERS // 2:, 1::2]).any()
    assert [r[step_col] for r in data["latest"]] == [latest[n]["step"] for n in NAMES]


def test_wandb_heatmap_buffer_is_bounded_and_shows_gaps():
    pytest.importorskip("wandb")
    from ww_callbacks.trackers.wandb import WandbTracker

    tracker = WandbTracker(run=object(), heatmap_steps=4)
    history = []
    for step in range(1, 11):
        rows = [dict(r, step=step) for r in rotating({"step": step}).to_records()]
        history += rows
        if step == 1:
            tracker._start_heat(history)
        else:
            tracker.keys.update(r["name"] for r in rows)
            tracker._remember(step, rows)
    steps, names, grid, few, truncated = tracker._heatmap_grid(10)
    assert steps == [7, 8, 9, 10] and truncated and names == NAMES and len(tracker._heat) == 4
    assert np.isnan(grid[0]).all()                          # layer 0: only at step 1
    assert np.isnan(grid[NUM_LAYERS // 2:, 0::2]).all() and not np.isnan(grid[NUM_LAYERS // 2:, 1::2]).any()


def test_the_actions_do_not_read_the_written_rows_back(tmp_path, monkeypatch):
    """Auto-freeze and early stopping read the history's bounded windows: an analysis with both
    on never re-reads ``history.jsonl`` (whose length grows with the run)."""
    from ww_callbacks import EarlyStop, Freeze

    ctl = controller(str(tmp_path / "ww"), trackers=None, freeze=Freeze.suggest(),
                     early_stop=EarlyStop.suggest())
    ctl.configure(total_steps=100, current_step=0)
    reads = []
    real = ctl.history._iter_disk
    monkeypatch.setattr(ctl.history, "_iter_disk", lambda: reads.append(1) or real())
    for step in range(1, 31):
        ctl.maybe_run({"step": step}, step=step, epoch=0)
    ctl.close()
    assert ctl.num_analyses == 30 and reads == []
    assert ctl.action_set.freeze_policy.frozen      # (the actions did run: layers settled)
