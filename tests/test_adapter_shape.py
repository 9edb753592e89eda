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
def test_one_resume_mechanism_in_the_controller_redoes_a_lost_analysis(tmp_path):
    import threading

    import ww_core

    gate = threading.Event()

    def held(source, **options):          # the analysis of step 6 is in flight at the "crash"
        gate.wait(30)
        return ww_core.analyze(source, **options)

    first = _ctl(tmp_path, every_n_steps=2, start_fraction=0.0, freeze="suggest")
    first.configure(total_steps=10, current_step=0)
    for step in range(1, 5):
        first.maybe_run(_weights(step), step=step, epoch=0)
    first.executor.analyze_fn, first.executor.asynchronous = held, True
    first.maybe_run(_weights(6), step=6, epoch=1)          # submitted, never recorded
    saved = json.load(open(tmp_path / "ww" / "ww_state.json"))["states"]
    assert [s["started"] for s in saved] == [[2, 0], [4, 0], [6, 1]]
    gate.set()                                              # the process "died": nothing records it

    # a new process resumes from the checkpoint at step 6: only the step and the weights given
    resumed = _ctl(tmp_path, every_n_steps=2, start_fraction=0.0, freeze="suggest")
    resumed.configure(total_steps=10, current_step=6, model=_weights(6))
    assert resumed.state.restored and resumed.history.steps == [2, 4, 6]
    assert resumed.history.rows_at(6)[0]["epoch"] == 1
    for step in range(7, 11):
        resumed.maybe_run(_weights(step), step=step, epoch=1)
    resumed.close()
    lines = [json.loads(line) for line in open(tmp_path / "ww" / "history.jsonl")]
    assert [r["step"] for r in lines] == [s for s in (2, 4, 6, 8, 10) for _ in range(2)]

    # from an older checkpoint (step 4, recorded): the state of step 4, later rows dropped, no redo
    older = _ctl(tmp_path, every_n_steps=2, start_fraction=0.0, freeze="suggest")
    older.configure(total_steps=10, current_step=4, model=_weights(4))
    assert older.history.steps == [2, 4] and older.last_step == 4 and older.state.started == (4, 0)


@pytest.mark.core
def test_adapters_hold_no_resume_logic_beyond_passing_the_step():
    import ww_callbacks

    folder = os.path.dirname(ww_callbacks.__file__)
    for name in ("lightning.py", "huggingface.py", "keras.py"):
        src = open(os.path.join(folder, name)).read()
        for word in ("load_state(", "save_state(", '"ww_state', "STATE_FILE", "latest_run_dir",
                     "checkpoint-", "state_path", "read_json", "write_json"):
            assert word not in src, (name, word)
        assert src.count("current_step=") == 1 and src.count("model=") >= 1, name


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
