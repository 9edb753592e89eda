"""The actions end to end through the public callbacks, in real (tiny, CPU) trainer runs.

* early stop by patience (Lightning and the HF Trainer): training stops at the analysis where the
  scripted mean alpha has not improved for ``patience`` analyses, and the reason is logged;
* ``Freeze`` ``protect=`` and ``unfreeze=``/``unfreeze_margin`` (Lightning): a protected
  layer is never frozen although it is the first candidate; a frozen layer whose alpha leaves the
  band by more than the margin gets ``requires_grad`` back and its weights move again;
* a custom action that raises at every analysis is reported once, the built-in actions and the
  actions after it still run at every analysis, and training completes;
* ``freeze="apply"`` under Lightning DDP without ``find_unused_parameters`` raises ``ValueError``
  (the check on a real ``DDPStrategy`` Trainer, in process; a real 2-process run in
  tests/test_ddp_freeze.py).

Decisions depend on alphas, so the alphas are scripted through ``analyze_fn``: the real
``ww_core.analyze`` runs on the model and the alphas of its result are then replaced by the
script's values (per analysis, per layer). Nothing depends on timing or float rounding.
"""

import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

from lightning.pytorch import Callback, Trainer  # noqa: E402
from lightning.pytorch.demos.boring_classes import BoringModel  # noqa: E402

import ww_core  # noqa: E402
from ww_callbacks import EarlyStop, Freeze  # noqa: E402
from ww_callbacks.lightning import WeightWatcherCallback  # noqa: E402
from ww_callbacks.trackers.base import Tracker  # noqa: E402
from ww_core.result import AnalysisResult, replace  # noqa: E402

pytestmark = pytest.mark.slow

# analysed (64x64 or 32x64 Linear layers); the 64x2 head has 2 eigenvalues and is skipped, so the
# output head of the freeze policy is layer.8
ANALYSED = ["layer.0", "layer.2", "layer.4", "layer.6", "layer.8"]


# --------------------------------------------------------------------------- helpers
class Scripted:
    """An ``analyze_fn``: the real analysis, with each layer's alpha (and alpha_hill) replaced by
    ``script(i, name)`` where ``i`` counts the analyses from 0. Fits are marked clean."""

    def __init__(self, script):
        self.script, self.calls = script, 0

    def __call__(self, source, **options):
        res = ww_core.analyze(source, **options)
        i, self.calls = self.calls, self.calls + 1
        layers = []
        for layer in res.layers:
            a = float(self.script(i, layer.name))
            layers.append(replace(layer, alpha=a, alpha_hill=a, status="success", flags=(),
                                  warning=""))
        return AnalysisResult(layers=layers, skipped=list(res.skipped), options=dict(res.options))


class Events(Tracker):
    name = "events"

    def __init__(self):
        self.events = []

    def log_analysis(self, **kw):
        pass

    def log_event(self, *, step, kind, payload):
        self.events.append((step, kind, payload))

    def kinds(self, kind):
        return [(s, p) for s, k, p in self.events if k == kind]


class Model(BoringModel):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        dims = [32, 64, 64, 64, 64, 64]
        mods = []
        for a, b in zip(dims, dims[1:]):
            mods += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        self.layer = torch.nn.Sequential(*mods, torch.nn.Linear(64, 2))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)


def make_trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_epochs", 3)
    kw.setdefault("limit_train_batches", 4)
    return Trainer(default_root_dir=str(tmp_path), callbacks=callbacks, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, **kw)


def ww(tmp_path, **kw):
    kw.setdefault("start_fraction", 0.0)
    kw.setdefault("async_analysis", False)      # decisions at the analysed step (reproducible)
    return WeightWatcherCallback(output_dir=str(tmp_path / "ww"), **kw)


