"""The layer rotation (``layers_per_analysis=k``): which layers each analysis covers, counted,
at 1,000 layers; every layer visited within ceil(n / k) analyses."""

import math

import pytest

from ww_callbacks import MEMORY_ONLY, WeightWatcherController
from ww_callbacks.rotation import LayerRotation, exact_names_regex, requested_layers

torch = pytest.importorskip("torch")
nn = torch.nn

N_LAYERS = 1000


def _model(n=N_LAYERS, width=8, frozen=()):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(n)])
    for i in frozen:
        model[i].weight.requires_grad_(False)
    return model


def _covered(ctl):
    """{step: set of layer names} from the history."""
    out = {}
    for row in ctl.history.rows:
        out.setdefault(row["step"], set()).add(row["name"])
    return out


def _controller(k, analyses, model, async_analysis=False, **kw):
    ctl = WeightWatcherController(every_n_steps=1, start_fraction=0, output_dir=MEMORY_ONLY,
                                  trackers=None, log_fn=lambda line: None,
                                  async_analysis=async_analysis, layers_per_analysis=k, **kw)
    ctl.configure(total_steps=analyses)
    for step in range(1, analyses + 1):
        ctl.maybe_run(model, step=step, epoch=0)
        ctl.poll(wait=True)
    ctl.close()
    return ctl


@pytest.mark.parametrize("k", [1, 7, 64, 1000, 5000])
def test_every_layer_is_visited_within_ceil_n_over_k_analyses(k):
    names = [(f"model.layers.{i}.fc", True) for i in range(N_LAYERS)]
    rot = LayerRotation(k)
    m = math.ceil(N_LAYERS / k)
    taken = [rot.take(names) for _ in range(3 * m)]
    assert all(0 < len(t) <= k for t in taken)
    all_names = {n for n, _ in names}
    for c in range(3):                               # each block of m analyses is one cycle
        block = taken[c * m:(c + 1) * m]
        assert set().union(*block) == all_names and sum(map(len, block)) == N_LAYERS
    assert rot.cycle == 3 and rot.analyses == 3 * m
    again = LayerRotation(k)                         # deterministic
    assert [again.take(names) for _ in range(3 * m)] == taken


def test_a_controller_covers_a_1000_layer_model_in_ceil_n_over_k_analyses():
    k, model = 128, _model()
    m = math.ceil(N_LAYERS / k)                      # 8
    ctl = _controller(k, m + 2, model)
    covered = _covered(ctl)
    assert [len(covered[s]) for s in range(1, m + 3)] == [128] * 7 + [104, 128, 128]
    assert set().union(*(covered[s] for s in range(1, m + 1))) == {str(i) for i in range(N_LAYERS)}
    assert covered[m + 1] == {str(i) for i in range(128)}      # cycle 2, model order (no change yet)
    assert ctl.rotation.cycle == 2


def test_the_background_copy_holds_only_the_analysed_layers():
    model = _model(n=40)
    ctl = _controller(10, 5, model, async_analysis=True)
    covered = _covered(ctl)
    assert [sorted(covered[s], key=int) for s in (1, 2, 5)] == [
        [str(i) for i in range(10)], [str(i) for i in range(10, 20)], [str(i) for i in range(10)]]


def test_trainable_layers_first_and_frozen_ones_in_the_baseline_only():
    model = _model(n=12, frozen=range(0, 12, 2))     # even layers frozen
    ctl = _controller(4, 6, model)
    covered = _covered(ctl)
    assert covered[1] == {"1", "3", "5", "7"} and covered[2] == {"9", "11", "0", "2"}
    assert covered[3] == {"4", "6", "8", "10"}                  # end of the baseline
    assert covered[4] == {"1", "3", "5", "7"} and covered[5] == {"9", "11"}   # only what trains
    assert covered[6] == {"1", "3", "5", "7"}


def test_changing_layers_first_in_later_cycles():
    from types import SimpleNamespace as L

    names = [(n, True) for n in "abcd"]
    rot = LayerRotation(2)
    for _ in range(2):
        rot.observe(L(layers=[L(name=n, alpha=3.0) for n, _ in names]))
        rot.take(names), rot.take(names)
    rot.observe(L(layers=[L(name="a", alpha=3.0), L(name="b", alpha=3.0),
                          L(name="c", alpha=3.5), L(name="d", alpha=5.0)]))
    assert rot.take(names) == ["c", "d"] and rot.take(names) == ["a", "b"]


