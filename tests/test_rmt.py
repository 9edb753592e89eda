"""Tests for ww_core.rmt: the Marchenko–Pastur fit, slice shuffling, rand_distance and traps.

Reference values: ``tests/data/ww077_reference.json``, what WeightWatcher 0.7.7 computes on the
three matrices of helpers.spec_matrices (``analyze(mp_fit=True)``, ``analyze(randomize=True)``
over several seeds; written by ``benchmarks/ww_reference_tables.py``, checked against
WeightWatcher itself by ``tox -e agreement``). The eigenvalues they are compared on are float64
(numpy SVD of float64 copies), as WeightWatcher's.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from helpers import spec_matrices
from ww_core import rmt

pytestmark = pytest.mark.core   # numpy/scipy only (the sklearn and torch tests skip themselves)

#: WeightWatcher 0.7.7 on the matrices of helpers.spec_matrices (see the module docstring).
WW077 = json.loads((Path(__file__).parent / "data" / "ww077_reference.json").read_text())

# --------------------------------------------------------------------------------------------
# fixtures: the reference matrices
# --------------------------------------------------------------------------------------------


def _evals(batch: np.ndarray) -> np.ndarray:
    """Pooled, sorted σ² of float64 copies of each slice (WW's combined_eigenvalues)."""
    return np.sort(np.concatenate(
        [np.linalg.svd(np.asarray(W, dtype=np.float64), compute_uv=False) ** 2 for W in batch]
    ))


@pytest.fixture(scope="module")
def ref_matrices():
    """helpers.spec_matrices (float32 A, B, C) as float64 batches, as WeightWatcher sees them."""
    A, B, C = spec_matrices()
    # Conv slices C[:, :, i, j] in row-major order, scaled so the eigenvalues are x0.5 (pooled).
    conv = np.stack([C[:, :, i, j] for i in range(3) for j in range(3)]).astype(np.float64)
    conv_scaled = conv * np.sqrt(0.5)
    return {
        # name: (batch of scaled matrices, pooled evals, M for the TW term)
        "conv": (conv_scaled, _evals(conv) * 0.5, 64),
        "fc1": (A[None].astype(np.float64), _evals(A[None]), 500),
        "fc2": (B[None].astype(np.float64), _evals(B[None]), 500),
    }


#: ours against WeightWatcher's mp_fit columns. Both fit the same float64 eigenvalues (numpy's
#: SVD here, WeightWatcher's own SVD there) by the same grid search: measured ≤ 2e-15 relative.
#: The grid point chosen is discrete and every column is a smooth function of it and of the
#: eigenvalues (each within ~n·eps·λ_max on any LAPACK build), so 1e-9 holds on any CPU while a
#: change of kernel, grid or normalisation moves these values by far more.
MP_REL = 1e-9


# --------------------------------------------------------------------------------------------
# mp_fit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["conv", "fc1", "fc2"])
def test_mp_fit_matches_weightwatcher(ref_matrices, name):
    _, evals, M = ref_matrices[name]
    fit = rmt.mp_fit(evals, Q=2.0, M=M)
    assert set(fit) == set(rmt.MP_FIT_KEYS)
    expected = WW077["mp_fit"][name]
    for key in ("W_scale", "sigma_mp", "bulk_max", "bulk_min", "mp_softrank"):
        assert fit[key] == pytest.approx(expected[key], rel=MP_REL), key
    assert fit["num_spikes"] == expected["num_spikes"]
    assert isinstance(fit["num_spikes"], int)


def test_linear_kde_matches_sklearn(ref_matrices):
    neighbors = pytest.importorskip("sklearn.neighbors")
    for name in ("conv", "fc2"):
        evals = ref_matrices[name][1]
        x = np.linspace(0, evals.max() + 0.5, 1000)
        kde = neighbors.KernelDensity(kernel="linear", bandwidth=0.1).fit(evals.reshape(-1, 1))
        ref = np.exp(kde.score_samples(x[:, None]))
        np.testing.assert_allclose(rmt.linear_kde(evals, x), ref, rtol=1e-10, atol=1e-12)


def _ww_resid_mp(sigma, evals, Q, bw, neighbors):
    """WeightWatcher 0.7.7's resid_mp(allresid=False), sklearn KDE refitted at every call."""
    sigma = np.asarray(sigma).ravel()[0]
    kde = neighbors.KernelDensity(kernel="linear", bandwidth=bw).fit(evals.reshape(-1, 1))
    xde = np.linspace(0, np.max(evals) + 0.5, 1000)
    yde = np.exp(kde.score_samples(xde[:, None]))
    good = np.where(yde > 0.01)[0]
    xde, yde = xde[good], yde[good]
    y = 1 / Q
    b = np.power(sigma * (1 + np.sqrt(1 / Q)), 2)
    a = np.power(sigma * (1 - np.sqrt(1 / Q)), 2)
    with np.errstate(all="ignore"):
        ymp = np.nan_to_num((1 / (2 * np.pi * sigma * sigma * xde * y)) * np.sqrt((b - xde) * (xde - a)))
    peak = xde[np.where(yde == max(yde))][0]
    if (b < peak) | (b > max(xde)) | (a > peak):
        resid = np.zeros(len(yde)) + 1000
    else:
        resid = ymp - yde
    return np.sum(resid ** 2)


def test_mp_fit_sigma_equals_sklearn_reference_fit(ref_matrices):
    """End to end against WW's own (slow) formulation on one layer: σ to ~machine precision."""
    neighbors = pytest.importorskip("sklearn.neighbors")
    from scipy import optimize

    evals = ref_matrices["fc2"][1]
    lam = evals * (len(evals) / evals.sum())
    s0 = np.sqrt(np.max(lam) / np.square(1 + 1 / np.sqrt(2.0)))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = optimize.brute(_ww_resid_mp, (slice(0.05 * s0, 2 * s0, 0.01 * s0),),
                             args=(lam, 2.0, 0.1, neighbors), full_output=True)[0][0]
    assert rmt.mp_fit(evals, 2.0, 500)["sigma_mp"] == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("Q,seed", [(2.0, 0), (1.0, 1), (4.0, 2), (1.3, 3)])
def test_vectorised_grid_search_is_bit_identical_to_scipy_brute(Q, seed):
    """The one-pass grid (``_brute_1d``) returns exactly what ``optimize.brute`` returns."""
    from scipy import optimize

    rng = np.random.default_rng(seed)
    M = 200
    W = rng.standard_normal((int(Q * M), M)) * (1 + (rng.random((int(Q * M), M)) < 0.01) * 5)
    lam = np.linalg.svd(W / np.sqrt(W.shape[0]), compute_uv=False) ** 2
    lam = lam * (lam.size / lam.sum())
    to_fit = np.sqrt(lam) if Q == 1 else lam
    objective, on_grid = rmt._make_objective(to_fit, Q)
    s0 = math.sqrt(lam.max() / (1.0 + 1.0 / math.sqrt(Q)) ** 2)
    grid = slice(0.05 * s0, 2.0 * s0, 0.01 * s0)
    values = on_grid(np.mgrid[grid])
    assert values.tolist() == [objective(np.array([g])) for g in np.mgrid[grid]]
    expected = optimize.brute(objective, (grid,), full_output=True, disp=False)[0][0]
    assert rmt._brute_1d(objective, on_grid, grid) == expected


def test_gaussian_matrix_sigma_one_no_spikes():
    W = np.random.default_rng(7).standard_normal((1000, 500)) / np.sqrt(1000)
    fit = rmt.mp_fit(np.linalg.eigvalsh(W.T @ W), Q=2.0, M=500)
    assert fit["sigma_mp"] == pytest.approx(1.0, rel=0.05)
    assert fit["num_spikes"] == 0
    assert fit["W_scale"] == pytest.approx(1.0, rel=0.05)


def test_planted_rank_one_spike_is_detected():
    rng = np.random.default_rng(3)
    N, M = 600, 300
    W = rng.standard_normal((N, M)) / np.sqrt(N)
    u = rng.standard_normal(N)
    v = rng.standard_normal(M)
    theta = 5.0  # far above the BBP threshold Q^(-1/4) ≈ 0.84
    W_spiked = W + theta * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    fit = rmt.mp_fit(np.linalg.eigvalsh(W_spiked.T @ W_spiked), Q=N / M, M=M)
    assert fit["num_spikes"] >= 1
    # ... and the unspiked matrix has none, so it is the plant that is counted.
    assert rmt.mp_fit(np.linalg.eigvalsh(W.T @ W), Q=N / M, M=M)["num_spikes"] == 0


def test_quarter_circle_branch_square_matrix():
    W = np.random.default_rng(5).standard_normal((400, 400)) / np.sqrt(400)
    fit = rmt.mp_fit(np.clip(np.linalg.eigvalsh(W.T @ W), 0, None), Q=1.0, M=400)
    assert all(np.isfinite(fit[k]) for k in rmt.MP_FIT_KEYS)
    # Q = 1: bulk_min is exactly 0 and bulk_max = 4σ² / W_scale².
    assert fit["bulk_min"] == 0.0
    assert fit["bulk_max"] == pytest.approx(4 * fit["sigma_mp"] ** 2 / fit["W_scale"] ** 2)


@pytest.mark.parametrize("bad", [np.array([]), np.zeros(50), np.array([1.0, np.nan, 2.0])])
def test_mp_fit_failure_returns_nan(bad):
    fit = rmt.mp_fit(bad, Q=2.0, M=25)
    assert set(fit) == set(rmt.MP_FIT_KEYS)
    assert all(math.isnan(fit[k]) for k in rmt.MP_FIT_KEYS)


def test_mp_fit_on_n_4096():
    # 4096 eigenvalues pooled from 64 Gaussian 128x64 slices (cheap to build, Q = 2, M = 64).
    # (Its speed is measured by benchmarks/, not asserted here.)
    W = np.random.default_rng(11).standard_normal((64, 128, 64)) / np.sqrt(128)
    evals = np.sort(np.linalg.eigvalsh(np.swapaxes(W, 1, 2) @ W).ravel())
    assert evals.size == 4096
    fit = rmt.mp_fit(evals, 2.0, 64)
    assert fit["num_spikes"] == 0 and fit["sigma_mp"] == pytest.approx(1.0, rel=0.02)


# --------------------------------------------------------------------------------------------
# shuffle_slices
# --------------------------------------------------------------------------------------------


def _batch():
    # Distinct values per slice, so "stays within its slice" is checkable.
    return np.arange(3 * 6 * 4, dtype=np.float64).reshape(3, 6, 4)


def test_shuffle_slices_numpy_permutes_within_slices_only():
    b = _batch()
    s = rmt.shuffle_slices(b, np.random.default_rng(0))
    assert isinstance(s, np.ndarray) and s.shape == b.shape and s.dtype == b.dtype
    for k in range(b.shape[0]):
        np.testing.assert_array_equal(np.sort(s[k].ravel()), np.sort(b[k].ravel()))
        assert not np.array_equal(s[k], b[k])  # actually shuffled
    np.testing.assert_array_equal(b, _batch())  # input untouched


def test_shuffle_slices_numpy_reproducible():
    b = _batch()
    s1 = rmt.shuffle_slices(b, np.random.default_rng(42))
    s2 = rmt.shuffle_slices(b, np.random.default_rng(42))
    s3 = rmt.shuffle_slices(b, np.random.default_rng(43))
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1, s3)