# --------------------------------------------------------------------------- early stop
# (scripted mean alpha per analysis, options, the analysis (1-based) that stops or None)
STOP_CASES = {
    # patience 2, min_delta 0.01: at the 5th analysis the best of the last two (3.495) is not
    # below the earlier best 3.5 by more than 0.01
    "plateau-min-delta": ([5.0, 4.0, 3.5, 3.6, 3.495, 3.7, 3.8, 3.9],
                          {"patience": 2, "min_delta": 0.01, "lower_bound": None}, 5),
    # the same series with min_delta 0: 3.495 improves, the plateau is reached two later
    "plateau-no-delta": ([5.0, 4.0, 3.5, 3.6, 3.495, 3.7, 3.8, 3.9],
                         {"patience": 2, "min_delta": 0.0, "lower_bound": None}, 7),
    # always improving: never stops, the run has all its epochs
    "improving": ([5.0, 4.8, 4.6, 4.4, 4.2, 4.0, 3.8, 3.6],
                  {"patience": 2, "min_delta": 0.01, "lower_bound": None}, None),
}


@pytest.mark.parametrize("case", list(STOP_CASES))
def test_lightning_early_stop_by_patience(tmp_path, case):
    means, options, stop_at = STOP_CASES[case]
    fn = Scripted(lambda i, name: means[i])
    events, lines = Events(), []
    cb = ww(tmp_path, every_n_epochs=1, analyze_fn=fn, early_stop=EarlyStop.apply(**options),
            trackers=[events], log_fn=lines.append)
    trainer = make_trainer(tmp_path, [cb], max_epochs=8, limit_train_batches=2)
    trainer.fit(Model())
    stops = events.kinds("early-stop")
    if stop_at is None:
        assert trainer.global_step == 16 and fn.calls == 8 and not trainer.should_stop
        assert stops == [] and not any("early-stop" in line for line in lines)
        return
    # one analysis per epoch end (2 steps each): stopped at the end of epoch stop_at
    assert trainer.global_step == 2 * stop_at < 16
    assert trainer.current_epoch < 8 and trainer.should_stop
    assert fn.calls == stop_at                       # no analysis after the stop
    assert cb.history.steps == [2 * k for k in range(1, stop_at + 1)]
    best = min(means[:stop_at - options["patience"]])
    reason = (f"mean alpha has not improved by more than {options['min_delta']:g} below "
              f"{best:.3f} for {options['patience']} analyses")
    assert [(s, p["reason"]) for s, p in stops] == [(2 * stop_at, reason)]
    assert stops[0][1]["mean_alpha"] == pytest.approx(means[stop_at - 1])
    logged = [line for line in lines if "early-stop" in line]
    assert len(logged) == 1 and reason in logged[0] and f"step {2 * stop_at}" in logged[0]


def test_hf_early_stop_by_patience(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from ww_callbacks.huggingface import WeightWatcherCallback as HFCallback

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                            torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                            torch.nn.Linear(64, 32))

        def forward(self, x, labels=None):
            out = self.body(x)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(32, 16, generator=g), torch.randn(32, 32, generator=g)

        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    means = [5.0, 4.0, 3.5, 3.6, 3.55, 3.7, 3.8, 3.9, 4.0, 4.1]
    fn = Scripted(lambda i, name: means[i])
    events, lines = Events(), []
    cb = HFCallback(start_fraction=0.0, every_n_steps=2, async_analysis=False, analyze_fn=fn,
                    early_stop=EarlyStop.apply(patience=2, lower_bound=None),
                    trackers=[events], log_fn=lines.append, output_dir=str(tmp_path / "ww"))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=20,
        learning_rate=1e-3, logging_steps=100, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, dataloader_num_workers=0, remove_unused_columns=False)
    trainer = transformers.Trainer(model=Net(), args=args, train_dataset=Data(), callbacks=[cb])
    trainer.train()
    # analyses at steps 2, 4, ...; the 5th (step 10): min(3.6, 3.55) is not below 3.5
    assert trainer.state.global_step == 10 and fn.calls == 5
    reason = "mean alpha has not improved by more than 0 below 3.500 for 2 analyses"
    assert [(s, p["reason"]) for s, p in events.kinds("early-stop")] == [(10, reason)]
    assert sum(1 for line in lines if "early-stop" in line and reason in line) == 1


