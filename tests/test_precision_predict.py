"""``precision="auto"`` predicts which layers need float64 and solves those in float64 directly.

Counted, not timed: ``LayerResult.solves`` is the number of eigensolves of a layer (2 when a float32
solve was rejected and redone). The guarantee is checked against ``precision="float64"`` runs: a
layer solved in float64 (predicted or redone) reports exactly the float64 values, whatever path
(batched or alone) it took.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import ww_core
from ww_core import precision as P
from ww_core.result import LayerResult

KEYS = ("alpha", "xmin", "D", "log_norm", "stable_rank", "matrix_rank", "entropy", "alpha_hill")


def trained_like(rng, rows, cols, alpha=3.5):
    """``U·diag(s)·Vᵀ`` with a power-law profile plus a 30 % Gaussian bulk (an LLM-like layer)."""
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    s = np.arange(1, k + 1, dtype=np.float64) ** (-1.0 / (2.0 * (alpha - 1.0)))
    w = (u * s) @ v.T
    w *= 0.7 / np.linalg.norm(w)
    noise = rng.standard_normal((rows, cols))
    w += noise * (0.3 / np.linalg.norm(noise))
    return (w * 0.02 * math.sqrt(rows * cols)).astype(np.float32)


def low_rank(rng, rows=256, cols=256, rank=16):
    """Rank ``rank``: the rank-collapse flag cannot be decided in float32, in any rounding (most
    eigenvalues are exactly zero in exact arithmetic)."""
    return (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / cols).astype(
        np.float32)


def same_values(a: LayerResult, b: LayerResult) -> bool:
    return all(getattr(a, k) == getattr(b, k) or (math.isnan(getattr(a, k)) and math.isnan(getattr(b, k)))
               for k in KEYS)


@pytest.fixture(scope="module")
def big_models():
    rng = np.random.default_rng(7)
    heavy = {"heavy.weight": trained_like(rng, 1152, 1024)}
    bulk = {"bulk.weight": (rng.standard_normal((1024, 1024)) * 0.02).astype(np.float32)}
    return heavy, bulk


def test_stable_rank_share_numpy_and_torch():
    torch = pytest.importorskip("torch")
    w = np.diag([4.0, 1.0, 1.0, 1.0])[None]                     # Gram eigenvalues 16, 1, 1, 1
    assert P.stable_rank_share(w) == pytest.approx(19 / 64, rel=1e-6)
    assert P.stable_rank_share(torch.from_numpy(w)) == pytest.approx(19 / 64, rel=1e-6)
    assert P.stable_rank_share(torch.from_numpy(w.transpose(0, 2, 1)).to(torch.bfloat16)) == \
        pytest.approx(19 / 64, rel=1e-2)
    assert math.isnan(P.stable_rank_share(np.full((1, 4, 4), np.nan)))
    assert P.mp_stable_rank_share(4000, 1000) == pytest.approx(1 / 2.25)


def test_cheap_facts():
    # small matrices are always tried in float32 first: their re-solve costs little
    assert P.predict_float64(1536, 384, np.zeros((1, 1536, 384), np.float32)) == ""
    # a random-like bulk: its expected alpha-shift bound decides, from the shape alone
    assert P.predict_float64(1024, 1024) == ""
    assert P.predict_float64(4096, 4096).startswith("random-like bulk")
    # non-finite weights: no prediction (the float32 solve then fails and float64 decides)
    assert P.predict_float64(1024, 1024, np.full((1, 1024, 1024), np.inf, np.float32)) == ""
    assert P.first_precision("float32", None, 4096, 4096) == ("float32", "")
    assert P.first_precision("float64", None, 384, 384) == ("float64", "")
    assert P.first_precision("auto", "clip_xmax", 384, 384)[0] == "float64"


def test_previous_analysis_decides():
    prev = LayerResult(name="x", type="dense", N=1024, M=1024)
    prev.float32_check = "KS near-tie between different alphas"
    assert "KS near-tie" in P.predict_float64(1024, 1024, previous=prev)
    prev.float32_check = ""
    assert P.predict_float64(4096, 4096) != ""
    prev.N, prev.M = 4096, 4096
    assert P.predict_float64(4096, 4096, previous=prev) == ""    # float32 passed last time
    prev.float32_check = None                                     # not checked: cheap facts
    assert P.predict_float64(4096, 4096, previous=prev) != ""
    prev.float32_check, prev.M = "x", 2048                         # another shape: ignored
    assert P.predict_float64(4096, 4096, previous=prev) != ""


@pytest.mark.slow                    # (1024-wide layers)
def test_predicted_layers_are_solved_once_in_float64(big_models):
    heavy, bulk = big_models
    auto = ww_core.analyze(heavy).layers[0]
    exact = ww_core.analyze(heavy, precision="float64").layers[0]
    assert auto.precision_reason.startswith("predicted: heavy-tailed")
    assert (auto.precision, auto.solves) == ("float64", 1)       # no float32 solve rejected
    assert same_values(auto, exact)
    assert exact.solves == 1 and exact.float32_check is None and exact.precision_reason == ""
    # the verdict on the float64 spectrum is recorded for the next analysis
    assert isinstance(auto.float32_check, str)
    nxt = ww_core.analyze(heavy, previous=ww_core.analyze(heavy)).layers[0]
    assert nxt.solves == 1
    assert nxt.precision == ("float64" if auto.float32_check else "float32")
    # a random bulk of the same size is tried in float32 (and kept where the check accepts it)
    b = ww_core.analyze(bulk).layers[0]
    assert b.precision_reason == "" or b.precision_reason.startswith("float32 rejected")
    assert b.solves == (1 if b.precision == "float32" else 2)


def test_rejected_layers_go_to_float64_directly_next_time():
    rng = np.random.default_rng(3)
    sd = {"collapsed.weight": low_rank(rng), "gauss.weight": rng.standard_normal((300, 256)).astype(
        np.float32), "heavy.weight": trained_like(rng, 512, 256)}
    exact = {l.name: l for l in ww_core.analyze(sd, precision="float64").layers}
    first = ww_core.analyze(sd)
    by_name = {l.name: l for l in first.layers}
    c = by_name["collapsed"]
    assert (c.precision, c.solves, c.float32_check) == ("float64", 2, "rank collapse undecided")
    assert c.precision_reason == "float32 rejected: rank collapse undecided"
    second = ww_core.analyze(sd, previous=first)
    rejected = 0
    for layer in second.layers:
        before = by_name[layer.name]
        assert before.float32_check is not None
        if before.float32_check:                      # rejected last time: float64, one solve
            rejected += 1
            assert (layer.precision, layer.solves) == ("float64", 1), layer.name
            assert "previous analysis" in layer.precision_reason
            assert same_values(layer, exact[layer.name]) and same_values(before, exact[layer.name])
        else:
            assert layer.precision_reason == "" or layer.solves == 2
        if layer.precision == "float64":              # the float64-exact guarantee
            assert same_values(layer, exact[layer.name]), layer.name
    assert rejected >= 1
    # results without the previous analysis agree with the predicted ones
    assert [l.alpha for l in second.layers] == [l.alpha for l in ww_core.analyze(sd).layers]


@pytest.mark.parametrize("randomize", [False, True])
def test_mixed_plans_in_one_batch_equal_each_layer_alone(randomize):
    """Same-shaped layers share an eigensolver call; a layer planned for float64 is split off into
    its own float64 call (its shuffled replicas stay in the group's float32 call)."""
    rng = np.random.default_rng(5)
    sd = {f"l{i}.weight": trained_like(rng, 320, 256, alpha=3.0 + 0.3 * i) for i in range(3)}
    sd["l3.weight"] = low_rank(rng, 320, 256)         # rejected in float32: solved twice
    prev = ww_core.analyze(sd)
    for layer in prev.layers:                       # force a mixed plan
        layer.float32_check = "forced" if layer.name in ("l0", "l2") else ""
    opts = dict(previous=prev, randomize=randomize, seed=11)
    batched = ww_core.analyze(sd, **opts).layers
    alone = ww_core.analyze(sd, batch_elements=0, **opts).layers
    for layer in (batched[0], batched[2]):
        assert (layer.precision, layer.solves) == ("float64", 1)
        assert "previous analysis" in layer.precision_reason
    assert (batched[3].precision, batched[3].solves) == ("float64", 2)
    assert batched[1].solves == (1 if batched[1].precision == "float32" else 2)
    for a, b in zip(batched, alone):
        assert (a.precision, a.solves, a.precision_reason) == (b.precision, b.solves, b.precision_reason)
        assert same_values(a, b), a.name
        if randomize:
            assert a.rand_distance == b.rand_distance and a.num_traps == b.num_traps


@pytest.mark.slow                    # (1024-wide layers)
def test_explicit_precisions_unchanged_by_previous(big_models):
    heavy, _ = big_models
    prev = ww_core.analyze(heavy)
    prev.layers[0].float32_check = "forced"
    f32 = ww_core.analyze(heavy, precision="float32", previous=prev).layers[0]
    assert (f32.precision, f32.solves, f32.float32_check) == ("float32", 1, None)


def test_the_callbacks_pass_the_previous_result_back(monkeypatch):
    """The controller's executor hands each analysis the last result of every layer
    (``previous=``), so a layer rejected in float32 once is solved in float64 directly after."""
    import ww_core
    from ww_callbacks import MEMORY_ONLY
    from ww_callbacks.controller import WeightWatcherController

    seen = []
    real = ww_core.analyze

    @functools.wraps(real)
    def spy(source, **kw):
        seen.append(kw.get("previous"))
        return real(source, **kw)

    monkeypatch.setattr(ww_core, "analyze", spy)
    rng = np.random.default_rng(0)
    sd = {f"l{i}.weight": rng.standard_normal((200, 100)) for i in range(4)}
    ctl = WeightWatcherController(start_fraction=0.0, every_n_steps=1, output_dir=MEMORY_ONLY,
                                  trackers=None, log_fn=None, async_analysis=False,
                                  layers_per_analysis=2)
    ctl.configure(total_steps=10, current_step=0)
    for step in (1, 2, 3):
        ctl.run(sd, step=step, epoch=0)
    ctl.close()
    assert seen[0] is None
    # analyses 2 and 3 see every layer analysed so far, whichever subset the rotation chose
    first = sorted(r["name"] for r in ctl.history.rows_at(1))
    assert len(seen[1].names) == 2 and sorted(seen[1].names) == first
    assert sorted(seen[2].names) == ["l0", "l1", "l2", "l3"]


def test_rejected_layers_finish_in_model_order_while_later_layers_are_solved(tmp_path, monkeypatch):
    """A rejected layer's float64 re-solve is queued (``spectrum.eigenvalues_later``) while the
    next layers are analysed; more rejected layers than ``MAX_PENDING`` are in flight at some
    point. The result is the same, value for value and in model order, as each layer analysed
    alone and synchronously (``analyze_layer``), as a streamed file (re-solved in place) and as
    ``precision="float64"``."""
    from ww_core.analyze import MAX_PENDING

    rng = np.random.default_rng(21)
    sd = {}
    for i in range(MAX_PENDING + 4):
        sd[f"collapsed{i}.weight"] = low_rank(rng, 192 + 8 * i, 160, rank=12)   # always rejected
        sd[f"gauss{i}.weight"] = rng.standard_normal((200, 96 + 4 * i)).astype(np.float32)
    import ww_core.layer_analysis as layer_analysis

    started = []

    def spy(*args, **kwargs):
        later = real(*args, **kwargs)
        started.append(later)
        return later

    real = layer_analysis.eigenvalues_later
    monkeypatch.setattr(layer_analysis, "eigenvalues_later", spy)
    res = ww_core.analyze(sd)
    monkeypatch.setattr(layer_analysis, "eigenvalues_later", real)
    assert res.names == [k[:-len(".weight")] for k in sd]
    assert len(started) == sum(l.solves == 2 for l in res.layers)
    torch = pytest.importorskip("torch")
    if torch.get_num_threads() >= 2:                 # (one thread: nothing runs in the background)
        assert not any(later.ready for later in started)
    exact = {l.name: l for l in ww_core.analyze(sd, precision="float64").layers}
    alone = {lm.name: ww_core.analyze_layer(lm) for lm in ww_core.find_layers(sd)}
    rejected = [l for l in res.layers if l.solves == 2]
    assert len(rejected) > MAX_PENDING
    for layer in res.layers:
        ref = alone[layer.name]
        assert (layer.precision, layer.solves, layer.precision_reason) == (
            ref.precision, ref.solves, ref.precision_reason), layer.name
        assert same_values(layer, ref), layer.name
        if layer.precision == "float64":
            assert same_values(layer, exact[layer.name]), layer.name
    safetensors = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "model.safetensors"
    safetensors.save_file(sd, str(path))
    streamed = ww_core.analyze(path)                  # (a safetensors file sorts its names)
    assert sorted(streamed.names) == sorted(res.names)
    for a in streamed.layers:
        b = res[a.name]
        assert (a.precision, a.solves) == (b.precision, b.solves), a.name
        if a.precision == "float64":
            assert same_values(a, b), a.name


def test_eigenvalues_later_equals_eigenvalues():
    from ww_core.spectrum import eigenvalues, eigenvalues_later

    rng = np.random.default_rng(0)
    for shape in [(3, 40, 30), (1, 30, 50), (2, 64, 64)]:
        w = rng.standard_normal(shape)
        for prec in ("float32", "float64"):
            np.testing.assert_array_equal(eigenvalues_later(w, prec)(), eigenvalues(w, prec))
    svd = eigenvalues_later(w, "float64", "svd")              # (not queued: solved at once)
    assert svd.ready
    np.testing.assert_array_equal(svd(), eigenvalues(w, "float64", "svd"))
    bad = w.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ww_core.spectrum.NonFiniteError):
        eigenvalues_later(bad)()


