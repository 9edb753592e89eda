"""The overhead budget (``max_overhead``): analyses skipped or spaced to hold the share, counted
with an injected clock (no timing), and the realised share reported."""

import os
import threading

import numpy as np
import pytest

import ww_core
from ww_callbacks import MEMORY_ONLY, WeightWatcherController
from ww_callbacks.budget import OverheadBudget, check_max_overhead, lower_thread_priority

WEIGHTS = {"fc.weight": np.random.default_rng(0).standard_normal((64, 32)),
           "fc2.weight": np.random.default_rng(1).standard_normal((48, 32))}


class Clock:
    """A clock the test moves: one unit per training step, ``cost`` units per analysis."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _run(max_overhead, steps=20, cost=1.0, **kw):
    clock, lines = Clock(), []

    def analyze(source, **options):
        clock.t += cost                       # the analysis "takes" cost units
        return ww_core.analyze(source, **options)

    budget = OverheadBudget(max_overhead, clock=clock) if max_overhead is not None else None
    ctl = WeightWatcherController(every_n_steps=1, start_fraction=0, output_dir=MEMORY_ONLY,
                                  trackers=None, log_fn=lines.append, async_analysis=False,
                                  analyze_fn=analyze, max_overhead=budget, **kw)
    ctl.configure(total_steps=steps)
    overheads = {}
    for step in range(1, steps + 1):
        clock.t += 1.0                        # one training step
        if ctl.maybe_run(WEIGHTS, step=step, epoch=0) is not None:
            overheads[step] = ctl.last_scalars.get("overhead")
    ctl.finish(WEIGHTS, step=steps, epoch=0)
    return ctl, overheads, lines


def test_analyses_are_spaced_to_hold_the_share():
    # 0.25: after the first analysis (1 unit), the k-th needs k units <= 0.25 x training steps
    ctl, overheads, lines = _run(0.25)
    assert ctl.history.steps == [1, 8, 12, 16, 20], lines
    assert ctl.budget.skipped == 15 and ctl.skipped_analyses == 0
    assert overheads == {1: 1.0, 8: 0.25, 12: 0.25, 16: 0.25, 20: 0.25}
    assert ctl.budget.spent == 5.0 and ctl.budget.training_seconds() == 20.0
    assert sum("skipped to hold max_overhead=0.25" in ln for ln in lines) == 1   # logged once
    assert lines[-1].endswith("[training waited 0.000 s; overhead 25.0%, 15 skipped by max_overhead]") \
        or "overhead 25.0%, 15 skipped by max_overhead" in lines[-1]


def test_a_cheaper_analysis_or_a_larger_budget_analyses_more():
    fewer = _run(0.25, steps=40)[0].num_analyses
    assert _run(0.5, steps=40)[0].num_analyses > fewer
    assert _run(0.25, steps=40, cost=0.5)[0].num_analyses > fewer


def test_without_a_cap_every_analysis_runs_and_the_share_is_reported():
    ctl, overheads, _ = _run(None, steps=10)
    assert ctl.history.steps == list(range(1, 11)) and ctl.budget.skipped == 0
    assert all(v is not None and v >= 0 for v in overheads.values())


def test_the_final_analysis_obeys_the_budget_but_a_run_keeps_one():
    clock = Clock()

    def analyze(source, **options):
        clock.t += 1.0
        return ww_core.analyze(source, **options)

    ctl = WeightWatcherController(every_n_epochs=1, start_fraction=1.0, output_dir=MEMORY_ONLY,
                                  trackers=None, log_fn=lambda line: None, async_analysis=False,
                                  analyze_fn=analyze, max_overhead=OverheadBudget(0.01, clock=clock))
    ctl.configure(total_steps=5, total_epochs=1)
    clock.t += 5.0
    ctl.finish(WEIGHTS, step=5, epoch=0)         # nothing analysed yet: the final one runs
    assert ctl.history.steps == [5]


def test_the_clock_follows_the_device():
    import torch

    b = OverheadBudget(0.05)
    b.use_device(torch.nn.Linear(4, 4))
    assert b.mode == "cpu" and b.thread_clock is not b.process_clock
    assert OverheadBudget(0.05, clock="wall").mode == "wall"


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, True, "5%", float("nan")])
def test_bad_shares_are_refused(bad):
    with pytest.raises(ValueError, match="max_overhead"):
        WeightWatcherController(max_overhead=bad)


def test_bad_budget_settings_are_refused():
    for kw in ({"clock": "gpu"}, {"nice": 20}, {"nice": -1}, {"threads": 0}):
        with pytest.raises(ValueError, match="max_overhead"):
            OverheadBudget(0.05, **kw)
    assert check_max_overhead(None).max_overhead is None


def test_the_background_thread_lowers_only_its_own_priority_and_threads():
    import torch

    if not hasattr(os, "getpriority") or not hasattr(threading, "get_native_id"):
        pytest.skip("per-thread priority is a Linux feature")
    main_nice, main_threads = os.getpriority(os.PRIO_PROCESS, 0), torch.get_num_threads()
    seen = {}

    def worker():
        lower_thread_priority(nice=5, threads=1)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen["threads"] = torch.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"nice": min(main_nice + 5, 19), "threads": 1}
    assert os.getpriority(os.PRIO_PROCESS, 0) == main_nice and torch.get_num_threads() == main_threads


def test_async_analyses_are_charged_on_the_worker_thread(tmp_path):
    clock = Clock()

    def analyze(source, **options):
        clock.t += 1.0
        return ww_core.analyze(source, **options)

    lines = []
    ctl = WeightWatcherController(every_n_steps=1, start_fraction=0, output_dir=MEMORY_ONLY,
                                  trackers=None, log_fn=lines.append, async_analysis=True,
                                  analyze_fn=analyze, max_overhead=OverheadBudget(0.25, clock=clock))
    ctl.configure(total_steps=12)
    for step in range(1, 13):
        clock.t += 1.0
        ctl.maybe_run(WEIGHTS, step=step, epoch=0)
        ctl.poll(wait=True)                  # deterministic: the analysis is recorded at once
    assert ctl.history.steps == [1, 8, 12] and ctl.budget.spent == 3.0, lines


def test_a_lightning_fit_with_an_analysis_every_step_still_analyses(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from ww_callbacks.lightning import WeightWatcherCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 32, generator=g), torch.randint(0, 10, (256,), generator=g))
    cb = WeightWatcherCallback(every_n_steps=1, start_fraction=0, max_overhead=0.05,
                               output_dir=str(tmp_path / "ww"), trackers=None,
                               log_fn=lambda line: None)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         default_root_dir=str(tmp_path))
    trainer.fit(Net(), DataLoader(data, batch_size=16))
    ctl = cb.controller
    assert ctl.budget.max_overhead == 0.05 and ctl.budget.mode == "cpu"
    assert ctl.num_analyses >= 1                       # the first always runs
    assert ctl.num_analyses + ctl.budget.skipped + ctl.skipped_analyses >= 32   # every step asked
    assert ctl.budget.charged == ctl.num_analyses
    assert "overhead" in ctl.last_scalars and ctl.last_scalars["overhead"] >= 0