def test_layers_an_action_asks_for_are_added_and_count_as_visited():
    class Watcher:
        calls = []

        def layers_to_watch(self, names):
            self.calls.append(len(names))
            return ["5", "not-a-layer"]

        def on_analysis(self, controller, result, step, epoch):
            pass

    watcher = Watcher()
    ctl = _controller(4, 4, _model(n=12), actions=[watcher])
    covered = _covered(ctl)
    assert all("5" in covered[s] for s in range(1, 5))
    assert covered[1] == {"0", "1", "2", "3", "5"} and covered[2] == {"4", "6", "7", "8", "5"}
    assert covered[3] == {"9", "10", "11", "5"}                 # 5 was visited already
    assert watcher.calls == [12] * 4
    assert requested_layers([object(), watcher], ["5", "6"]) == ["5"]


def test_a_request_for_every_layer_makes_a_full_analysis():
    from ww_callbacks.actions import FreezePolicy

    names = [str(i) for i in range(6)]
    assert requested_layers([FreezePolicy("off")], names) == []
    assert requested_layers([FreezePolicy("apply", order="any")], names) == names    # None: all
    from ww_callbacks.settings import Freeze

    watched = Freeze.suggest().make_policy().layers_to_watch(names)
    assert watched == ["0", "1", "2"]                 # auto-freeze's next prefix
    ctl = _controller(2, 1, _model(n=6), freeze="suggest")
    assert _covered(ctl)[1] == {"0", "1", "2"}       # the rotation's 2 and the policy's 3


def test_exact_names_regex_matches_only_those_names():
    import re

    rx = re.compile(exact_names_regex(["a.b", "a"]))
    assert [n for n in ("a", "a.b", "a.bc", "axb", "xa") if rx.search(n)] == ["a", "a.b"]


def test_the_rotation_resumes_where_it_stopped():
    names = [(str(i), True) for i in range(10)]
    rot = LayerRotation(3)
    rot.take(names)
    state = rot.state_dict()
    other = LayerRotation(3)
    other.load_state_dict(state)
    assert other.take(names) == rot.take(names) == ["3", "4", "5"]
    for _ in range(4):
        rot.take(names)                              # into cycle 2: no per-layer lists kept
    assert set(rot.state_dict()) == {"cycle", "analyses", "queue"} and rot.cycle == 2
    later = LayerRotation(3)
    later.load_state_dict(rot.state_dict())
    assert [later.take(names) for _ in range(3)] == [rot.take(names) for _ in range(3)]
    ctl = WeightWatcherController(output_dir=MEMORY_ONLY, layers_per_analysis=3)
    assert ctl.state_dict()["rotation"]["cycle"] == 0
    assert WeightWatcherController(output_dir=MEMORY_ONLY).state_dict()["rotation"] == {}


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_bad_layers_per_analysis_is_refused(bad):
    with pytest.raises(ValueError, match="layers_per_analysis"):
        WeightWatcherController(layers_per_analysis=bad)


def test_layers_the_engine_would_skip_are_not_rotated():
    from ww_callbacks.executor import AnalysisExecutor

    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4), nn.Linear(4, 16), nn.Linear(16, 16))
    assert AnalysisExecutor().candidates(model, [{}]) == [("0", True), ("3", True)]   # 4 evals < 8
    assert [n for n, _ in AnalysisExecutor(options={"min_evals": 4}).candidates(model, [{}])] == \
        ["0", "1", "2", "3"]


def test_freezing_decisions_start_before_the_observation(tmp_path):
    """``Freeze(start_fraction=...)`` earlier than the callback's: the analyses in between cover
    only the layers auto-freeze judges next, and none once it has nothing left to judge."""
    import numpy as np

    import ww_core
    from ww_callbacks import MEMORY_ONLY, Freeze
    from ww_callbacks.controller import WeightWatcherController

    rng = np.random.default_rng(0)
    sd = {f"l{i}.weight": rng.standard_normal((200, 100)) for i in range(6)}
    names = [la.name for la in ww_core.analyze(sd).layers]
    ctl = WeightWatcherController(start_fraction=0.5, every_n_steps=4, output_dir=MEMORY_ONLY,
                                  trackers=None, log_fn=None, async_analysis=False,
                                  freeze=Freeze.suggest(start_fraction=0.1, max_share=0.5))
    ctl.configure(total_steps=40, current_step=0)
    for step in range(1, 41):
        ctl.maybe_run(sd, step=step, epoch=0)
    ctl.close()
    # 4, 8, 12: the next three of the prefix (the cap allows 3 of 6; the head is protected);
    # they settle at 12 (window 3), so at 16 nothing is left to judge; 20 on: every layer
    assert ctl.history.steps == [4, 8, 12, 20, 24, 28, 32, 36, 40]
    for step in (4, 8, 12):
        assert [r["name"] for r in ctl.history.rows_at(step)] == names[:3]
    assert [r["name"] for r in ctl.history.rows_at(20)] == names
    assert ctl.frozen_layers == names[:3]
    with pytest.raises(ValueError, match="start_fraction"):
        Freeze(start_fraction=1.5)
