"""Ground-truth tests of the engine: WeightWatcher's reference values, theory, and bad input.

Reference values: ``tests/data/ww077_reference.json``, what WeightWatcher 0.7.7 itself computes on
``reference_model()`` (written by ``benchmarks/ww_reference_tables.py`` under the reference venv;
``tox -e agreement`` regenerates it and fails if the committed file no longer matches).

Exactness: results are compared bit for bit only where the same tensor reaches the same eigensolver
call in the same process (a module and its own state dict, a call repeated, one file read twice by
the same reader); anything else is compared within a documented tolerance, so that no test depends
on how a BLAS/LAPACK build (Intel or AMD, its thread count, a buffer's alignment) rounds:

* float64 results, against WeightWatcher's float64 values or another float64 route: ``F64_REL``;
* the default (``precision="auto"``: float32 where its checks pass) against float64: the float32
  bounds of ww_core/precision.py (helpers.float32_alpha_tol, helpers.float32_resolution);
* the theory tests use the default, their tolerances being far above float32's error."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import ww_core
from helpers import float32_alpha_tol, float32_resolution, reference_model, spec_matrices
from ww_core.powerlaw import EVALS_THRESH, fit_powerlaw, hill_alpha

torch = pytest.importorskip("torch")

#: WeightWatcher 0.7.7 on reference_model() (see the module docstring).
WW077 = json.loads((Path(__file__).parent / "data" / "ww077_reference.json").read_text())

#: Relative tolerance between two float64 computations of the same layer by different routes:
#: ours and WeightWatcher's (its SVD of each matrix, our eigensolve of the Gram matrix), or ours
#: alone and in a batch, from a file, on another thread count. Either route puts each eigenvalue
#: within ~n·eps·λ_max (≈1e-13·λ_max for n ≤ 576) of the exact one on any LAPACK build, and every
#: float compared is a smooth function of the eigenvalues once the discrete choices are made
#: (xmin, i.e. num_pl_spikes, and matrix_rank are compared exactly). Measured against
#: WeightWatcher on reference_model(): at most 6e-14. 1e-9 leaves four orders of magnitude for other
#: machines, and is still far below what any change of formula produces (≥ 1e-6).
F64_REL = 1e-9

#: ww_core's name -> WeightWatcher's column, for the per-layer values compared with WeightWatcher.
WW_COLUMN = {k: k for k in ("N", "M", "rf", "num_evals", "alpha", "xmin", "xmax", "D", "sigma",
                            "num_pl_spikes", "log_norm", "log_spectral_norm", "alpha_weighted",
                            "log_alpha_norm", "stable_rank", "entropy", "matrix_rank", "status",
                            "warning")}
WW_COLUMN["spectral_norm"] = "lambda_max"


def assert_matches_ww(got, expected, label):
    """``got`` (a ww_core value) equals WeightWatcher's ``expected``: exactly for integers and
    strings, within F64_REL for floats."""
    if isinstance(expected, (str, bool)) or isinstance(expected, int):
        assert got == expected, (label, got, expected)
    else:
        assert got == pytest.approx(expected, rel=F64_REL, abs=1e-12), (label, got, expected)


@pytest.fixture(scope="module")
def model():
    return reference_model()


@pytest.fixture(scope="module")
def result(model):
    """float64: WeightWatcher's numbers to rounding (the default, "auto", is checked below)."""
    return ww_core.analyze(model, precision="float64")