def _load_logging_layers(weights, events, streamed=False, broken=()):
    from ww_core.layer_matrices import LayerMatrices

    def loader(i):
        def load():
            events.append(("load", i))
            if i in broken:
                raise OSError(f"cannot read l{i}")
            return weights[i]
        return load

    return [LayerMatrices(name=f"l{i}", type="dense", rf=1, rows=w.shape[1], cols=w.shape[2],
                          load=loader(i), streamed=streamed) for i, w in enumerate(weights)]


def _loads_before_each_yield(events, n):
    return [sum(1 for e in events[:events.index(("yield", i))] if e[0] == "load")
            for i in range(n)]


# 5 shapes, the sixth layer grouped with the first; l{i} has (40 + 10i)·(30 + 5i) entries
_SHAPES = [(40 + 10 * i, 30 + 5 * i) for i in range(5)] + [(40, 30)]


def _pool_busy(monkeypatch, queued):
    """Pretend every started group has ``queued`` solves on the pool (what decides whether more
    are started ahead), so that the test does not depend on how fast the pool is."""
    from ww_core import batching

    monkeypatch.setattr(batching._Started, "running", property(lambda self: queued))


@pytest.mark.parametrize("streamed", [False, True])
def test_groups_are_loaded_in_turn_or_ahead_within_budget(streamed, monkeypatch):
    """``with_eigenvalues`` loads a streamed layer only when the caller reaches it (one in memory
    at a time); in-memory groups are started ahead while the pool has room; either way the
    eigenvalues are those of each layer alone, and come in model order."""
    from ww_core.batching import with_eigenvalues
    from ww_core.spectrum import eigenvalues, pool_solves

    _pool_busy(monkeypatch, 0)
    rng = np.random.default_rng(4)
    weights = [rng.standard_normal((1, r, c)) for r, c in _SHAPES]
    events = []
    order = []
    for lm, _, raw, _, _ in with_eigenvalues(_load_logging_layers(weights, events, streamed),
                                             "float64", "gram", 1 << 20):
        i = int(lm.name[1:])
        order.append(i)
        events.append(("yield", i))
        if raw is not None:
            assert not streamed
            np.testing.assert_array_equal(raw, eigenvalues(weights[i], "float64"))
        else:
            assert streamed
    assert order == list(range(6))
    ahead = not streamed and pool_solves() > 0
    assert _loads_before_each_yield(events, 6) == (
        [6, 6, 6, 6, 6, 6] if ahead else [1, 2, 3, 4, 5, 6] if streamed else [2, 3, 4, 5, 6, 6])