def test_shuffle_slices_torch():
    torch = pytest.importorskip("torch")
    b = torch.from_numpy(_batch()).to(torch.float32)
    s1 = rmt.shuffle_slices(b, np.random.default_rng(1))
    s2 = rmt.shuffle_slices(b, np.random.default_rng(1))
    s3 = rmt.shuffle_slices(b, np.random.default_rng(2))
    assert isinstance(s1, torch.Tensor)
    assert s1.shape == b.shape and s1.dtype == b.dtype and s1.device == b.device
    for k in range(b.shape[0]):
        assert torch.equal(torch.sort(s1[k].flatten()).values, torch.sort(b[k].flatten()).values)
        assert not torch.equal(s1[k], b[k])
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)


def test_shuffle_slices_preserves_frobenius_norm_per_slice(ref_matrices):
    batch = ref_matrices["conv"][0]
    s = rmt.shuffle_slices(batch, np.random.default_rng(9))
    np.testing.assert_allclose(np.linalg.norm(s, axis=(1, 2)), np.linalg.norm(batch, axis=(1, 2)))


# --------------------------------------------------------------------------------------------
# jensen_shannon_distance
# --------------------------------------------------------------------------------------------


def test_jsd_self_is_zero_and_rank_indexed():
    v = np.linspace(0.1, 3.0, 50)
    assert rmt.jensen_shannon_distance(v, v) == 0.0
    assert rmt.jensen_shannon_distance(v, v[::-1]) == 0.0  # rank-indexed: both sorted
    assert rmt.jensen_shannon_distance([1.0, 0.0], [0.0, 1.0]) == 0.0  # sorted -> equal
    # Different shapes of the sorted vectors give a positive distance.
    assert rmt.jensen_shannon_distance([0.0, 0.0, 1.0], [0.0, 1.0, 1.0]) > 0.3


