"""Auto-freeze never ends a fit silently: when it froze nothing, one warning says why and what to
change (``FreezePolicy.why_nothing_froze``, emitted by the controller's ``finish``)."""

from __future__ import annotations

import warnings

import pytest

from ww_callbacks import WeightWatcherController, WeightWatcherWarning
from ww_callbacks.actions import FreezePolicy
from ww_callbacks.settings import Freeze
from ww_core.result import AnalysisResult, LayerResult, SkippedLayer

pytestmark = pytest.mark.core


class Model:
    """The fake analysis reads ``layers``: name -> (alpha, flags[, log_norm]); ``log_norm`` is
    ``alpha / 10`` unless given (a LoRA update's size is read from it)."""

    def __init__(self, layers):
        self.layers = dict(layers)


def analyze(model, layers=None, keep_evals=False, **options):
    return AnalysisResult(layers=[
        LayerResult(name=name, type="dense", N=64, M=32, num_evals=32, alpha=spec[0],
                    log_norm=spec[2] if len(spec) > 2 else spec[0] / 10, flags=tuple(spec[1]),
                    status="success")
        for name, spec in model.layers.items()])


def fit(tmp_path, model_at, steps=10, every=2, freeze="suggest", **options):
    """A plain controller loop over ``steps`` (an analysis every ``every`` steps from the start);
    returns (the WeightWatcherWarnings raised, the log lines, the controller)."""
    lines, frozen = [], []
    ctl = WeightWatcherController(output_dir=str(tmp_path / "ww"), trackers=["local"],
                                  log_fn=lines.append, analyze_fn=analyze, every_n_steps=every,
                                  start_fraction=0.0, async_analysis=False,
                                  freeze=Freeze(mode=freeze, **options) if options else freeze)
    if freeze == "apply":
        ctl.bind_actions(freeze_fn=lambda f, u: frozen.append(list(f)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctl.configure(total_steps=steps)
        for step in range(1, steps + 1):
            ctl.maybe_run(model_at(step), step=step, epoch=0)
        ctl.finish(model_at(steps), step=steps, epoch=0)
        ctl.finish(model_at(steps), step=steps, epoch=0)      # a second finish says nothing more
    ours = [str(w.message) for w in caught if issubclass(w.category, WeightWatcherWarning)]
    return ours, lines, ctl


STEADY = Model({"a": (3.0, ()), "b": (3.0, ()), "head": (3.0, ())})


def _one(messages, lines):
    assert len(messages) == 1, messages
    assert any(messages[0] in line for line in lines)          # and the log line
    return messages[0]


def test_no_warning_when_something_froze(tmp_path):
    for mode in ("suggest", "apply"):
        messages, _, ctl = fit(tmp_path / mode, lambda s: STEADY, freeze=mode, window=2)
        assert ctl.frozen_layers == ["a"] and messages == []


def test_off_mode_says_nothing(tmp_path):
    messages, _, _ = fit(tmp_path, lambda s: STEADY, freeze="off")
    assert messages == []


def test_schedule_too_short_for_the_window(tmp_path):
    messages, lines, ctl = fit(tmp_path, lambda s: STEADY, steps=6, every=4, freeze="apply",
                               window=3)
    assert ctl.history.steps == [4, 6] and ctl.frozen_layers == []
    text = _one(messages, lines)
    assert "freeze='apply' froze no layer" in text
    assert "only 2 analyses ran" in text and "window=3" in text
    assert "analyse more often" in text and "lower window" in text


def test_criterion_never_met(tmp_path):
    def moving(step):   # alpha keeps drifting by 20% per analysis: never settles at tol=0.05
        return Model({n: (3.0 * 1.2 ** step, ()) for n in ("a", "b", "head")})

    messages, lines, _ = fit(tmp_path, moving, window=2)
    text = _one(messages, lines)
    assert "freeze='suggest' suggested no layer" in text
    assert "settled" in text and "above tol=0.05" in text and "raise tol" in text


def test_settled_outside_the_band(tmp_path):
    model = Model({"a": (9.0, ()), "b": (9.0, ()), "head": (9.0, ())})
    messages, lines, _ = fit(tmp_path, lambda s: model, window=2, band="weightwatcher")
    text = _one(messages, lines)
    assert "outside band [2, 6]" in text and "widen band" in text


def test_every_candidate_excluded_too_small_to_judge(tmp_path):
    # layers fitted on too few eigenvalues (not LoRA updates): only too-few-evals, head protected
    small = Model({f"l{i}.dw": (1.6, ("too-few-evals",)) for i in range(4)})
    messages, lines, ctl = fit(tmp_path, lambda s: small, freeze="apply", window=2)
    assert ctl.frozen_layers == []
    text = _one(messages, lines)
    assert "every analysed layer was protected or excluded" in text
    assert "3 flagged too-few-evals" in text and "1 protected (l3.dw)" in text
    assert "from exclude_flags" in text and "LoRA" in text and "protect_head=False" in text


LORA = [f"l{i}.q.lora_BA.default" for i in range(4)]


def test_lora_updates_that_settle_freeze_front_to_back(tmp_path):
    # every update fitted on r=8 eigenvalues (too-few-evals, alpha < 2), its size steady
    lora = Model({n: (1.6, ("too-few-evals",), 0.5) for n in LORA})
    messages, _, ctl = fit(tmp_path, lambda s: lora, freeze="apply", window=2)
    assert ctl.frozen_layers == LORA[:2] and messages == []      # max_share 0.5 of 4


def test_lora_updates_that_keep_growing(tmp_path):
    def growing(step):  # the update's norm grows 50% per analysis: never within adapter_tol
        return Model({n: (1.6, ("too-few-evals",), 0.35 * step) for n in LORA})

    messages, lines, ctl = fit(tmp_path, growing, freeze="apply", window=2)
    assert ctl.frozen_layers == []
    text = _one(messages, lines)
    assert "no LoRA adapter update settled" in text and "above adapter_tol=0.15" in text
    assert "raise adapter_tol" in text


def test_lora_updates_below_min_evals_are_never_analysed(tmp_path):
    def skipping(model, layers=None, keep_evals=False, **options):   # rank 4 < min_evals=8
        res = analyze(Model({"classifier": (3.0, ())}))
        res.skipped = [SkippedLayer(name=n, type="dense", N=64, M=4,
                                    reason="too few eigenvalues (4 < min_evals=8)") for n in LORA]
        return res

    lines = []
    ctl = WeightWatcherController(output_dir=str(tmp_path / "ww"), trackers=["local"],
                                  log_fn=lines.append, analyze_fn=skipping, every_n_steps=2,
                                  start_fraction=0.0, async_analysis=False, freeze="apply")
    ctl.bind_actions(freeze_fn=lambda f, u: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctl.configure(total_steps=8)
        for step in range(1, 9):
            ctl.maybe_run(STEADY, step=step, epoch=0)
        ctl.finish(STEADY, step=8, epoch=0)
    text = _one([str(w.message) for w in caught if issubclass(w.category, WeightWatcherWarning)], lines)
    assert "4 LoRA adapter updates were not analysed (too few eigenvalues (4 < min_evals=8))" in text
    assert "min_evals to at most the LoRA rank" in text


def test_criterion_met_only_at_the_final_analysis(tmp_path):
    # a settles between the last scheduled analysis (8) and the final one (10)
    def model(step):
        return Model({"a": (3.0 if step >= 8 else 3.0 * 1.5 ** step, ()), "head": (3.0, ())})

    messages, lines, ctl = fit(tmp_path, model, steps=10, every=4, freeze="apply", window=2)
    assert ctl.history.steps == [4, 8, 10] and ctl.frozen_layers == []
    text = _one(messages, lines)
    assert "a first met the criterion at the final analysis (step 10)" in text
    assert "saves nothing" in text and "analyse more often" in text


def test_every_candidate_protected(tmp_path):
    messages, lines, _ = fit(tmp_path, lambda s: STEADY, window=2, protect=("^a$", "^b$"))
    text = _one(messages, lines)
    assert "3 protected" in text and "narrow protect" in text


def test_max_share_allowing_none(tmp_path):
    messages, lines, _ = fit(tmp_path, lambda s: STEADY, window=2, max_share=0.1)
    text = _one(messages, lines)
    assert "max_share=0.1 of 3 analysed layers allows none" in text and "raise max_share" in text


def test_prefix_blocked_by_a_layer_that_never_settles(tmp_path):
    def model(step):
        return Model({"a": (3.0 * 1.2 ** step, ()), "b": (3.0, ()), "head": (3.0, ())})

    messages, lines, _ = fit(tmp_path, model, window=2)
    text = _one(messages, lines)
    assert "order='prefix', a never met the criterion, so b" in text and "order='any'" in text


def test_policy_without_any_decision():
    assert FreezePolicy("off").why_nothing_froze() is None
    text = FreezePolicy("apply", window=4).why_nothing_froze()
    assert "no analysis reached the freeze policy" in text and "window=4" in text
