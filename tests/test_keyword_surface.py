"""One keyword surface: the three callbacks accept the controller's keywords, with its defaults
and the same values; the three actions take the same modes and settings objects."""

import dataclasses
import inspect
import json

import pytest

from ww_callbacks import MEMORY_ONLY, BalanceLR, EarlyStop, Freeze, WeightWatcherController
from ww_callbacks.run_dir import AUTO, KEEP
from ww_callbacks.settings import ActionSettings, settings_class

SETTINGS = {"freeze": Freeze, "balance_lr": BalanceLR, "early_stop": EarlyStop}


def _callbacks():
    out = []
    for name in ("lightning", "huggingface", "keras"):
        try:
            module = pytest.importorskip(f"ww_callbacks.{name}")
        except pytest.skip.Exception:
            continue
        out.append(module.WeightWatcherCallback)
    return out


def _params(obj):
    return {n: p for n, p in inspect.signature(obj).parameters.items() if n not in ("self", "controller")}


def _ctl(**kw):
    kw.setdefault("output_dir", MEMORY_ONLY)
    kw.setdefault("log_fn", lambda line: None)
    return WeightWatcherController(**kw)


@pytest.fixture(scope="module")
def callbacks():
    found = _callbacks()
    if not found:
        pytest.skip("no training framework installed")
    return found


def test_callbacks_have_the_controllers_keywords_and_defaults(callbacks):
    ctl = _params(WeightWatcherController.__init__)
    assert "freeze_options" not in ctl and "lr_options" not in ctl and "early_stop_options" not in ctl
    for cb in callbacks:
        params = _params(cb)
        assert "controller" in inspect.signature(cb).parameters
        assert list(params) == list(ctl), cb.__module__
        for name, p in ctl.items():
            assert params[name].default is p.default or params[name].default == p.default, (cb, name)
            assert params[name].annotation == p.annotation, (cb, name)
    assert ctl["output_dir"].default is AUTO
    for name in SETTINGS:
        assert ctl[name].default == "off"


def test_settings_fields_match_the_policies():
    from ww_callbacks.actions import EarlyStopPolicy, FreezePolicy, LRBalancePolicy

    for cls, policy in ((Freeze, FreezePolicy), (BalanceLR, LRBalancePolicy), (EarlyStop, EarlyStopPolicy)):
        # the cache_* options are the adapters' (prefix caching) and Freeze.start_fraction the
        # controller's (when freezing decisions may start), not the policy's
        fields = [f for f in cls().to_dict()
                  if f not in ("mode", "start_fraction") and not f.startswith("cache")]
        accepted = inspect.signature(policy).parameters
        assert set(fields) <= set(accepted), cls
        for field in ("metric",):        # the same name and meaning in all three
            assert field in fields
    assert "min_layer_evals" in BalanceLR().to_dict() and "min_evals" not in BalanceLR().to_dict()
    assert "preset" not in Freeze().to_dict()


@pytest.mark.parametrize("keyword", list(SETTINGS))
def test_modes_and_settings_objects_mean_the_same_for_every_action(keyword, callbacks):
    cls = settings_class(keyword)
    cases = {None: "off", False: "off", "off": "off", "suggest": "suggest", True: "apply",
             "apply": "apply", cls.suggest(): "suggest", cls(mode="apply"): "apply"}
    for value, mode in cases.items():
        expected = cls(mode=mode) if not isinstance(value, ActionSettings) else value
        got = getattr(_ctl(**{keyword: value}).action_set, keyword)
        assert got == expected and got.mode == mode, (keyword, value)
        for cb in callbacks:
            built = getattr(cb(output_dir=MEMORY_ONLY, **{keyword: value}).action_set, keyword)
            assert built == expected, (cb.__module__, keyword, value)
    assert cls.apply() == cls(mode="apply") == cls(mode=True)


@pytest.mark.parametrize("keyword", list(SETTINGS))
def test_bad_action_values_are_refused_alike(keyword, callbacks):
    other = next(c for k, c in SETTINGS.items() if k != keyword)
    for value in ("yes", 1, {"mode": "apply"}, other.apply()):
        with pytest.raises(ValueError, match=keyword):
            _ctl(**{keyword: value})
        for cb in callbacks:
            with pytest.raises(ValueError, match=keyword):
                cb(**{keyword: value})


def test_settings_validate_up_front_naming_the_field():
    for make, field in ((lambda: Freeze(tol=-1), "tol"), (lambda: Freeze(window=1), "window"),
                        (lambda: Freeze(adapter_tol=float("nan")), "adapter_tol"),
                        (lambda: Freeze(band="default"), "band"),
                        (lambda: Freeze(order="prefix", unfreeze=True), "unfreeze"),
                        (lambda: BalanceLR(min_layer_evals=-1), "min_layer_evals"),
                        (lambda: BalanceLR(s1=2, s2=1), "s1"), (lambda: EarlyStop(patience=0), "patience"),
                        (lambda: EarlyStop(metric="D"), "metric"), (lambda: Freeze(mode="on"), "mode")):
        with pytest.raises(ValueError, match=field):
            make()
    with pytest.raises(ValueError, match="unknown field"):
        Freeze.from_dict({"preset": "nlp"})


