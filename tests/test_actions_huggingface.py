"""freeze / balance_lr / early_stop in real (tiny, CPU) Hugging Face Trainer runs."""

from __future__ import annotations

import os

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
torch = pytest.importorskip("torch")

from helpers import LOOSE_FREEZE as LOOSE  # noqa: E402
from helpers import FrozenParamSnapshot as Snapshot
from helpers import events_tracker as Events
from ww_callbacks import EarlyStop, Freeze  # noqa: E402
from ww_callbacks.actions import tempbalance_factors  # noqa: E402
from ww_callbacks.huggingface import WeightWatcherCallback, create_layer_optimizer  # noqa: E402
from ww_callbacks.torch_utils import unwrap_optimizer  # noqa: E402

pytestmark = pytest.mark.slow   # real Trainer runs

SEQ, VOCAB = 16, 64
# analysed in model order; wte is tied to lm_head (the output head) and wpe has 16 eigenvalues
NAMES = ["transformer.wte", "transformer.wpe"] + [
    f"transformer.h.{i}.{m}" for i in range(2)
    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=2,
                                  n_inner=128, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _trainer(out, callbacks, model=None, optimizers=(None, None), **kw):
    opts = dict(output_dir=str(out), per_device_train_batch_size=4, num_train_epochs=4,
                learning_rate=1e-3, weight_decay=0.1, logging_steps=100, save_strategy="no",
                report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    opts.update(kw)
    return transformers.Trainer(model=model or _model(), args=transformers.TrainingArguments(**opts),
                                train_dataset=_Tokens(), callbacks=list(callbacks),
                                optimizers=optimizers)


def _ww(tmp_path, **kw):
    kw.setdefault("start_fraction", 0.0)
    kw.setdefault("every_n_steps", 2)
    kw.setdefault("async_analysis", False)
    return WeightWatcherCallback(output_dir=str(tmp_path / "ww"), **kw)


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_freeze_apply_keeps_frozen_weights_bit_identical(tmp_path, opt):
    model = _model()
    snap, events = Snapshot(model), Events()
    cb = _ww(tmp_path, freeze=Freeze.apply(**LOOSE), actions=[snap], trackers=[events])
    optimizers = (None, None)
    if opt == "sgd":     # a user optimizer over model.parameters(), the Trainer's default schedule
        optimizers = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9,
                                      weight_decay=0.01), None)
    trainer = _trainer(tmp_path, [cb], model=model, optimizers=optimizers, num_train_epochs=3)
    trainer.train()
    assert trainer.state.global_step == 12
    # 2nd analysis (step 4): floor(0.5 * 10) = 5 layers, front first, skipping wte (tied lm_head)
    # and wpe (flag too-few-evals)
    assert cb.frozen_layers == NAMES[2:7]
    assert {s for s, _ in snap.at.values()} == {4} and "transformer.wte.weight" not in snap.at
    params = dict(model.named_parameters())
    assert len(snap.at) == 10
    for name, (_, w) in snap.at.items():
        assert torch.equal(params[name], w), name
    assert params["transformer.h.1.attn.c_proj.weight"].requires_grad
    assert [(s, k) for s, k, _ in events.events] == [(4, "freeze")]


def test_prefix_order_freezes_the_whole_prefix_and_never_a_tied_head(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=2,
                                  n_inner=128, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(cfg)
    cb = _ww(tmp_path, freeze=Freeze.apply(**{**LOOSE, "order": "prefix"}))
    _trainer(tmp_path, [cb], model=model, num_train_epochs=3).train()
    # untied: wte is an ordinary first layer; wpe (too few eigenvalues) rides along and counts
    # against max_share (5 of 10 layers)
    assert cb.frozen_layers == NAMES[:5]
    params = dict(model.named_parameters())
    for name in ("transformer.wpe.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.ln_2.bias",
                 "transformer.h.0.mlp.c_fc.bias"):
        assert not params[name].requires_grad, name
    assert params["transformer.h.0.mlp.c_proj.weight"].requires_grad
    assert params["transformer.h.1.ln_1.weight"].requires_grad
    assert params["lm_head.weight"].requires_grad
    # tied (the default): wte is the output head, protected, so no prefix can start
    cb = _ww(tmp_path / "tied", freeze=Freeze.apply(**{**LOOSE, "order": "prefix"}))
    _trainer(tmp_path / "tied", [cb], num_train_epochs=3).train()
    assert cb.frozen_layers == []


@pytest.mark.parametrize("restore", [False, True])
def test_freeze_resume_keeps_layers_frozen_and_decisions(tmp_path, restore):
    cb = _ww(tmp_path, freeze=Freeze.apply(**LOOSE))
    _trainer(tmp_path, [cb], num_train_epochs=2, save_strategy="steps", save_steps=8,
             restore_callback_states_from_checkpoint=restore).train()
    ckpt = os.path.join(tmp_path, "checkpoint-8")
    assert os.path.exists(os.path.join(cb.controller.output_dir, "ww_state.json"))   # the run folder's
    seen = {}

    class Probe(transformers.TrainerCallback):
        # first step, not on_train_begin: HF re-adds a restored callback after the others
        def on_step_begin(self, args, state, control, model=None, **kw):
            if "grad" in seen:
                return
            seen["grad"] = {n: p.requires_grad for n, p in model.named_parameters()}
            seen["w"] = model.transformer.h[0].attn.c_attn.weight.detach().clone()

    model = _model()
    cb2 = _ww(tmp_path, freeze=Freeze.apply(**LOOSE))
    trainer = _trainer(tmp_path, [cb2, Probe()], model=model, num_train_epochs=3,
                       restore_callback_states_from_checkpoint=restore)
    trainer.train(resume_from_checkpoint=ckpt)
    assert trainer.state.global_step == 12
    live = [c for c in trainer.callback_handler.callbacks if isinstance(c, WeightWatcherCallback)][0]
    assert (live is cb2) is (not restore)
    assert not seen["grad"]["transformer.h.0.attn.c_attn.weight"] and seen["grad"]["transformer.wte.weight"]
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight.detach(), seen["w"])     # stayed frozen
    assert live.frozen_layers == NAMES[2:7]
    assert live.action_set.freeze_policy.decisions[0]["step"] == 4