def test_jsd_matches_scipy_entropy_formula():
    from scipy import stats

    rng = np.random.default_rng(0)
    p, q = np.sort(rng.random(100)), np.sort(rng.random(100) ** 3)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    ref = np.sqrt((stats.entropy(p, m) + stats.entropy(q, m)) / 2)
    assert rmt.jensen_shannon_distance(p, q) == pytest.approx(ref, rel=1e-12)
    # Unequal lengths: the k largest values of each are compared.
    assert rmt.jensen_shannon_distance(np.r_[0.0, p], p) == pytest.approx(0.0, abs=1e-15)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, 12, elements=st.floats(0.0, 1e3)),
    arrays(np.float64, 12, elements=st.floats(0.0, 1e3)),
)
def test_jsd_bounded_by_sqrt_ln2(p, q):
    if p.sum() <= 0 or q.sum() <= 0:
        return
    d = rmt.jensen_shannon_distance(p, q)
    assert 0.0 <= d <= math.sqrt(math.log(2)) + 1e-12


# --------------------------------------------------------------------------------------------
# randomization_metrics
# --------------------------------------------------------------------------------------------


def test_num_replicas():
    assert rmt.num_replicas(99) == 5
    assert rmt.num_replicas(100) == 1
    assert rmt.num_replicas(576) == 1