def test_settings_are_frozen_with_a_stable_json_form():
    s = Freeze.apply(band=[2, 6], protect="head", window=2)
    assert s.band == (2.0, 6.0) and s.protect == ("head",) and s.order == "prefix"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tol = 1.0
    for obj in (s, BalanceLR.suggest(exclude=["a", "b"]), EarlyStop(lower_bound=None)):
        text = json.dumps(obj.to_dict(), sort_keys=True)
        assert type(obj).from_dict(json.loads(text)) == obj
        assert repr(obj).startswith(type(obj).__name__ + "(mode=")
    state = _ctl(freeze=s, early_stop="suggest").state_dict()["actions"]["settings"]
    assert Freeze.from_dict(state["freeze"]) == s and state["early_stop"]["mode"] == "suggest"


def test_output_dir_has_one_meaning(tmp_path, callbacks):
    with pytest.raises(ValueError, match="MEMORY_ONLY"):
        _ctl(output_dir=None)
    for cb in callbacks:
        with pytest.raises(ValueError, match="MEMORY_ONLY"):
            cb(output_dir=None)
        assert cb(output_dir=MEMORY_ONLY).controller.output_dir is None
        assert cb().controller.per_run
        assert cb(output_dir=str(tmp_path)).controller.output_dir == str(tmp_path)
    memory = _ctl(trackers=["local"])
    assert memory.output_dir is None and not memory.per_run
    assert WeightWatcherController().per_run
    named = _ctl(output_dir=str(tmp_path / "a"), trackers=None)
    named.configure(total_steps=4)                      # KEEP: no override
    assert named.output_dir == str(tmp_path / "a")
    assert inspect.signature(named.configure).parameters["output_dir"].default is KEEP
    other = _ctl(output_dir=str(tmp_path / "a"), trackers=None)
    other.configure(total_steps=4, output_dir=MEMORY_ONLY)
    assert other.output_dir is None


def test_a_tracker_list_keeps_the_local_record_unless_dropped(tmp_path):
    from ww_callbacks.trackers.base import Tracker
    from ww_callbacks.trackers.local import LocalTracker

    class Mine(Tracker):
        name = "mine"

        def log_analysis(self, **kw):
            pass

    def kinds(**kw):
        ctl = WeightWatcherController(output_dir=str(tmp_path / str(len(kw))), log_fn=lambda line: None, **kw)
        ctl.configure(total_steps=4)
        return [type(t) for t in ctl.trackers]

    assert kinds(trackers=[Mine()]) == [Mine, LocalTracker]
    assert kinds(trackers=[Mine()], local_record=False) == [Mine]
    assert kinds(trackers=None) == []
    with pytest.raises(ValueError, match="local_record"):
        WeightWatcherController(trackers=["local"], local_record=False)


def test_wandb_x_axis_follows_the_framework(tmp_path):
    from ww_callbacks.trackers.wandb import WandbTracker

    unset, mine = WandbTracker(run=object()), WandbTracker(run=object(), step_metric="epoch")
    assert unset.step_metric is None and unset.x_axis == "global_step"
    ctl = _ctl(trackers=[unset, mine], local_record=False)
    ctl.configure(total_steps=4, step_metric="train/global_step")
    assert unset.step_metric == "train/global_step" and mine.step_metric == "epoch"
    for name, key in (("lightning", "trainer/global_step"), ("huggingface", "train/global_step"),
                      ("keras", "global_step")):
        try:
            module = pytest.importorskip(f"ww_callbacks.{name}")
        except pytest.skip.Exception:
            continue
        source = inspect.getsource(module)
        assert f'"{key}"' in source and "step_metric=" in source


def test_tracker_options_live_on_the_tracker():
    from ww_callbacks.trackers.wandb import WandbTracker

    t = WandbTracker(run=object(), alert_on_flagged=True, log_metrics=["alpha", "D"])
    assert t.alert_on_flagged and t.log_metrics == ("alpha", "D")
    with pytest.raises(ValueError, match="alert_on_flagged"):
        WeightWatcherController(alert_on_flagged=True)


def test_removed_keywords_name_their_replacement():
    for old, new in (("freeze_options", "Freeze"), ("lr_options", "BalanceLR"),
                     ("early_stop_options", "EarlyStop")):
        with pytest.raises(ValueError, match=f"{old} was removed.*{new}"):
            WeightWatcherController(**{old: {}})
