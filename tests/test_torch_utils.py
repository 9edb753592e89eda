"""torch helpers: freezing mid-training, per-layer param groups, durable LR factors."""

from __future__ import annotations

import copy
import json

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from ww_callbacks.actions import LRBalanceAction, LRBalancePolicy  # noqa: E402
from ww_callbacks.torch_utils import (  # noqa: E402
    apply_lr_factors,
    broadcast_object,
    freeze_layers,
    layer_param_groups,
    prefix_parameters,
    resolve_layer_params,
    unfreeze_layers,
)

LAYERS = ["0", "2", "4"]


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


def train_steps(model, opt, n, seed=1, sched=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)     # the harsh case: zeros, not None, after each step
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
], ids=["sgd-momentum-wd", "adamw-wd"])
@pytest.mark.parametrize("drop_state", [False, True])
def test_frozen_layer_stays_bit_identical(make_opt, drop_state):
    model = make_model()
    opt = make_opt(layer_param_groups(model, LAYERS))
    train_steps(model, opt, 3)
    w = model[2].weight
    assert opt.state[w], "the layer must carry momentum/moment state before the freeze"
    frozen = freeze_layers(model, ["2"], optimizers=[opt], drop_state=drop_state)
    assert frozen == ["2.weight", "2.bias"] and w.grad is None and not w.requires_grad
    assert (w in opt.state and len(opt.state[w]) > 0) is (not drop_state)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_steps(model, opt, 5, seed=2)
    after = model.state_dict()
    for k in ("2.weight", "2.bias"):
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["0.weight"], before["0.weight"])   # the rest still trains
    unfreeze_layers(model, ["2"])
    train_steps(model, opt, 1, seed=3)
    assert not torch.equal(model[2].weight, before["2.weight"])


def test_whole_prefix_freeze_leaves_no_autograd_graph_through_the_prefix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.LayerNorm(16),
                          nn.Linear(16, 2))
    x = torch.randn(4, 6)
    # by name only: the LayerNorm before layer 2 still trains, so autograd records the prefix
    freeze_layers(model, ["0", "2"])
    assert model[1].weight.requires_grad and model[:3](x).grad_fn is not None
    frozen = freeze_layers(model, ["0", "2"], whole_prefix=True)
    assert frozen == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    h = model[:3](x)
    assert h.grad_fn is None and not h.requires_grad          # no graph, no saved activations
    assert model[3].weight.requires_grad and model[4].weight.requires_grad
    model(x).sum().backward()
    assert model[4].weight.grad is not None and model[1].weight.grad is None
    assert [n for n, _ in prefix_parameters(model, [model[0].bias])] == ["0.weight", "0.bias"]


def test_param_groups_cover_every_parameter_once_and_mha_shares_a_group():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 2)

    net = Net()
    names = ["attn.in_proj_q", "attn.in_proj_k", "attn.in_proj_v", "attn.out_proj", "head"]
    groups = layer_param_groups(net, names, base_lr=0.1, weight_decay=0.0)
    assert [g["name"] for g in groups] == ["attn.in_proj", "attn.out_proj", "head", "rest"]
    assert groups[0]["ww_layers"] == names[:3] and groups[-1]["ww_layers"] == []
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    assert all(g["lr"] == 0.1 and g["weight_decay"] == 0.0 for g in groups)
    opt = torch.optim.Adam(groups)
    apply_lr_factors(opt, factors={"attn.in_proj_q": 0.5, "attn.in_proj_k": 1.0,
                                   "attn.in_proj_v": 1.5, "head": 2.0})
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.1, 0.2, 0.1])
    # DDP / torch.compile prefixes are tolerated
    assert resolve_layer_params(net, ["module.head"])["module.head"][0] == "head"
    with pytest.raises(ValueError, match="match no module"):
        layer_param_groups(net, ["nope"])
    with pytest.raises(ValueError):
        layer_param_groups(net, ["head", "head"])


