"""freeze / balance_lr / early_stop in real Lightning Trainer runs on CPU (tiny MLP)."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.demos.boring_classes import BoringModel  # noqa: E402

from helpers import LOOSE_FREEZE as LOOSE  # noqa: E402
from helpers import FrozenParamSnapshot as Snapshot
from helpers import events_tracker as Events
from ww_callbacks import BalanceLR, EarlyStop, Freeze  # noqa: E402
from ww_callbacks.actions import tempbalance_factors  # noqa: E402
from ww_callbacks.lightning import WeightWatcherCallback, layer_param_groups  # noqa: E402

# analysed: layer.0, 2, 4, 6, 8 (the 64x2 head has too few eigenvalues and is skipped)
ANALYSED = ["layer.0", "layer.2", "layer.4", "layer.6", "layer.8"]


def lam(step):
    return 1.0 / (1.0 + 0.1 * step)


class Model(BoringModel):
    def __init__(self, opt="sgd", named=True, sched=True):
        super().__init__()
        torch.manual_seed(0)
        dims = [32, 64, 64, 64, 64, 64]
        mods = []
        for a, b in zip(dims, dims[1:]):
            mods += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        self.layer = torch.nn.Sequential(*mods, torch.nn.Linear(64, 2))
        self.opt, self.named, self.sched = opt, named, sched

    def configure_optimizers(self):
        params = layer_param_groups(self) if self.named else self.parameters()
        if self.opt == "sgd":
            opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
        else:
            opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
        if not self.sched:
            return opt
        return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lam), "interval": "step"}]


def make_trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_epochs", 3)
    kw.setdefault("limit_train_batches", 6)
    return Trainer(default_root_dir=str(tmp_path), callbacks=callbacks, logger=False,
                   enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   **kw)


def ww(tmp_path, **kw):
    kw.setdefault("start_fraction", 0.0)
    kw.setdefault("every_n_steps", 3)
    kw.setdefault("async_analysis", False)
    kw.setdefault("log_fn", lambda line: None)
    return WeightWatcherCallback(output_dir=str(tmp_path / "ww"), **kw)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_freeze_apply_keeps_frozen_weights_bit_identical(tmp_path, opt):
    model = Model(opt, named=(opt == "sgd"))        # works with named groups and plain parameters()
    snap = Snapshot(model)
    events = Events()
    cb = ww(tmp_path, freeze=Freeze.apply(**LOOSE), actions=[snap], trackers=[events])
    trainer = make_trainer(tmp_path, [cb])
    trainer.fit(model)
    assert trainer.global_step == 18                                # training finished
    # 2nd analysis (step 6): the first floor(0.5 * 5) = 2 layers in model order, never the head
    assert cb.frozen_layers == ["layer.0", "layer.2"]
    assert {n: s for n, (s, _) in snap.at.items()} == {
        "layer.0.weight": 6, "layer.0.bias": 6, "layer.2.weight": 6, "layer.2.bias": 6}
    for name, (_, w) in snap.at.items():
        assert torch.equal(dict(model.named_parameters())[name], w), name
    assert model.layer[4].weight.requires_grad and model.layer[10].weight.requires_grad
    decisions = cb.action_set.freeze_policy.decisions
    assert decisions[0]["freeze"] == ["layer.0", "layer.2"] and decisions[0]["step"] == 6
    assert [(s, k) for s, k, _ in events.events] == [(6, "freeze")]
    json.dumps(cb.state_dict())


class NormModel(Model):
    """Linear layers with a LayerNorm after each: norms the analysis does not cover."""

    def __init__(self):
        super().__init__("adamw", named=False)
        torch.manual_seed(0)
        dims = [32, 64, 64, 64, 64, 64]
        mods = []
        for a, b in zip(dims, dims[1:]):
            mods += [torch.nn.Linear(a, b), torch.nn.LayerNorm(b), torch.nn.ReLU()]
        self.layer = torch.nn.Sequential(*mods, torch.nn.Linear(64, 2))


def test_prefix_order_freezes_the_whole_prefix_in_a_trainer_run(tmp_path):
    model = NormModel()
    snap = Snapshot(model)
    cb = ww(tmp_path, freeze=Freeze.apply(**{**LOOSE, "order": "prefix"}), actions=[snap])
    trainer = make_trainer(tmp_path, [cb])
    trainer.fit(model)
    assert trainer.global_step == 18
    assert cb.frozen_layers == ["layer.0", "layer.3"]          # floor(0.5 * 5) layers, front first
    # the LayerNorm between them stopped too (and stayed bit-identical); the one after trains
    assert set(snap.at) == {f"layer.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    for name, (_, w) in snap.at.items():
        assert torch.equal(dict(model.named_parameters())[name], w), name
    assert model.layer[4].weight.requires_grad and model.layer[6].weight.requires_grad
    assert model.layer[:4](torch.randn(2, 32)).grad_fn is None   # no graph through the prefix


def test_freeze_resume_keeps_layers_frozen_and_decisions(tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_epochs=1)
    cb = ww(tmp_path, freeze=Freeze.apply(**LOOSE))
    make_trainer(tmp_path, [cb, ckpt], max_epochs=2).fit(Model())
    assert cb.frozen_layers == ["layer.0", "layer.2"]
    saved = torch.load(os.path.join(tmp_path, "ckpt", "last.ckpt"), weights_only=False)
    frozen_w = saved["state_dict"]["layer.0.weight"]

    seen = {}

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["requires_grad"] = {n: p.requires_grad for n, p in pl_module.named_parameters()}

    model = Model()
    cb2 = ww(tmp_path, freeze=Freeze.apply(**LOOSE))
    trainer = make_trainer(tmp_path, [cb2, Probe(), ModelCheckpoint(dirpath=str(tmp_path / "c2"))],
                           max_epochs=4)
    trainer.fit(model, ckpt_path=os.path.join(tmp_path, "ckpt", "last.ckpt"))
    assert trainer.global_step == 24
    assert not seen["requires_grad"]["layer.0.weight"] and not seen["requires_grad"]["layer.2.bias"]
    assert seen["requires_grad"]["layer.4.weight"]
    assert torch.equal(model.layer[0].weight.detach(), frozen_w)    # frozen through epochs 3-4
    assert cb2.frozen_layers == ["layer.0", "layer.2"]
    assert cb2.action_set.freeze_policy.decisions[0]["step"] == 6  # the first run's decision


def _tuned_factors(cb, step):
    rows = {r["name"]: r for r in cb.history.rows_at(step)}
    tuned = ANALYSED[1:-1]
    return tempbalance_factors({n: rows[n]["alpha_hill"] for n in tuned})


def test_balance_lr_sets_tempbalance_factors_under_lambdalr_and_survives_resume(tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_epochs=1)
    events = Events()
    cb = ww(tmp_path, balance_lr=True, trackers=[events])
    model = Model()
    trainer = make_trainer(tmp_path, [cb, ckpt], max_epochs=2)
    trainer.fit(model)
    last = cb.history.steps[-1]
    expect = _tuned_factors(cb, last)
    assert cb.lr_factors == pytest.approx(expect) and len(expect) == 3
    assert min(expect.values()) == pytest.approx(0.5) and max(expect.values()) == pytest.approx(1.5)
    opt = trainer.optimizers[0]
    sched = trainer.lr_scheduler_configs[0].scheduler
    for i, g in enumerate(opt.param_groups):
        f = expect.get(g["name"], 1.0)
        assert g["ww_lr_factor"] == pytest.approx(f)
        assert sched.base_lrs[i] == pytest.approx(0.05 * f)              # LambdaLR's base
        assert g["lr"] == pytest.approx(0.05 * f * lam(trainer.global_step))  # survived its steps
    assert [k for _, k, _ in events.events] == ["lr-factors"] * len(cb.history.steps)

    seen = {}

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            o = trainer.optimizers[0]
            seen["factors"] = {g["name"]: g.get("ww_lr_factor") for g in o.param_groups}
            seen["base_lrs"] = list(trainer.lr_scheduler_configs[0].scheduler.base_lrs)

    cb2 = ww(tmp_path, balance_lr=True)
    t2 = make_trainer(tmp_path, [cb2, Probe()], max_epochs=3)
    t2.fit(Model(), ckpt_path=os.path.join(tmp_path, "ckpt", "last.ckpt"))
    assert {k: v for k, v in seen["factors"].items() if k in expect} == pytest.approx(expect)
    assert seen["base_lrs"] == pytest.approx([0.05 * expect.get(g["name"], 1.0)
                                              for g in opt.param_groups])
    # the checkpoint carries the latest decision only (bounded state); the rest is in the files
    assert cb2.action_set.lr_policy.log[0]["step"] in [e["step"] for e in cb.action_set.lr_policy.log]


def test_balance_lr_without_named_groups_fails_clearly(tmp_path):
    cb = ww(tmp_path, balance_lr=True)
    with pytest.raises(ValueError, match="named param groups"):
        make_trainer(tmp_path, [cb], max_epochs=1).fit(Model(named=False))


def test_suggest_changes_nothing_but_logs(tmp_path):
    events, lines = Events(), []
    cb = ww(tmp_path, freeze=Freeze.suggest(**LOOSE), balance_lr="suggest",
            trackers=[events], log_fn=lines.append)
    model = Model()
    trainer = make_trainer(tmp_path, [cb])
    trainer.fit(model)
    assert all(p.requires_grad for p in model.parameters())
    opt = trainer.optimizers[0]
    assert all("ww_lr_factor" not in g for g in opt.param_groups)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [0.05 * lam(trainer.global_step)] * len(opt.param_groups))
    assert cb.frozen_layers == ["layer.0", "layer.2"]              # the recommendation, recorded
    kinds = [k for _, k, _ in events.events]
    assert "freeze-suggestion" in kinds and "lr-factors-suggestion" in kinds
    assert "freeze" not in kinds and "lr-factors" not in kinds
    assert any("freeze-suggestion" in line for line in lines)
    assert len(cb.action_set.lr_policy.log) == len(cb.history.steps)


def test_early_stop_uses_should_stop(tmp_path):
    events = Events()
    cb = ww(tmp_path, early_stop=EarlyStop.apply(lower_bound=100.0, patience=None),
            trackers=[events])
    trainer = make_trainer(tmp_path, [cb], max_epochs=5)
    trainer.fit(Model())
    assert trainer.global_step < 30                       # stopped long before 5 epochs
    assert cb.action_set.stop_policy.stopped["step"] == 3
    assert [k for _, k, _ in events.events] == ["early-stop"]


def test_bad_options_fail_at_construction():
    for kw in [dict(freeze="yes"), dict(freeze={"nope": 1}), dict(balance_lr="on"),
               dict(early_stop=1), dict(freeze=BalanceLR.apply()), dict(output_dir=None)]:
        with pytest.raises(ValueError):
            WeightWatcherCallback(**kw)
    for make in [lambda: Freeze(nope=1), lambda: BalanceLR(s1=2.0, s2=1.0),
                 lambda: EarlyStop(patience=0), lambda: Freeze(band="default")]:
        with pytest.raises((ValueError, TypeError)):
            make()


class WaitForAnalysis(Callback):
    """After the WeightWatcher callback: waits for its background analysis at every batch end, so
    each analysis is recorded (and acted on) at its own step however slow the machine. Without
    it a step falling due while the previous analysis still runs is skipped by design, and when
    the freeze lands would depend on the CPU's speed. The analysis itself stays asynchronous
    (snapshot copy, background thread, collection)."""

    def __init__(self, cb):
        self.cb = cb

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.cb.controller.poll(wait=True)


def test_freeze_apply_with_async_analysis(tmp_path):
    # the default for one process: the weights are copied at the hook, analysed in the background
    # and the freeze lands when the result is collected
    model = Model()
    snap = Snapshot(model)
    cb = ww(tmp_path, freeze=Freeze.apply(**LOOSE), actions=[snap], async_analysis=True)
    trainer = make_trainer(tmp_path, [cb, WaitForAnalysis(cb)], max_epochs=4)
    trainer.fit(model)
    assert trainer.global_step == 24
    assert cb.controller.asynchronous and cb.controller.skipped_analyses == 0
    assert cb.history.steps == [3, 6, 9, 12, 15, 18, 21, 24]
    assert cb.frozen_layers == ["layer.0", "layer.2"]
    # frozen at the 2nd analysis (step 6), then bit-identical through the 18 steps after it
    assert {n: s for n, (s, _) in snap.at.items()} == {
        "layer.0.weight": 6, "layer.0.bias": 6, "layer.2.weight": 6, "layer.2.bias": 6}
    for name, (_, w) in snap.at.items():
        assert torch.equal(dict(model.named_parameters())[name], w), name
