"""Auto-freeze on LoRA adapters, the cap, the final analysis and ``layers_to_watch``.

A LoRA update ``B·A`` has r eigenvalues: the policy judges it on its size (the Frobenius norm of
``B·A``, from ``log_norm``) and freezes adapters front to back, so that backward stops at the
first adapter still training. Counted, not timed: autograd nodes behind the loss and the
parameters that require a gradient.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from ww_callbacks.actions import FreezePolicy, is_adapter

pytestmark = pytest.mark.core

SETTLED = [3.0, 3.0, 3.0]


def L(name, alpha=3.0, flags=(), log_norm=None):
    return SimpleNamespace(name=name, alpha=alpha, flags=tuple(flags), status="success",
                           log_norm=alpha / 10 if log_norm is None else log_norm)


def adapters(n, log_norm=0.5):
    return [L(f"enc.{i}.q.lora_BA.default", 1.5, ["too-few-evals"], log_norm) for i in range(n)]


# --------------------------------------------------------------------------- the policy

def test_adapters_are_judged_on_their_size_not_their_alpha():
    policy = FreezePolicy("apply", window=2, max_share=1.0)
    layers = adapters(3) + [L("classifier")]
    hist = {l.name: [9.0, 1.0] for l in layers}       # alpha all over the place: not read
    assert policy.decide(hist, layers).freeze == []      # one size each so far
    d = policy.decide(hist, layers)
    assert d.freeze == [l.name for l in layers[:3]]
    assert "LoRA update norm" in d.reasons[layers[0].name]
    assert policy.sizes[layers[0].name] == pytest.approx([math.sqrt(10 ** 0.5)] * 2)


def test_a_growing_update_blocks_the_prefix_and_the_ones_behind_it():
    policy = FreezePolicy("apply", window=2, max_share=1.0, adapter_tol=0.1)
    for log_norm in (0.5, 0.6):    # the first adapter's norm grows 12%: above adapter_tol
        layers = [L("a.lora_BA.default", 1.5, ["too-few-evals"], log_norm)] + adapters(2)
        d = policy.decide({}, layers + [L("head")])
    assert d.freeze == [] and policy.why_nothing_froze() is not None
    loose = FreezePolicy("apply", window=2, max_share=1.0, adapter_tol=0.2)
    for log_norm in (0.5, 0.6):
        d = loose.decide({}, [L("a.lora_BA.default", 1.5, ["too-few-evals"], log_norm)]
                         + adapters(2) + [L("head")])
    assert len(d.freeze) == 3


def test_an_unfitted_update_is_not_a_candidate():
    policy = FreezePolicy("apply", window=2, max_share=1.0)
    zero = [L("a.lora_BA.default", math.nan, ["fit-failed"], -math.inf), L("head")]
    policy.decide({}, zero)
    assert policy.decide({}, zero).freeze == []


def test_sizes_survive_a_resume():
    policy = FreezePolicy("apply", window=2, max_share=1.0)
    layers = adapters(2) + [L("head")]
    policy.decide({}, layers)
    again = FreezePolicy("apply", window=2, max_share=1.0)
    again.load_state_dict(policy.state_dict())
    assert again.decide({}, layers).freeze == [l.name for l in layers[:2]]


def test_is_adapter():
    assert is_adapter("base_model.model.enc.0.q.lora_BA.default") and is_adapter("q.lora_BA")
    assert not is_adapter("q.lora_W_plus_AB.default") and not is_adapter("q.lora_A.default")


def test_the_cap_counts_layers_that_ride_along():
    layers = [L("stem"), L("dw", 1.7, ["too-few-evals"]), L("pw"), L("late"), L("head")]
    hist = {l.name: SETTLED for l in layers}
    policy = FreezePolicy("apply", max_share=0.4)        # floor(0.4 * 5) = 2 layers
    assert policy.decide(hist, layers).freeze == ["stem"]   # dw + pw would make 3
    roomy = FreezePolicy("apply", max_share=0.6)          # 3 layers
    assert roomy.decide(hist, layers).freeze == ["stem", "dw", "pw"]


def test_nothing_freezes_at_the_final_analysis():
    layers = [L("a"), L("b"), L("head")]
    hist = {l.name: SETTLED for l in layers}
    policy = FreezePolicy("apply", max_share=1.0)
    d = policy.decide(hist, layers, step=100, final=True)
    assert not d and policy.frozen == [] and policy.decisions == []
    text = policy.why_nothing_froze()
    assert "a, b first met the criterion at the final analysis (step 100)" in text


# --------------------------------------------------------------------------- layers_to_watch

NAMES = ["a", "b", "c", "d", "e", "f", "g", "head"]


def test_layers_to_watch_is_the_next_part_of_the_prefix():
    policy = FreezePolicy("apply", max_share=0.5)          # 4 of 8
    assert policy.layers_to_watch(NAMES) == ["a", "b", "c", "d"]
    policy.frozen = ["a", "b", "c"]
    assert policy.layers_to_watch(NAMES) == ["d"]
    policy.frozen = ["a", "b", "c", "d"]
    assert policy.layers_to_watch(NAMES) == []              # the cap is reached


def test_layers_to_watch_stops_at_a_protected_layer_and_the_head():
    assert FreezePolicy("apply", max_share=1.0, protect="^c$").layers_to_watch(NAMES) == ["a", "b"]
    assert FreezePolicy("apply", max_share=1.0).layers_to_watch(NAMES) == NAMES[:-1]
    assert FreezePolicy("apply", max_share=1.0, protect_head=False).layers_to_watch(NAMES) == NAMES


def test_layers_to_watch_none_or_nothing():
    assert FreezePolicy("off").layers_to_watch(NAMES) == []
    assert FreezePolicy("apply", order="any").layers_to_watch(NAMES) is None
    assert FreezePolicy("suggest", unfreeze=True, band="weightwatcher").layers_to_watch(NAMES) is None


def test_the_cap_is_counted_over_the_watched_names():
    policy = FreezePolicy("apply", max_share=0.5, window=2)
    watch = policy.layers_to_watch(NAMES)                  # the controller analyses only these
    layers = [L(n) for n in watch]
    hist = {n: SETTLED for n in watch}
    assert policy.decide(hist, layers).freeze == ["a", "b", "c", "d"]   # 4 of 8, not 2 of 4


# --------------------------------------------------------------------------- a real PEFT model

def _tiny_lora_bert():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=2, intermediate_size=64, num_labels=10,
                                     max_position_embeddings=16)
    model = transformers.BertForSequenceClassification(config)
    # B random (not zero): the updates have a size from the start
    return peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                      target_modules=["query", "value"],
                                                      init_lora_weights=False))


def _work(model):
    """(autograd nodes behind the loss, parameters requiring grad) of one training step."""
    import torch

    ids = torch.randint(0, 50, (2, 8))
    loss = model(input_ids=ids, labels=torch.tensor([0, 1])).loss
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
    loss.backward()
    return len(seen), sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_adapters_freeze_front_to_back_and_backward_work_drops(tmp_path):
    from ww_callbacks import MEMORY_ONLY, WeightWatcherController
    from ww_callbacks.settings import Freeze
    from ww_callbacks.torch_utils import freeze_layers

    model = _tiny_lora_bert()
    nodes0, params0 = _work(model)
    ctl = WeightWatcherController(output_dir=MEMORY_ONLY, trackers=None, log_fn=lambda s: None,
                                  every_n_steps=1, start_fraction=0.0, async_analysis=False,
                                  freeze=Freeze.apply(window=2))
    policy = ctl.action_set.freeze_policy
    ctl.bind_actions(freeze_fn=lambda f, u: freeze_layers(model, f, whole_prefix=policy.whole_prefix))
    ctl.configure(total_steps=10)
    ctl.maybe_run(model, step=1, epoch=0)
    ctl.maybe_run(model, step=2, epoch=0)       # the weights did not move: every update settled
    names = list(dict.fromkeys(r["name"] for r in ctl.history.rows if is_adapter(r["name"])))
    assert ctl.history.steps == [1, 2], ctl.history.steps
    assert len(names) == 8                       # query and value of 4 layers
    frozen = ctl.frozen_layers
    # half of the 9 trained layers (8 adapters and the head) at most, front first
    assert frozen == names[:4], frozen
    params = dict(model.named_parameters())
    for name in names[:4]:
        base = name.split(".lora_BA")[0]
        assert not params[f"{base}.lora_A.default.weight"].requires_grad
        assert not params[f"{base}.lora_B.default.weight"].requires_grad
    later = names[4].split(".lora_BA")[0]
    assert params[f"{later}.lora_B.default.weight"].requires_grad
    nodes1, params1 = _work(model)
    assert params1 < params0 and nodes1 < nodes0   # backward stops at the first adapter training
    ctl.finish(model, step=10, epoch=0)