def _expected_factors(cb, step):
    rows = {r["name"]: r for r in cb.history.rows_at(step)}
    tuned = NAMES[2:-1]                      # not first (wte), not last, not wpe (16 evals)
    return tempbalance_factors({n: rows[n]["alpha_hill"] for n in tuned})


def test_balance_lr_under_default_linear_schedule_and_resume(tmp_path):
    record = []

    class Probe(transformers.TrainerCallback):      # after ours in the same hook
        def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            opt = unwrap_optimizer(optimizer)
            record.append((state.global_step, [dict(name=g["name"], lr=g["lr"],
                                                    f=g.get("ww_lr_factor", 1.0)) for g in opt.param_groups],
                           list(lr_scheduler.base_lrs), lr_scheduler.lr_lambdas[0](lr_scheduler.last_epoch)))

    events = Events()
    cb = _ww(tmp_path, balance_lr=True, trackers=[events])
    trainer = _trainer(tmp_path, [cb, Probe()], num_train_epochs=2, warmup_steps=2,
                       save_strategy="steps", save_steps=8)
    create_layer_optimizer(trainer)
    trainer.train()
    assert type(trainer.lr_scheduler).__name__ == "LambdaLR"          # the Trainer's default
    expect = {s: _expected_factors(cb, s) for s in cb.history.steps}
    assert cb.history.steps == [2, 4, 6, 8] and len(expect[8]) == 7
    assert cb.lr_factors == pytest.approx(expect[8])
    current = {}
    for step, groups, base_lrs, mult in record:
        current = expect.get(step, current)
        for g, base in zip(groups, base_lrs):
            f = current.get(g["name"], 1.0)
            assert g["f"] == pytest.approx(f) and base == pytest.approx(1e-3 * f)
            assert g["lr"] == pytest.approx(1e-3 * f * mult, abs=1e-12), (step, g["name"])
    fs = list(expect[8].values())
    assert min(fs) == pytest.approx(0.5) and max(fs) == pytest.approx(1.5)
    assert [k for _, k, _ in events.events] == ["lr-factors"] * 4

    seen = {}

    class Begin(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            opt = unwrap_optimizer(optimizer)
            seen["f"] = {g["name"]: g.get("ww_lr_factor", 1.0) for g in opt.param_groups}
            seen["base"] = list(lr_scheduler.base_lrs)

    cb2 = _ww(tmp_path, balance_lr=True)
    t2 = _trainer(tmp_path, [cb2, Begin()], num_train_epochs=3, warmup_steps=2)
    create_layer_optimizer(t2)
    t2.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-8"))
    assert {k: v for k, v in seen["f"].items() if k in expect[8]} == pytest.approx(expect[8])
    groups = unwrap_optimizer(t2.optimizer).param_groups
    assert seen["base"] == pytest.approx([1e-3 * expect[8].get(g["name"], 1.0) for g in groups])


def test_balance_lr_with_default_optimizer_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="create_layer_optimizer"):
        _trainer(tmp_path, [_ww(tmp_path, balance_lr=True)], num_train_epochs=1).train()


def test_suggest_changes_nothing_but_logs(tmp_path):
    events = Events()
    model = _model()
    cb = _ww(tmp_path, freeze=Freeze.suggest(**LOOSE), balance_lr="suggest", trackers=[events])
    lrs = []

    class Probe(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            lrs.append(([g["lr"] for g in optimizer.param_groups], lr_scheduler.get_last_lr()))

    trainer = _trainer(tmp_path, [cb, Probe()], model=model, num_train_epochs=2)
    trainer.train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(groups == pytest.approx(last) for groups, last in lrs)
    assert all("ww_lr_factor" not in g for g in trainer.optimizer.param_groups)
    assert cb.frozen_layers == NAMES[2:7]
    kinds = {k for _, k, _ in events.events}
    assert kinds == {"freeze-suggestion", "lr-factors-suggestion"}


def test_early_stop_sets_should_training_stop(tmp_path):
    events = Events()
    cb = _ww(tmp_path, early_stop=EarlyStop.apply(lower_bound=100.0), trackers=[events])
    trainer = _trainer(tmp_path, [cb])
    trainer.train()
    assert trainer.state.global_step == 2                       # stopped at the first analysis
    assert [k for _, k, _ in events.events] == ["early-stop"]
