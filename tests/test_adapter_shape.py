"""The one adapter shape: controller= on every callback, the controller on its own (context
manager, bind_actions, state files), @override, and the pytorch_lightning import name."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ww_callbacks import MEMORY_ONLY, EarlyStop
from ww_callbacks.adapter import override
from ww_callbacks.controller import WeightWatcherController


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.standard_normal((120, 60)), "b.weight": rng.standard_normal((90, 60))}


def _ctl(tmp_path=None, **kw):
    kw.setdefault("output_dir", str(tmp_path / "ww") if tmp_path is not None else MEMORY_ONLY)
    kw.setdefault("trackers", None)
    kw.setdefault("log_fn", lambda line: None)
    kw.setdefault("async_analysis", False)
    return WeightWatcherController(**kw)


@pytest.mark.core
def test_context_manager_runs_the_schedule_and_a_final_analysis(tmp_path):
    with _ctl(tmp_path, every_n_steps=4, start_fraction=0.0) as ww:
        ww.configure(total_steps=10)
        for step in range(1, 11):
            ww.maybe_run(_weights(), step=step, epoch=0)
    assert ww.history.steps == [4, 8, 10]          # 10: the final analysis when the block ends
    assert ww.finished
    lines = open(tmp_path / "ww" / "history.jsonl").read().splitlines()
    assert sorted({json.loads(line)["step"] for line in lines}) == [4, 8, 10]


@pytest.mark.core
def test_context_manager_closes_without_final_analysis_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with _ctl(tmp_path, every_n_steps=4, start_fraction=0.0) as ww:
            ww.configure(total_steps=10)
            for step in range(1, 7):
                ww.maybe_run(_weights(), step=step, epoch=0)
            raise RuntimeError("boom")
    assert ww.history.steps == [4] and ww.finished


@pytest.mark.core
def test_maybe_run_follows_the_schedule_mode():
    ww = _ctl(every_n_epochs=1, start_fraction=0.0)
    ww.configure(total_steps=6, total_epochs=2)
    assert ww.maybe_run(_weights(), step=3, epoch=0) is None          # epoch schedule: not a step
    assert ww.maybe_run(_weights(), step=3, epoch=0, epoch_end=True) is not None
    assert ww.history.steps == [3]


@pytest.mark.core
def test_apply_modes_need_their_framework_functions():
    ww = _ctl(freeze="apply")
    with pytest.raises(ValueError, match="freeze_fn"):
        ww.configure(total_steps=10)
    with pytest.raises(ValueError, match="lr_fn"):
        _ctl(balance_lr=True).bind_actions()
    calls = []
    ww.bind_actions(freeze_fn=lambda f, u: calls.append((f, u)))
    ww.configure(total_steps=10)                   # bound: no error


@pytest.mark.core
def test_early_stop_sets_stop_reason_and_calls_stop_fn():
    alphas = iter([3.0, 3.0, 3.0, 3.0])

    def scripted(source, **kw):
        import ww_core

        res = ww_core.analyze(source, **kw)
        value = next(alphas)
        for layer in res.layers:
            layer.alpha = value
        return res

    stops = []
    ww = _ctl(every_n_steps=1, start_fraction=0.0, early_stop=EarlyStop.apply(patience=2),
              analyze_fn=scripted)
    ww.bind_actions(stop_fn=stops.append)
    ww.configure(total_steps=4)
    for step in range(1, 5):
        ww.maybe_run(_weights(), step=step, epoch=0)
        if ww.stop_reason:
            break
    assert ww.stop_reason and stops == [ww.stop_reason] and "improved" in ww.stop_reason


@pytest.mark.core
def test_save_state_and_load_state_round_trip_atomically(tmp_path):
    ww = _ctl(tmp_path, every_n_steps=2, start_fraction=0.0, freeze="suggest")
    ww.configure(total_steps=4)
    for step in range(1, 5):
        ww.maybe_run(_weights(), step=step, epoch=0)
    path = str(tmp_path / "ckpt" / "ww_state.json")
    ww.save_state(path, global_step=4)
    assert not [p for p in os.listdir(tmp_path / "ckpt") if ".tmp" in p]   # no temp file left
    other = _ctl(tmp_path / "b", every_n_steps=2, freeze="suggest")
    assert other.load_state(path) == {"global_step": 4}
    assert other.history.steps == [2, 4] and other.last_step == 4
    assert other.action_set.state_dict() == ww.action_set.state_dict()
    assert other.load_state(str(tmp_path / "missing.json")) is None
    with open(path, "w") as fh:
        fh.write("[1, 2]")
    with pytest.raises(ValueError, match="state"):
        other.load_state(path)


@pytest.mark.core
def test_override_rejects_a_misspelt_hook():
    class Base:
        def on_train_end(self):
            return "base"

    class Good(Base):
        @override
        def on_train_end(self):
            return "good"

    assert Good().on_train_end() == "good" and Good.on_train_end.__override__
    with pytest.raises((TypeError, RuntimeError)) as info:
        class Bad(Base):
            @override
            def on_train_ends(self):
                pass
    cause = info.value if isinstance(info.value, TypeError) else info.value.__cause__
    assert "on_train_ends" in str(cause)


def test_every_adapter_takes_an_existing_controller(tmp_path):
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    pytest.importorskip("keras")
    from ww_callbacks import huggingface, keras, lightning

    for module in (lightning, huggingface, keras):
        ctl = _ctl(tmp_path, freeze="suggest")
        cb = module.WeightWatcherCallback(controller=ctl)
        assert cb.controller is ctl and cb.history is ctl.history
        with pytest.raises(ValueError, match="not both"):
            module.WeightWatcherCallback(controller=ctl, every_n_steps=3)
        with pytest.raises(ValueError, match="WeightWatcherController"):
            module.WeightWatcherCallback(controller="ctl")
        with pytest.raises(ValueError, match="every_n_steps"):   # validated at construction
            module.WeightWatcherCallback(every_n_steps=0)


def test_lightning_fit_with_a_shared_controller(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    import torch

    from ww_callbacks.lightning import WeightWatcherCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.body(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 16), torch.randint(0, 4, (64,)))
    ctl = _ctl(tmp_path, every_n_epochs=1, start_fraction=0.0)
    cb = WeightWatcherCallback(controller=ctl)
    pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=str(tmp_path)).fit(Net(), torch.utils.data.DataLoader(data, batch_size=16))
    assert ctl.history.steps == [4, 8] and ctl.finished


def test_pytorch_lightning_trainer_gets_its_own_callback_class(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from ww_callbacks.pytorch_lightning import WeightWatcherCallback

    cb = WeightWatcherCallback(every_n_epochs=1, output_dir=str(tmp_path / "ww"))
    assert isinstance(cb, pl.Callback)
    pl.Trainer(callbacks=[cb], logger=False, max_epochs=1)   # accepted by pytorch_lightning


@pytest.mark.slow
def test_pytorch_lightning_installed_alone(tmp_path):
    """Without ``lightning``, ``ww_callbacks.lightning`` itself builds on pytorch_lightning."""
    pytest.importorskip("pytorch_lightning")
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
            "import pytorch_lightning as pl\n"
            "from ww_callbacks.lightning import WeightWatcherCallback as A\n"
            "from ww_callbacks.pytorch_lightning import WeightWatcherCallback as B\n"
            "assert A is B and issubclass(A, pl.Callback), A.__mro__\n"
            "assert 'lightning.pytorch' not in {m.__module__.split('.callbacks')[0] for m in A.__mro__}\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.slow
def test_plain_pytorch_loop_example_freezes_and_reports(tmp_path):
    pytest.importorskip("sklearn")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
    try:
        import plain_pytorch_loop
    finally:
        sys.path.pop(0)
    out = plain_pytorch_loop.main(["--epochs", "6", "--out", str(tmp_path / "plain")])
    assert out["accuracy"] > 0.8
    assert out["steps"] and out["steps"][-1] == 6 * 23          # final analysis at the last step
    assert os.path.exists(tmp_path / "plain" / "report.html")
    assert "4" not in out["frozen"]                              # the output head is protected