# --------------------------------------------------------------------------- protect / unfreeze
class Probe(Callback):
    """After each batch (and after the WeightWatcher callback's decision at that batch): the
    parameters' requires_grad and a copy of their weights."""

    def __init__(self, names):
        self.names, self.grad, self.weights = names, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        step = trainer.global_step
        self.grad[step] = {n: params[f"{n}.weight"].requires_grad and params[f"{n}.bias"].requires_grad
                           for n in self.names}
        self.weights[step] = {n: params[f"{n}.weight"].detach().clone() for n in self.names}


def protect_unfreeze_script(i, name):
    """Analyses i = 0..5 at steps 2, 4, ..., 12 (band (2, 6), margin 0.5)."""
    if name == "layer.2":
        # settled in band at i = 0, 1 (frozen at i = 1); 6.3 is out of the band but within the
        # margin (stays frozen); 6.8 is beyond it (released at i = 3) and keeps it out of the band
        return [3.0, 3.0, 6.3, 6.8, 6.8, 6.8][i]
    if name == "layer.6":
        return 3.0 if i % 2 == 0 else 4.0            # never settled: never a candidate
    return 3.0                                      # layer.0 (protected), layer.4, layer.8 (head)


@pytest.mark.parametrize("protect", [r"^layer\.0$", ["no-such-layer", r"layer\.0"]])
def test_protect_and_unfreeze_in_a_lightning_fit(tmp_path, protect):
    fn = Scripted(protect_unfreeze_script)
    events = Events()
    options = {"band": (2.0, 6.0), "tol": 0.05, "window": 2, "max_share": 0.5,
               "protect": protect, "unfreeze": True, "unfreeze_margin": 0.5}
    probe = Probe(ANALYSED)
    cb = ww(tmp_path, every_n_steps=2, analyze_fn=fn, freeze=Freeze.apply(**options),
            trackers=[events], log_fn=lambda line: None)
    trainer = make_trainer(tmp_path, [cb, probe], max_epochs=3, limit_train_batches=4)
    trainer.fit(Model())
    assert trainer.global_step == 12 and fn.calls == 6

    freezes = events.kinds("freeze")
    assert [(s, p["freeze"], p["unfreeze"]) for s, p in freezes] == [
        (4, ["layer.2", "layer.4"], []),      # layer.0 was the first candidate: protected
        (8, [], ["layer.2"]),                 # 6.8 > 6 + 0.5; 6.3 at step 6 was within the margin
    ]
    assert "left band [2, 6] (margin 0.5)" in freezes[1][1]["reasons"]["layer.2"]
    assert cb.frozen_layers == ["layer.4"]

    g, w = probe.grad, probe.weights
    steps = sorted(g)
    assert steps == list(range(1, 13))
    # the protected layer: in band and settled all along, never frozen, trained at every step
    assert all(g[s]["layer.0"] for s in steps)
    assert all(not torch.equal(w[s]["layer.0"], w[s + 1]["layer.0"]) for s in steps[:-1])
    # layer.2: frozen after the decision at step 4, released after the one at step 8
    assert [s for s in steps if not g[s]["layer.2"]] == [4, 5, 6, 7]
    for s in (5, 6, 7, 8):
        assert torch.equal(w[s]["layer.2"], w[4]["layer.2"]), s        # did not move
    for s in (8, 9, 10, 11):
        assert not torch.equal(w[s + 1]["layer.2"], w[s]["layer.2"]), s  # moves again
    # layer.4 frozen from step 4 to the end; layer.6 (unsettled) and the head always train
    assert [s for s in steps if not g[s]["layer.4"]] == list(range(4, 13))
    assert all(torch.equal(w[s]["layer.4"], w[4]["layer.4"]) for s in range(4, 13))
    assert all(g[s]["layer.6"] and g[s]["layer.8"] for s in steps)


# --------------------------------------------------------------------------- a failing action
class Boom:
    def __init__(self):
        self.steps = []

    def on_analysis(self, controller, result, step, epoch):
        self.steps.append(step)
        raise RuntimeError(f"boom at step {step}")


class Recorder:
    def __init__(self):
        self.steps = []

    def on_analysis(self, controller, result, step, epoch):
        self.steps.append(step)