def test_reference_model_is_the_one_weightwatcher_ran(model):
    import hashlib

    for name, digest in WW077["weights_sha256"].items():
        w = getattr(model, name).weight.detach().numpy()
        assert hashlib.sha256(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest() == digest, name


def test_reference_values_match_weightwatcher(result):
    assert result.names == WW077["analyzed"] == ["conv", "fc1", "fc2"]
    for name, expected in WW077["analyze"].items():
        layer = result[name]
        for ours, theirs in WW_COLUMN.items():
            assert_matches_ww(getattr(layer, ours), expected[theirs], (name, ours))


def test_shapes_and_skips(result):
    conv = result["conv"]
    assert conv.scale == 0.5
    assert [(s.name, s.reason.split(" (")[0]) for s in result.skipped] == [("small", "too few eigenvalues")]


def test_summary_matches_weightwatcher(result):
    summary = result.summary()
    for key, value in WW077["summary"].items():
        assert_matches_ww(summary[key], value, key)
    assert summary["num_layers"] == 3


def test_clip_xmax_matches_weightwatcher(model):
    res = ww_core.analyze(model, fix_fingers="clip_xmax", precision="float64")
    assert res["conv"].num_fingers == 1            # the case this checks: one finger clipped
    for name, expected in WW077["clip_xmax"].items():
        for key, value in expected.items():
            assert_matches_ww(getattr(res[name], key), value, (name, key))


def test_float32_and_svd_agree_with_float64(model, result):
    """float32 (unchecked), the SVD solver (in the default precision) and the default agree with
    float64 to the 0.01 agreement tolerance, or to the float32 bound of ww_core/precision.py
    where that is larger (conv, alpha 22: 0.011), so on any CPU's LAPACK."""
    for kwargs in (dict(precision="float32"), dict(solver="svd"), dict()):
        other = ww_core.analyze(model, **kwargs)
        for a, b in zip(result, other):
            tol = max(0.01, float32_alpha_tol(a))
            assert b.alpha == pytest.approx(a.alpha, abs=tol), (kwargs, a.name)


def assert_float32_close(b, a):
    """``b`` (a default, ``precision="auto"``, layer) within the float32 bounds of
    ww_core/precision.py of ``a`` (the same layer in float64), whatever the CPU's LAPACK rounds:
    alpha within helpers.float32_alpha_tol; every eigenvalue, so λ_max and, for the same tail (same
    num_pl_spikes), xmin, within ν (helpers.float32_resolution); the norms derived from them
    accordingly. A layer "auto" re-solved in float64 is within F64_REL of ``a``."""
    assert (b.name, b.N, b.M, b.num_evals, b.status) == (a.name, a.N, a.M, a.num_evals, a.status)
    assert a.precision == "float64" and b.precision in ("float32", "float64")
    if b.precision == "float64":
        _assert_same_record(b.to_dict(), a.to_dict(), rel=F64_REL)
        return
    tol, nu = float32_alpha_tol(a), float32_resolution(a)
    assert b.alpha == pytest.approx(a.alpha, abs=tol), a.name
    if b.num_pl_spikes == a.num_pl_spikes:   # same tail (a near-tie may pick another)
        assert b.xmin == pytest.approx(a.xmin, abs=2 * nu), a.name
    assert b.warning == a.warning, a.name
    assert b.spectral_norm == pytest.approx(a.spectral_norm, abs=2 * nu), a.name
    # relative error of λ_max: ν/λ_max = 4(√M+√N)·eps32 < 3e-5; of the trace (log_norm) less
    for key in ("log_norm", "log_spectral_norm", "stable_rank"):
        assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-4, abs=1e-4), (a.name, key)
    # alpha_weighted = alpha · log10(λ_max)
    assert b.alpha_weighted == pytest.approx(
        a.alpha_weighted, abs=tol * abs(a.log_spectral_norm) + 1e-4 * abs(a.alpha)), a.name


def test_auto_precision_keeps_float32_only_where_it_agrees(model, result):
    """The default solves in float32 and keeps it where the checks pass, within the bounds of
    ww_core/precision.py (measured on these layers: alpha ≤ 2e-4 off, the largest at alpha 22).
    The warning (alpha > 6 or < 2) is far from its thresholds on these layers."""
    auto = ww_core.analyze(model)
    assert auto.options["precision"] == "auto"
    assert auto.names == result.names
    for a, b in zip(result, auto):
        assert_float32_close(b, a)