def _gram_evals(batch: np.ndarray) -> np.ndarray:
    """Pooled, sorted eigenvalues via the smaller Gram matrix: ~3x cheaper than the SVD and
    accurate to ~1e-16·λ_max, plenty for the randomised-ESD statistics."""
    G = np.swapaxes(batch, 1, 2) @ batch if batch.shape[1] >= batch.shape[2] else \
        batch @ np.swapaxes(batch, 1, 2)
    return np.sort(np.clip(np.linalg.eigvalsh(G), 0.0, None).ravel())


def _randomized(ref_matrices, name, seed):
    batch, evals, M = ref_matrices[name]
    n_comp = evals.size
    rng = np.random.default_rng(seed)
    reps = [_gram_evals(rmt.shuffle_slices(batch, rng)) for _ in range(rmt.num_replicas(n_comp))]
    return rmt.randomization_metrics(evals, np.concatenate(reps), Q=2.0, M=M,
                                     n_per_replica=n_comp)


@pytest.mark.parametrize("name", ["conv", "fc1", "fc2"])
def test_randomized_reference_matrices(ref_matrices, name):
    r = _randomized(ref_matrices, name, seed=2024)
    assert set(r) == set(rmt.RANDOMIZATION_KEYS)
    # What WeightWatcher 0.7.7 gives over its recorded seeds (the values depend on the shuffle):
    # the trap count lies in its range (0 for the Gaussian conv and fc1, 10-13 for the heavy-tailed
    # fc2 over 8 seeds); a shuffled matrix is close to its own randomisation (rand_distance,
    # ≤ 0.0092 there) and its bulk is that of a unit-variance MP law (rand_sigma_mp 0.965-1.014).
    runs = [by_layer[name] for by_layer in WW077["randomize"]["by_seed"].values()]
    traps = [run["num_traps"] for run in runs]
    assert min(traps) <= r["num_traps"] <= max(traps)
    assert r["rand_distance"] < 0.01
    assert 0.9 < r["rand_sigma_mp"] < 1.1
    evals = ref_matrices[name][1]
    assert r["ww_maxdist"] == pytest.approx(evals.max() - r["ww_softrank"] * evals.max())


def test_randomized_metrics_identical_for_identical_seeds(ref_matrices):
    a = _randomized(ref_matrices, "conv", seed=5)
    b = _randomized(ref_matrices, "conv", seed=5)
    c = _randomized(ref_matrices, "conv", seed=6)
    assert a == b
    assert a["rand_distance"] != c["rand_distance"]


def test_randomization_metrics_uses_first_replica_and_pools_all():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 60, 30)) / np.sqrt(60)  # n_comp 150 -> replicas as given
    evals = _evals(W)
    rep1, rep2 = _evals(rmt.shuffle_slices(W, rng)), _evals(rmt.shuffle_slices(W, rng)) * 3.0
    r = rmt.randomization_metrics(evals, np.concatenate([rep1, rep2]), Q=2.0, M=30,
                                  n_per_replica=rep1.size)
    assert r["max_rand_eval"] == rep2.max()  # pooled
    assert r["rand_distance"] == rmt.jensen_shannon_distance(evals, rep1)  # replica 1 only
    assert r["ww_softrank"] == rep1.max() / evals.max()
    # Same result with a 2-D (replica, values) input.
    r2 = rmt.randomization_metrics(evals, np.stack([rep1, rep2]), Q=2.0, M=30)
    assert r2 == r