def _lambda_setup():
    model = make_model()
    opt = torch.optim.SGD(layer_param_groups(model, LAYERS, base_lr=0.1), momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def lrs(opt):
    return {g["name"]: g["lr"] for g in opt.param_groups}


def test_factors_land_on_named_groups_survive_lambdalr_and_do_not_compound():
    model, opt, sched = _lambda_setup()
    train_steps(model, opt, 2, sched=sched)             # lr = 0.1/3 now
    factors = {"0": 0.5, "4": 1.5}
    out = apply_lr_factors(opt, [sched], factors)
    expect = {"0": 0.05 / 3, "2": 0.1 / 3, "4": 0.15 / 3}   # no "rest": all params covered
    assert out == pytest.approx(expect) and lrs(opt) == pytest.approx(expect)
    assert sched.base_lrs == pytest.approx([0.05, 0.1, 0.15])
    apply_lr_factors(opt, [sched], factors)             # idempotent
    assert lrs(opt) == pytest.approx(expect) and sched.base_lrs == pytest.approx([0.05, 0.1, 0.15])
    train_steps(model, opt, 1, sched=sched)             # lr = base/4 after the next step
    assert lrs(opt) == pytest.approx({"0": 0.05 / 4, "2": 0.1 / 4, "4": 0.15 / 4})
    assert sched.get_last_lr() == pytest.approx([0.05 / 4, 0.1 / 4, 0.15 / 4])
    # new factors replace the old ones (relative to the original LR, not compounding)
    apply_lr_factors(opt, [sched], {"0": 2.0})
    assert lrs(opt) == pytest.approx({"0": 0.2 / 4, "2": 0.1 / 4, "4": 0.1 / 4})
    assert [g["ww_base_lr"] for g in opt.param_groups] == pytest.approx([0.1] * 3)


def test_factors_survive_a_state_dict_round_trip():
    model, opt, sched = _lambda_setup()
    train_steps(model, opt, 2, sched=sched)
    apply_lr_factors(opt, [sched], {"0": 0.5, "2": 1.25})
    ckpt = copy.deepcopy({"opt": opt.state_dict(), "sched": sched.state_dict()})
    model2, opt2, sched2 = _lambda_setup()              # a resumed run builds fresh objects
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert lrs(opt2) == pytest.approx(lrs(opt)) and sched2.base_lrs == pytest.approx(sched.base_lrs)
    train_steps(model2, opt2, 1, sched=sched2)
    assert lrs(opt2) == pytest.approx({"0": 0.05 / 4, "2": 0.125 / 4, "4": 0.1 / 4})
    apply_lr_factors(opt2, [sched2], {"0": 0.5, "2": 1.25})   # re-applied after resume: no change
    assert lrs(opt2) == pytest.approx({"0": 0.05 / 4, "2": 0.125 / 4, "4": 0.1 / 4})


def test_hf_linear_schedule_with_warmup_keeps_the_factors():
    transformers = pytest.importorskip("transformers")
    model = make_model()
    opt = torch.optim.AdamW(layer_param_groups(model, LAYERS, base_lr=1e-3))
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=10)
    train_steps(model, opt, 3, sched=sched)
    apply_lr_factors(opt, [sched], {"0": 0.5, "4": 1.5})
    train_steps(model, opt, 2, sched=sched)              # step 5: multiplier (10-5)/8
    m = 5 / 8
    assert lrs(opt) == pytest.approx({"0": 0.5e-3 * m, "2": 1e-3 * m, "4": 1.5e-3 * m})


@pytest.mark.parametrize("kind", ["step", "cosine", "onecycle", "cyclic", "sequential"])
def test_other_schedulers_compose_with_the_factors(kind):
    S = torch.optim.lr_scheduler
    ref_model, model = make_model(), make_model()

    def build(m):
        opt = torch.optim.SGD(layer_param_groups(m, LAYERS, base_lr=0.1), momentum=0.9)
        if kind == "step":
            return opt, S.StepLR(opt, step_size=2, gamma=0.5)
        if kind == "cosine":
            return opt, S.CosineAnnealingLR(opt, T_max=20)
        if kind == "onecycle":
            return opt, S.OneCycleLR(opt, max_lr=0.1, total_steps=20)
        if kind == "cyclic":
            return opt, S.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=3)
        return opt, S.SequentialLR(opt, [S.LinearLR(opt, 0.5, total_iters=2),
                                         S.ExponentialLR(opt, 0.9)], milestones=[2])

    ref_opt, ref_sched = build(ref_model)
    opt, sched = build(model)
    train_steps(ref_model, ref_opt, 3, sched=ref_sched)
    train_steps(model, opt, 3, sched=sched)
    apply_lr_factors(opt, [sched], {"2": 0.5})
    for _ in range(4):
        train_steps(ref_model, ref_opt, 1, sched=ref_sched)
        train_steps(model, opt, 1, sched=sched)
        ref, got = lrs(ref_opt), lrs(opt)
        assert got["2"] == pytest.approx(0.5 * ref["2"]) and got["0"] == pytest.approx(ref["0"])


def test_suggest_mode_touches_nothing():
    model, opt, sched = _lambda_setup()
    train_steps(model, opt, 2, sched=sched)
    snap = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
            copy.deepcopy(sched.state_dict()))
    calls = []
    action = LRBalanceAction(LRBalancePolicy("suggest", min_layer_evals=0),
                             apply_fn=lambda f: calls.append(f))
    import ww_core

    result = ww_core.analyze(model, min_evals=1)
    events = []
    ctl = type("C", (), {"log_event": lambda self, *a: events.append(a), "history": None})()
    action.on_analysis(ctl, result, 2, 0)
    assert calls == [] and events and events[0][1] == "lr-factors-suggestion"
    assert action.last.factors
    for a, b in zip(snap[0].values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert json.dumps(opt.state_dict()["param_groups"]) == json.dumps(snap[1]["param_groups"])
    assert sched.state_dict() == snap[2]
    assert all(p.requires_grad for p in model.parameters())


def test_validation_and_broadcast_without_distributed():
    model, opt, sched = _lambda_setup()
    with pytest.raises(ValueError):
        apply_lr_factors(opt, [sched], {"0": 0.0})
    with pytest.raises(ValueError):
        freeze_layers(model, "0")
    assert broadcast_object({"a": 1}) == {"a": 1}