def failing_action_script(i, name):
    """Analyses i = 0..5 at steps 3, 6, ..., 18 (band (2, 6), window 2)."""
    if name == "layer.0":
        return [3.0, 3.0, 3.0, 9.0, 3.0, 3.0][i]     # suggest at i=1, withdraw at i=3, again i=5
    return 3.0 + 0.5 * (i % 2) + 0.1 * ANALYSED.index(name)   # never settled (tol 0.05)


def test_raising_action_reported_once_others_keep_deciding(tmp_path):
    fn = Scripted(failing_action_script)
    boom, after = Boom(), Recorder()
    events, lines = Events(), []
    options = {"band": (2.0, 6.0), "tol": 0.05, "window": 2, "max_share": 0.5, "unfreeze": True}
    cb = ww(tmp_path, every_n_steps=3, analyze_fn=fn, freeze=Freeze.suggest(**options),
            balance_lr="suggest", actions=[boom, after], trackers=[events], log_fn=lines.append)
    model = Model()
    trainer = make_trainer(tmp_path, [cb], max_epochs=3, limit_train_batches=6)
    trainer.fit(model)
    steps = [3, 6, 9, 12, 15, 18]
    assert trainer.global_step == 18                          # training completed
    assert cb.history.steps == steps and fn.calls == 6
    assert boom.steps == steps                                # called (and failed) every time
    assert after.steps == steps                               # the action after it still ran
    reported = [line for line in lines if "Boom" in line]
    assert len(reported) == 1, reported
    assert "RuntimeError: boom at step 3" in reported[0]
    assert "training continues" in reported[0]
    # one log line per analysis still
    assert len([line for line in lines if re.match(r"ww step \d+ epoch \d+: mean alpha", line)]) == 6
    # balance_lr="suggest": factors at every analysis, for the tuned (middle) layers
    lr = events.kinds("lr-factors-suggestion")
    assert [s for s, _ in lr] == steps
    for _, payload in lr:
        assert sorted(payload["factors"]) == ANALYSED[1:-1]
    # freeze="suggest": the decisions after the first failure, as scripted
    fr = events.kinds("freeze-suggestion")
    assert [(s, p["freeze"], p["unfreeze"]) for s, p in fr] == [
        (6, ["layer.0"], []), (12, [], ["layer.0"])]      # none at the final analysis (18)
    assert cb.frozen_layers == []
    assert all(p.requires_grad for p in model.parameters())  # suggest changes nothing
    assert events.kinds("freeze") == [] and events.kinds("lr-factors") == []


# --------------------------------------------------------------------------- DDP check (in process)
def _ddp_strategy(spec):
    from lightning.pytorch.strategies import DDPStrategy

    if spec == "DDPStrategy()":
        return DDPStrategy()
    if spec == "DDPStrategy(find_unused_parameters=True)":
        return DDPStrategy(find_unused_parameters=True)
    if spec == "DDPStrategy(find_unused_parameters=False)":
        return DDPStrategy(find_unused_parameters=False)
    return spec


@pytest.mark.parametrize("spec, freeze, raises", [
    ("DDPStrategy()", "apply", True),
    ("DDPStrategy(find_unused_parameters=False)", "apply", True),
    ("ddp", "apply", True),
    ("ddp_find_unused_parameters_false", "apply", True),
    ("DDPStrategy(find_unused_parameters=True)", "apply", False),
    ("ddp_find_unused_parameters_true", "apply", False),
    ("DDPStrategy()", "suggest", False),                  # suggest never freezes anything
])
def test_freeze_apply_under_ddp_needs_find_unused_parameters(tmp_path, spec, freeze, raises):
    # A real 2-device DDP Trainer on CPU (not launched: fit start is driven by hand, in process);
    # the same check in a real 2-process fit is tests/test_ddp_freeze.py
    trainer = Trainer(strategy=_ddp_strategy(spec), accelerator="cpu", devices=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path))
    assert trainer.world_size == 2
    cb = ww(tmp_path, freeze=freeze, log_fn=lambda line: None)
    model = Model()

    def fit_start():
        cb.setup(trainer, model, stage="fit")
        cb.on_fit_start(trainer, model)

    if raises:
        with pytest.raises(ValueError, match="find_unused_parameters"):
            fit_start()
    else:
        fit_start()
