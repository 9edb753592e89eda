"""A tracker that hangs or keeps failing never blocks or breaks training (real Lightning fit)."""

import threading

import pytest

from helpers import TRACKER_TIMEOUT
from ww_callbacks.trackers.base import Tracker

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from ww_callbacks.lightning import WeightWatcherCallback  # noqa: E402

pytestmark = pytest.mark.slow


class Hanging(Tracker):
    """Never returns from its second call (a dead server)."""

    name = "hanging"

    def __init__(self):
        self.calls, self.release = 0, threading.Event()

    def log_analysis(self, **kw):
        self.calls += 1
        if self.calls >= 2:
            self.release.wait()          # released only at the end of the test

    def close(self):
        pass


class Recorder(Tracker):
    name = "recorder"

    def __init__(self):
        self.steps = []

    def log_analysis(self, *, step, **kw):
        self.steps.append(step)


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))

    def training_step(self, batch, _):
        return self.body(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


#: How long the training thread waits for the call that hangs: the behaviour under test.
HANG_TIMEOUT = 0.5
#: Every other tracker call (the local tracker draws a PNG: ~0.8 s cold on 2 busy cores): far
#: above any healthy call, so only a real hang is ever dropped, on any machine.
CALL_TIMEOUT = TRACKER_TIMEOUT


class Arm(Tracker):
    """Called just before ``hanging``: shortens the fan-out's timeout for the call that will hang.

    The fan-out has one timeout for every tracker (``tracker_timeout``) and reads it at each call;
    the test's ``log_fn`` restores the long one when the drop is reported, which happens in the
    training thread before the next tracker is called.
    """

    name = "arm"

    def __init__(self, hanging):
        self.hanging, self.fan_out = hanging, None

    def log_analysis(self, **kw):
        if self.hanging.calls == 1:          # its next call (this analysis) never returns
            self.fan_out.timeout = HANG_TIMEOUT


def test_a_hung_tracker_is_dropped_and_training_finishes(tmp_path):
    hanging, recorder, lines = Hanging(), Recorder(), []
    arm = Arm(hanging)

    def log(line):
        lines.append(line)
        if "did not answer" in line:
            arm.fan_out.timeout = CALL_TIMEOUT

    cb = WeightWatcherCallback(every_n_epochs=1, start_fraction=0.0, async_analysis=False,
                               output_dir=str(tmp_path / "ww"),
                               trackers=[arm, hanging, recorder, "local"], log_fn=log,
                               tracker_timeout=CALL_TIMEOUT)
    arm.fan_out = cb.controller._fan_out     # (private: no public per-tracker timeout)
    assert arm.fan_out.timeout == CALL_TIMEOUT
    data = torch.utils.data.TensorDataset(torch.randn(32, 16))
    trainer = pl.Trainer(max_epochs=4, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    try:
        trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=16))
    finally:
        hanging.release.set()
    assert trainer.current_epoch == 4
    assert recorder.steps == cb.history.steps == [2, 4, 6, 8]      # the others got every analysis
    assert hanging.calls == 2                                       # dropped after the hung call
    dropped = [line for line in lines if "did not answer" in line]
    assert len(dropped) == 1 and "hanging" in dropped[0] and "step 4" in dropped[0], lines
    assert f"within {HANG_TIMEOUT:g} s" in dropped[0]
    assert [type(t).__name__ for t in cb.controller.trackers] == ["Arm", "Recorder", "LocalTracker"]
    assert (tmp_path / "ww" / "report.html").exists()


def test_strict_calls_trackers_in_the_training_thread(tmp_path):
    from ww_callbacks import MEMORY_ONLY
    from ww_callbacks.controller import WeightWatcherController

    seen = []

    class Where(Tracker):
        def log_analysis(self, **kw):
            seen.append(threading.current_thread() is threading.main_thread())

    import numpy as np

    for strict, expected in ((True, True), (False, False)):
        ctl = WeightWatcherController(output_dir=MEMORY_ONLY, trackers=[Where()], strict=strict,
                                      async_analysis=False, log_fn=lambda line: None)
        ctl.configure(total_steps=2)
        ctl.run({"w.weight": np.random.default_rng(0).standard_normal((64, 32))}, step=1, epoch=0)
        assert seen[-1] is expected
        ctl.close()