def test_started_ahead_only_within_the_budget(monkeypatch):
    """Groups past the current one are started only while their weight entries fit in
    ``max_elements``, and only while the pool has fewer solves queued than threads."""
    from ww_core.batching import with_eigenvalues
    from ww_core.spectrum import pool_solves

    if not pool_solves():
        pytest.skip("needs torch with two or more threads (the solver pool)")
    rng = np.random.default_rng(5)
    weights = [rng.standard_normal((1, r, c)) for r, c in _SHAPES]

    def loads(queued):
        _pool_busy(monkeypatch, queued)
        events = []
        for lm, _, raw, _, _ in with_eigenvalues(_load_logging_layers(weights, events),
                                                 "float64", "gram", 4200):
            events.append(("yield", int(lm.name[1:])))
            assert raw is not None
        return _loads_before_each_yield(events, 6)

    # entries: l0 1,200, l1 1,750, l2 2,400, l3 3,150, l4 4,000, l5 1,200; groups (l0, l5), l1,
    # l2, l3, l4. With 4,200 besides the current group: at l0, l1 + l2 (4,150) are started
    # ahead; at l2 (l1 done), l3; at l3, l4.
    assert loads(0) == [4, 4, 5, 6, 6, 6]
    assert loads(10 ** 6) == [2, 3, 4, 5, 6, 6]       # a busy pool: nothing started ahead