def _assert_same_record(got, expected, rel):
    """Two records equal: floats within ``rel`` (0: bit for bit; NaN equals NaN), the rest exactly."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float) and rel == 0:
            assert got[key] == value or (got[key] != got[key] and value != value), key
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-12, nan_ok=True), key
        else:
            assert got[key] == value, key


def test_auto_precision_resolves_near_ties_in_float64():
    """A KS near-tie between different alphas, an undecidable rank collapse and a failed fit
    send a layer back to float64; a clean fit stays in float32."""
    from ww_core.powerlaw import PowerLawFit
    from ww_core.precision import float32_disagreement

    evals = np.linspace(1.0, 10.0, 200)
    kw = dict(rank_tol=1e-6, rank_collapse_share=0.1)

    def fit(D, alpha):
        x = evals[:-1]
        best = int(np.argmin(D))
        return PowerLawFit(alpha=alpha[best], xmin=x[best], D=D[best], status="success",
                           candidate_D=D, candidate_alpha=alpha, candidate_x=x)

    D = np.linspace(0.5, 0.1, 199)
    alpha = np.full(199, 3.0)
    assert float32_disagreement(evals, fit(D, alpha), 400, 200, **kw) is None
    D_tie = D.copy()
    D_tie[50] = D[-1] + 1e-5                        # a far-away candidate, almost as good
    alpha_tie = alpha.copy()
    alpha_tie[50] = 2.5
    assert "near-tie" in float32_disagreement(evals, fit(D_tie, alpha_tie), 400, 200, **kw)
    assert float32_disagreement(evals, fit(D_tie, alpha), 400, 200, **kw) is None  # same alpha
    collapsed = np.concatenate([np.full(40, 1e-5), evals[40:]])
    assert "rank collapse" in float32_disagreement(collapsed, fit(D, alpha), 400, 200, **kw)
    assert float32_disagreement(evals, PowerLawFit(), 400, 200, **kw) == "no regular fit"


def test_auto_precision_rank_collapse_decided_in_float64():
    """30% of the directions at 1e-5·λ_max: below float32's resolution (≈1e-4·λ_max here), not
    collapsed in float64 (rank_tol 1e-6); "auto" re-solves in float64 and agrees with it."""
    rng = np.random.default_rng(0)
    U, _ = np.linalg.qr(rng.standard_normal((512, 256)))
    V, _ = np.linalg.qr(rng.standard_normal((256, 256)))
    s = np.sqrt(np.concatenate([np.full(77, 1e-5), np.linspace(0.1, 1.0, 179)]))
    W = {"w.weight": torch.tensor((U * s) @ V.T, dtype=torch.float32)}
    f64 = ww_core.analyze(W, precision="float64")["w"]
    f32 = ww_core.analyze(W, precision="float32")["w"]
    auto = ww_core.analyze(W)["w"]
    assert "rank-collapse" not in f64.flags
    assert auto.precision == "float64"
    # the same tensor, solved alone in float64 by the same call both times: bit for bit
    _assert_same_record(auto.to_dict(), f64.to_dict(), rel=0)
    assert f32.precision == "float32" and f32.matrix_rank < f64.matrix_rank   # unresolved in f32


# ----------------------------------------------------------------------- the fitter, by the book

def naive_ww_fit(evals):
    """WeightWatcher 0.7.7's power-law fit, written out loop by loop (no vectorisation).

    Eigenvalues ≤ EVALS_THRESH are dropped, the rest sorted. With n ≥ 20: every value but the
    largest is an xmin candidate; alpha = 1 + m / Σ log(x/xmin) over the m values ≥ xmin (the MLE
    of a continuous power law), D = the KS distance between those values and that power law, or 1
    when alpha ≤ 1; the candidate with the smallest D wins (the first on ties). With n < 20 (its
    small-N path), every value is a candidate, alpha uses the unbiased m - 1 and a candidate needs
    m ≥ 8 values and a non-zero spread, else alpha is NaN and D = 1. sigma = (alpha - 1)/√m.
    """
    x = np.sort(np.asarray(evals, dtype=float))
    x = x[x > EVALS_THRESH]
    n = len(x)
    best = None
    if n >= 20:
        for i in range(n - 1):
            m = n - i
            a = 1 + m / (np.sum(np.log(x[i:])) - m * np.log(x[i]))
            if a > 1:
                D = max(abs(1 - (x[i + k] / x[i]) ** (1 - a) - k / m) for k in range(m))
            else:
                D = 1.0
            if best is None or D < best[2]:
                best = (a, x[i], D, (a - 1) / math.sqrt(m))
    else:
        for i in range(n):
            m = n - i
            S = np.sum(np.log(x[i:] / x[i]))
            if m >= 8 and S > 1e-12:
                a = 1 + (m - 1) / S
                D = max(abs(1 - (x[i + k] / x[i]) ** (1 - a) - k / m) for k in range(m)) if a > 1 else 1.0
            else:
                a, D = float("nan"), 1.0
            if best is None or D < best[2]:
                best = (a, x[i], D, (a - 1) / math.sqrt(m))
    return best


@pytest.mark.parametrize("seed,n", [(0, 12), (1, 19), (2, 20), (3, 64), (4, 300)])
def test_fit_matches_literal_definition(seed, n):
    rng = np.random.default_rng(seed)
    evals = np.exp(rng.standard_normal(n) * 1.5)          # a spread-out, tail-heavy spectrum
    alpha, xmin, D, sigma = naive_ww_fit(evals)
    fit = fit_powerlaw(evals)
    assert fit.small_n == (n < 20)
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.xmin == pytest.approx(xmin, rel=1e-12)
    assert fit.D == pytest.approx(D, rel=1e-9)
    assert fit.sigma == pytest.approx(sigma, rel=1e-9)


def test_fit_hand_example():
    # Tail of a geometric sequence 1, 2, 4, ...: the exact first-minimum rules decide xmin.
    x = 2.0 ** np.arange(25)
    alpha, xmin, D, _ = naive_ww_fit(x)
    fit = fit_powerlaw(x[::-1])                             # order of the input does not matter
    assert (fit.alpha, fit.xmin, fit.D) == pytest.approx((alpha, xmin, D), rel=1e-10)
    assert fit.xmax == x[-1]


def test_fit_recovers_known_exponent():
    # i.i.d. Pareto samples with survival exponent mu have density exponent mu + 1 exactly.
    for seed, mu in [(0, 1.5), (1, 2.0), (2, 3.0)]:
        x = np.random.default_rng(seed).pareto(mu, 5000) + 1.0
        fit = fit_powerlaw(x)
        assert abs(fit.alpha - (mu + 1)) < 4 * fit.sigma + 0.02, (mu, fit.alpha, fit.sigma)


def test_fit_failure_is_not_an_exception():
    for bad in ([], [1.0], [0.0] * 30, [2.0] * 30, [np.nan, np.inf, 1.0, 2.0]):
        fit = fit_powerlaw(bad)
        assert fit.status == "failed" and math.isnan(fit.alpha)


def test_hill_alpha_formula():
    x = np.arange(1.0, 101.0)
    i = 50
    expected = 1 + (100 - i) / np.sum(np.log(x[i:] / x[i]))
    assert hill_alpha(x) == pytest.approx(expected, rel=1e-12)
    assert hill_alpha(x, xmin_pos=1.5) == pytest.approx(1 + 34 / np.sum(np.log(x[66:] / x[66])))


# ----------------------------------------------------------------------- theory

def test_marchenko_pastur_matrix_is_under_trained():
    for seed in range(3):
        W = np.random.default_rng(seed).standard_normal((800, 400))
        layer = ww_core.analyze({"w.weight": W})["w"]
        assert layer.alpha > 6 and "under-trained" in layer.flags, layer.alpha


@pytest.mark.parametrize("mu", [1.0, 1.5])
def test_heavy_tailed_entries_give_theoretical_alpha(mu):
    # Entries with a Pareto tail P(|w| > t) ~ t^-mu, mu < 2: the top eigenvalues are the squared
    # largest entries, so the ESD tail exponent is 1 + mu/2 (HT-SR, Lévy regime). 5 seeds at
    # 1000×500 gave 1.41–1.54 (mu=1) and 1.76–1.95 (mu=1.5): finite size biases alpha upward by
    # up to ~0.2, so the tolerance is 0.25.
    rng = np.random.default_rng(7)
    W = rng.choice([-1, 1], size=(1000, 500)) * (rng.pareto(mu, size=(1000, 500)) + 1)
    layer = ww_core.analyze({"w.weight": W})["w"]
    assert abs(layer.alpha - (1 + mu / 2)) < 0.25, layer.alpha
    assert "over-trained" in layer.flags


def test_rank_deficient_and_nan_matrices_are_flagged_not_raised():
    rng = np.random.default_rng(0)
    low_rank = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 200))
    nan = rng.standard_normal((100, 50))
    nan[3, 4] = np.nan
    inf = rng.standard_normal((100, 50))
    inf[0, 0] = np.inf
    res = ww_core.analyze({"lr.weight": low_rank, "nan.weight": nan, "inf.weight": inf,
                           "zero.weight": np.zeros((64, 32))})
    assert "rank-collapse" in res["lr"].flags
    assert res["lr"].rank_collapse == pytest.approx(195 / 200)
    assert res["lr"].matrix_rank == 5
    # (default precision: "auto" decides a rank collapse in float64, so matrix_rank is exact)
    assert res["lr"].precision == "float64"
    for name in ("nan", "inf"):
        assert res[name].flags == ("non-finite",) and res[name].status == "failed"
        assert math.isnan(res[name].alpha)
    assert "fit-failed" in res["zero"].flags and "rank-collapse" in res["zero"].flags


# ----------------------------------------------------------------------- layer types and sources

def test_same_weights_same_results_module_state_dict_safetensors(tmp_path, model, result):
    st = pytest.importorskip("safetensors.torch")
    sd = {k: v for k, v in model.state_dict().items()}
    path = tmp_path / "model.safetensors"
    st.save_file(sd, str(path))
    torch.save(sd, tmp_path / "model.pt")
    auto = ww_core.analyze(model)
    # Bit for bit where the same tensors reach the same eigensolver calls: the module and its own
    # state dict (the very same Parameters, batched alike), and one file given as a Path, a str or
    # its folder (the same reader, the same bytes, one layer at a time).
    assert ww_core.analyze(sd, precision="float64").to_records() == result.to_records()
    assert ww_core.analyze(sd).to_records() == auto.to_records()
    from_file = (ww_core.analyze(path, precision="float64").to_records(), ww_core.analyze(path).to_records())
    for same in (str(path), tmp_path):
        assert (ww_core.analyze(same, precision="float64").to_records(),
                ww_core.analyze(same).to_records()) == from_file, same
    # Numpy arrays, a file read into new buffers, a layer solved alone instead of in a batch: the
    # same values reach the same solver, but a BLAS/LAPACK build may round another buffer or batch
    # differently, so within F64_REL in float64 and the float32 bounds by default.
    for source in ({k: v.numpy() for k, v in sd.items()}, path, tmp_path / "model.pt"):
        label = source if not isinstance(source, dict) else "numpy dict"
        f64 = ww_core.analyze(source, precision="float64")
        assert f64.names == result.names, label
        for got, ref in zip(f64, result):
            _assert_same_record(got.to_dict(), ref.to_dict(), rel=F64_REL)
        for got, ref in zip(ww_core.analyze(source), result):
            assert_float32_close(got, ref)


def assert_same_spectrum(got, expected):
    """Our float64 eigenvalues (eigensolve of the Gram matrix) against numpy's float64 SVD: each
    eigenvalue is within ~n·eps·λ_max of the exact one on either route, so the large ones agree to
    ~1e-13 relative, and the small ones to 1e-12·λ_max in absolute terms (their relative error is
    amplified by λ_max/λ, which depends on the random draw): rtol 1e-9 plus atol 1e-12·λ_max hold
    on any LAPACK build; a wrong slicing, scale or transpose moves eigenvalues by far more."""
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12 * np.max(expected))


def test_torch_layer_types_and_names():
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(100, 32)
            self.c1 = torch.nn.Conv1d(16, 32, 3)
            self.c3 = torch.nn.Conv3d(8, 16, 2)
            self.attn = torch.nn.MultiheadAttention(32, 4)
            self.head = torch.nn.Linear(32, 100)
            self.head.weight = self.emb.weight               # tied: analysed once

    net = Net()
    res = ww_core.analyze(net)
    got = {(l.name, l.type, l.rf, l.N, l.M) for l in res}
    assert got == {("emb", "embedding", 1, 100, 32), ("c1", "conv1d", 3, 32, 16),
                   ("c3", "conv3d", 8, 16, 8), ("attn.in_proj_q", "dense", 1, 32, 32),
                   ("attn.in_proj_k", "dense", 1, 32, 32), ("attn.in_proj_v", "dense", 1, 32, 32),
                   ("attn.out_proj", "dense", 1, 32, 32)}
    # q, k, v really are the three blocks of the fused matrix
    q = net.attn.in_proj_weight.detach().double()[32:64].numpy()
    ev = np.sort(np.linalg.svd(q, compute_uv=False) ** 2)
    k = ww_core.analyze(net, layers=r"in_proj_k$", keep_evals=True, precision="float64")["attn.in_proj_k"]
    assert_same_spectrum(k.evals, ev)
    # the conv slices: one out×in matrix per kernel position, pooled, × 0.5
    c1 = ww_core.analyze(net, layers="^c1$", keep_evals=True, precision="float64")["c1"]
    w = net.c1.weight.detach().double().numpy()
    ev = np.sort(np.concatenate([np.linalg.svd(w[:, :, i], compute_uv=False) ** 2 for i in range(3)])) * 0.5
    assert_same_spectrum(c1.evals, ev)


def test_hf_conv1d_is_one_matrix():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(96, 32)                                   # weight (in=32, out=96)
    res = ww_core.analyze(torch.nn.ModuleDict({"c_attn": layer}), keep_evals=True, precision="float64")
    (l,) = res.layers
    assert (l.name, l.type, l.N, l.M) == ("c_attn", "dense", 96, 32)
    ev = np.sort(np.linalg.svd(layer.weight.detach().double().numpy(), compute_uv=False) ** 2)
    assert_same_spectrum(l.evals, ev)


def test_filters_and_bounds(model):
    assert ww_core.analyze(model, layers="^fc").names == ["fc1", "fc2"]
    assert ww_core.analyze(model, layers=["conv", "fc2"]).names == ["conv", "fc2"]
    assert ww_core.analyze(model, layer_types=["conv2d"]).names == ["conv"]
    res = ww_core.analyze(model, max_evals=500)
    assert res.names == ["fc1", "fc2"]
    assert "max_evals" in {s.name: s.reason for s in res.skipped}["conv"]
    assert ww_core.analyze(model, min_evals=4).names[-1] == "small"
    with pytest.raises(ValueError, match="unknown layer types"):
        ww_core.analyze(model, layer_types=["lstm"])
    with pytest.raises(ValueError, match="regex"):
        ww_core.analyze(model, layers="(")
    with pytest.raises(ValueError, match="fix_fingers"):
        ww_core.analyze(model, fix_fingers="xmin_peak")


def test_dtypes_meta_and_lazy_parameters():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 128)
    res64 = ww_core.analyze({"l.weight": base.weight.detach()})["l"]
    for dt in (torch.float16, torch.bfloat16):
        layer = ww_core.analyze({"l.weight": base.weight.detach().to(dt)})["l"]
        assert layer.alpha == pytest.approx(res64.alpha, abs=0.2)   # rounding of the weights only
    with torch.device("meta"):
        meta = torch.nn.Linear(64, 128)
    lazy = torch.nn.LazyLinear(10)
    res = ww_core.analyze(torch.nn.ModuleDict({"meta": meta, "lazy": lazy}))
    assert len(res) == 0
    reasons = {s.name: s.reason for s in res.skipped}
    assert "meta" in reasons["meta"] and "lazy" in reasons["lazy"]
    q = ww_core.analyze({"q.weight": torch.zeros(64, 32, dtype=torch.int8)})
    assert len(q) == 0 and "non-float" in q.skipped[0].reason


def test_bad_files_give_one_line_errors(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    with pytest.raises(FileNotFoundError):
        ww_core.analyze(tmp_path / "missing.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ww_core.SourceError, match="unknown format"):
        ww_core.analyze(tmp_path / "notes.txt")
    good = tmp_path / "good.safetensors"
    st.save_file({"a.weight": np.ones((64, 32), dtype=np.float32)}, str(good))
    data = good.read_bytes()
    for name, blob in [("trunc.safetensors", data[:-100]), ("junk.safetensors", b"\x00" * 3),
                       ("hdr.safetensors", data[:8] + b"{not json" + data[17:])]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ww_core.SourceError) as info:
            ww_core.analyze(tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value)
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x.weight": torch.ones(8, 8), "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ww_core.SourceError, match="weights_only"):
        ww_core.analyze(tmp_path / "evil.pt")


def test_bf16_safetensors_without_torch_reader(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(1)
    w = torch.randn(96, 48).to(torch.bfloat16)
    st.save_file({"l.weight": w}, str(tmp_path / "bf.safetensors"))
    # ww_core widens bf16 itself (numpy has no bfloat16): exactly torch's float32 values, so the
    # float64 spectra agree as two float64 routes do (F64_REL; one from a numpy buffer, one from a
    # torch tensor), and the default ones within float32's resolution ν. A wrong decoding of the
    # 16 bits would move the eigenvalues by ~1e-2 relative or more.
    from_file = ww_core.analyze(tmp_path / "bf.safetensors", keep_evals=True, precision="float64")["l"]
    from_tensor = ww_core.analyze({"l.weight": w}, keep_evals=True, precision="float64")["l"]
    np.testing.assert_allclose(from_file.evals, from_tensor.evals, rtol=F64_REL,
                               atol=1e-12 * from_tensor.evals.max())
    nu = float32_resolution(from_tensor)
    f32_file = ww_core.analyze(tmp_path / "bf.safetensors", keep_evals=True)["l"]
    f32_tensor = ww_core.analyze({"l.weight": w}, keep_evals=True)["l"]
    np.testing.assert_allclose(f32_file.evals, from_tensor.evals, rtol=0, atol=nu)
    np.testing.assert_allclose(f32_tensor.evals, from_tensor.evals, rtol=0, atol=nu)


def test_keras_layers_match_numpy():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras tests run on the torch backend (KERAS_BACKEND=torch)")
    keras.utils.set_random_seed(0)
    inp = keras.Input((10, 16))
    x = keras.layers.Conv1D(24, 3, name="conv")(inp)
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=12, name="mha")(x, x)
    x = keras.layers.Dense(32, name="dense")(x)
    model = keras.Model(inp, x)
    res = ww_core.analyze(model, keep_evals=True, precision="float64")
    by_name = {l.name.rsplit(".", 1)[-1]: l for l in res}
    assert {"conv", "dense", "query", "key", "value", "attention_output"} <= set(by_name)
    assert by_name["conv"].type == "conv1d" and by_name["conv"].rf == 3
    q = by_name["query"]
    assert (q.N, q.M) == (24, 24)                      # (24, 2 heads, 12) kernel -> 24 × 24
    kernel = keras.ops.convert_to_numpy(model.get_layer("dense").kernel).astype(float)
    assert_same_spectrum(by_name["dense"].evals, np.sort(np.linalg.svd(kernel, compute_uv=False) ** 2))
    # same conv weights in torch layout give the same spectrum
    k = keras.ops.convert_to_numpy(model.get_layer("conv").kernel)       # (k, in, out)
    tw = np.transpose(k, (2, 1, 0))                                       # (out, in, k)
    t = ww_core.analyze({"conv.weight": tw}, keep_evals=True, precision="float64")["conv"]
    assert_same_spectrum(t.evals, by_name["conv"].evals)


# ----------------------------------------------------------------------- correlation traps

def test_planted_spike_is_a_correlation_trap():
    # A rank-one spike concentrated on one entry (u, v = basis vectors) survives the element-wise
    # shuffle, so the randomised ESD keeps an eigenvalue far beyond the MP edge: a trap. A
    # delocalised rank-one spike of the same strength is real structure: an MP spike, but the
    # shuffle spreads it out, so no trap.
    rng = np.random.default_rng(3)
    G = rng.standard_normal((600, 300)) / np.sqrt(600)
    local = G.copy()
    local[10, 20] += 6.0
    u, v = rng.standard_normal(600), rng.standard_normal(300)
    deloc = G + 6.0 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    res = ww_core.analyze({"g.weight": G, "local.weight": local, "deloc.weight": deloc},
                          randomize=True, mp_fit=True, seed=0)
    assert res["local"].num_traps >= 1 and "correlation-trap" in res["local"].flags
    assert res["deloc"].num_traps == 0 and "correlation-trap" not in res["deloc"].flags
    assert res["deloc"].num_spikes >= 1                      # the MP fit sees the real spike
    assert res["g"].num_traps == 0 and res["g"].rand_distance < 0.01
    assert res["local"].max_rand_eval > 30                   # ~ 6² survives the shuffle


def test_randomize_is_reproducible_with_a_seed():
    A, B, _ = spec_matrices()
    sd = {"a.weight": A, "b.weight": B}
    r1 = ww_core.analyze(sd, randomize=True, seed=42).to_records()     # same run twice
    r2 = ww_core.analyze(sd, randomize=True, seed=42).to_records()
    r3 = ww_core.analyze(sd, randomize=True, seed=43).to_records()
    assert r1 == r2
    assert [r["max_rand_eval"] for r in r1] != [r["max_rand_eval"] for r in r3]
    r64 = ww_core.analyze(sd, randomize=True, seed=42, precision="float64").to_records()
    # The number of traps of the heavy-tailed B depends on the shuffle: it lies within the range
    # WeightWatcher 0.7.7 gives over its recorded seeds (10-13 over 8 seeds), A has none.
    traps = [by_layer["fc2"]["num_traps"] for by_layer in WW077["randomize"]["by_seed"].values()]
    assert min(traps) <= r64[1]["num_traps"] <= max(traps)
    assert r64[0]["num_traps"] == 0