def test_nothing_is_started_ahead_without_the_solver_pool(monkeypatch):
    """With one torch thread the pool is not used, so each group is loaded in its own turn."""
    torch = pytest.importorskip("torch")
    from ww_core.batching import with_eigenvalues

    _pool_busy(monkeypatch, 0)
    rng = np.random.default_rng(7)
    weights = [rng.standard_normal((1, r, c)) for r, c in _SHAPES]
    events = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for lm, _, raw, _, _ in with_eigenvalues(_load_logging_layers(weights, events), "float64",
                                                 "gram", 1 << 20):
            events.append(("yield", int(lm.name[1:])))
            assert raw is not None
    finally:
        torch.set_num_threads(threads)
    assert _loads_before_each_yield(events, 6) == [2, 3, 4, 5, 6, 6]


def test_a_layer_that_cannot_be_read_fails_in_its_turn():
    """A load error in a group started ahead is raised when that layer comes up, after the
    layers before it were handed out, and names that layer."""
    from ww_core.batching import with_eigenvalues
    from ww_core.errors import failing_layer

    rng = np.random.default_rng(6)
    weights = [rng.standard_normal((1, r, c)) for r, c in _SHAPES]
    events = []
    seen = []
    with pytest.raises(OSError, match="cannot read l3") as info:
        for lm, *_ in with_eigenvalues(_load_logging_layers(weights, events, broken={3}),
                                       "float64", "gram", 1 << 20):
            seen.append(lm.name)
    assert seen == ["l0", "l1", "l2"]
    assert failing_layer(info.value) == "l3"


def test_ks_shift_benchmark_runs_and_reports_every_layer(tmp_path):
    """``benchmarks/ks_shift.py --quick`` (the measurement behind ``KS_SLACK``): every layer is
    solved both ways and measured, a near-best shift is one of the shifts, and no layer the
    float32 check accepts reports an alpha off float64's by more than ``ALPHA_TOL``."""
    import json
    import subprocess
    import sys

    from helpers import REPO

    out = tmp_path / "ks.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ks_shift.py"), "--quick",
                           "--out", str(out)], cwd=str(REPO), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    s = report["summary"]
    assert s["layers"] == s["measured"] == 4
    assert 0.0 <= s["near_dD"] <= s["max_dD"] < 1.0
    assert s["accepted_but_off"] == []
    assert s["ks_slack"] == P.KS_SLACK
    assert {r["layer"] for r in report["layers"]["synthetic"]} == {
        "trained_like.0", "trained_like.1", "student_t.256", "gaussian.256"}
