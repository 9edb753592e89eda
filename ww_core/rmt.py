"""Random-matrix-theory diagnostics: WeightWatcher 0.7.7's Marchenko–Pastur (MP) bulk fit,
randomised ESDs, correlation traps and ``rand_distance``.

Everything here works on eigenvalue vectors (σ² of the weight matrices, already carrying any
convolution scale factor), so it is independent of where the weights came from.

Reproduction notes (how WeightWatcher 0.7.7 computes these, and what differs here; the measured
agreement is in ``docs/ww-agreement.md``):

* :func:`mp_fit` reproduces ``WeightWatcher.mp_fit`` / ``RMT_Util.fit_density_with_range`` /
  ``resid_mp`` bit for bit in its logic. The only change is speed: WeightWatcher refits the
  scikit-learn KDE (which does not depend on σ) at every one of the ~250 objective evaluations;
  we evaluate the linear-kernel KDE once, exactly, in ``O(n log n)`` with prefix sums, so
  ``n = 4096`` takes milliseconds instead of ~45 s.
* Failures return NaN where WeightWatcher returns -1.
* WeightWatcher randomises with numpy's global RNG; here every random draw comes from an
  explicit :class:`numpy.random.Generator`, so results are reproducible for a given seed.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import numpy as np
from scipy import optimize
from scipy.spatial.distance import jensenshannon

__all__ = [
    "KDE_BANDWIDTH",
    "KDE_THRESH",
    "MP_FIT_KEYS",
    "RANDOMIZATION_KEYS",
    "linear_kde",
    "mp_fit",
    "shuffle_slices",
    "jensen_shannon_distance",
    "num_replicas",
    "randomization_metrics",
]

#: Bandwidth of WeightWatcher's ``KernelDensity(kernel='linear')``.
KDE_BANDWIDTH = 0.1
#: KDE grid points whose density is not above this are ignored by the fit (WW's ``THRESH``).
KDE_THRESH = 0.01
#: Number of KDE evaluation points, ``linspace(0, max + 0.5, 1000)``.
KDE_POINTS = 1000
#: Residual WeightWatcher assigns to every kept point when σ is rejected.
PENALTY = 1000.0

#: Keys returned by :func:`mp_fit`.
MP_FIT_KEYS = ("num_spikes", "sigma_mp", "mp_softrank", "W_scale", "bulk_max", "bulk_min")
#: Keys returned by :func:`randomization_metrics`.
RANDOMIZATION_KEYS = (
    "max_rand_eval", "rand_distance", "ww_softrank", "ww_maxdist", "num_traps",
    "rand_sigma_mp", "rand_mp_softrank", "rand_W_scale", "rand_bulk_max", "rand_bulk_min",
)


# --------------------------------------------------------------------------------------------
# Marchenko–Pastur fit
# --------------------------------------------------------------------------------------------

def linear_kde(data: np.ndarray, x: np.ndarray, bandwidth: float = KDE_BANDWIDTH) -> np.ndarray:
    """1-D linear-kernel (triangular) kernel density estimate of ``data`` evaluated at ``x``.

    Identical to ``sklearn.neighbors.KernelDensity(kernel='linear', bandwidth=h)`` followed by
    ``exp(score_samples(x))``: ``K(u) = max(0, 1 - |u|/h) / h`` (integrates to 1 in 1-D) and the
    density is the mean of the kernels over the data points.

    The sum over points within ``h`` of ``1 - |x - d|/h`` splits into a left part
    (``d <= x``) and a right part (``d > x``), each an affine function of the count and the sum
    of the points in the window, so prefix sums over the sorted data give it in
    ``O((n + len(x)) log n)`` without a ``len(x) × n`` matrix.

    Example:
        >>> import numpy as np
        >>> float(linear_kde(np.array([0.0]), np.array([0.0, 0.05, 0.1, 0.2]))[1])
        5.0
    """
    d = np.sort(np.asarray(data, dtype=np.float64).ravel())
    x = np.asarray(x, dtype=np.float64)
    h = float(bandwidth)
    n = d.size
    csum = np.concatenate(([0.0], np.cumsum(d)))
    # Window [x - h, x] (left, d <= x) and (x, x + h] (right). Points exactly at distance h
    # contribute 0 either way, so the side of the boundary they fall on does not matter.
    lo = np.searchsorted(d, x - h, side="left")
    mid = np.searchsorted(d, x, side="right")
    hi = np.searchsorted(d, x + h, side="right")
    n_left, s_left = mid - lo, csum[mid] - csum[lo]
    n_right, s_right = hi - mid, csum[hi] - csum[mid]
    # Σ_left (1 - (x - d)/h) + Σ_right (1 - (d - x)/h)
    total = (n_left + n_right) + (s_left - n_left * x) / h + (n_right * x - s_right) / h
    # Round-off in the prefix sums can leave a tiny negative value where the window is empty.
    return np.maximum(total, 0.0) / (n * h)


def _nan_mp_fit() -> Dict[str, Any]:
    return {k: math.nan for k in MP_FIT_KEYS}


def _make_objective(to_fit: np.ndarray, Q: float):
    """Return WeightWatcher's ``resid_mp(σ, …, allresid=False)`` with the KDE precomputed."""
    xde = np.linspace(0.0, np.max(to_fit) + 0.5, KDE_POINTS)
    yde = linear_kde(to_fit, xde, KDE_BANDWIDTH)
    # WW keeps points with density strictly above THRESH; dropped points add a residual of 0.
    keep = yde > KDE_THRESH
    xde, yde = xde[keep], yde[keep]
    if xde.size == 0:
        raise ValueError("KDE is below the threshold everywhere")
    x_peak = xde[np.argmax(yde)]  # first maximum, like xde[np.where(yde == max(yde))][0]
    x_last = xde[-1]
    quarter_circle = Q == 1
    # Same floating-point expressions as WW's marchenko_pastur_fun: y = 1/Q, edges via sqrt(1/Q).
    y = 1.0 / Q
    sqrt_y = math.sqrt(1.0 / Q)
    penalised = float(xde.size) * PENALTY ** 2

    def objective(p) -> float:
        sigma = float(np.asarray(p, dtype=np.float64).ravel()[0])  # brute/fmin pass arrays
        with np.errstate(all="ignore"):
            if quarter_circle:
                # WW's quarter circle on singular values: σ sits outside the root and there is
                # no penalty rule on this branch.
                ymp = np.nan_to_num((1.0 / (np.pi * sigma * sigma)) * np.sqrt(4.0 - xde ** 2))
            else:
                b = (sigma * (1.0 + sqrt_y)) ** 2
                a = (sigma * (1.0 - sqrt_y)) ** 2
                if b < x_peak or b > x_last or a > x_peak:
                    return penalised
                # Outside [a, b] the root is NaN, which nan_to_num turns into 0 (as in WW).
                ymp = np.nan_to_num(
                    (1.0 / (2.0 * np.pi * sigma * sigma * xde * y))
                    * np.sqrt((b - xde) * (xde - a))
                )
            resid = ymp - yde
            return float(np.sum(resid ** 2))

    def on_grid(sigmas: np.ndarray) -> np.ndarray:
        # ``objective`` at every grid point in one pass: the same expressions element by element,
        # then one 1-D sum per row (a 2-D reduction may add in another order: 1 ulp apart).
        sigma = np.asarray(sigmas, dtype=np.float64).reshape(-1, 1)
        with np.errstate(all="ignore"):
            if quarter_circle:
                ymp = np.nan_to_num((1.0 / (np.pi * sigma * sigma)) * np.sqrt(4.0 - xde ** 2))
                return np.array([np.sum(row) for row in (ymp - yde) ** 2])
            # the edges as Python floats, like ``objective`` (float ** 2 is libm's pow, which can
            # differ from numpy's x*x in the last bit)
            b = np.array([[(float(s) * (1.0 + sqrt_y)) ** 2] for s in sigma.ravel()])
            a = np.array([[(float(s) * (1.0 - sqrt_y)) ** 2] for s in sigma.ravel()])
            ymp = np.nan_to_num(
                (1.0 / (2.0 * np.pi * sigma * sigma * xde * y)) * np.sqrt((b - xde) * (xde - a)))
            out = np.array([np.sum(row) for row in (ymp - yde) ** 2])
        bad = ((b < x_peak) | (b > x_last) | (a > x_peak)).ravel()
        out[bad] = penalised
        return out

    return objective, on_grid


def _brute_1d(objective, on_grid, grid_slice: slice) -> float:
    """``scipy.optimize.brute(objective, (grid_slice,), finish=fmin)`` with the grid evaluated in
    one vectorised pass: the same grid, the same first minimum, the same Nelder–Mead polish."""
    grid = np.mgrid[grid_slice]
    values = on_grid(grid)
    start = grid[int(np.argmin(values))]
    return float(optimize.fmin(objective, start, full_output=1, disp=False)[0][0])


def mp_fit(evals: np.ndarray, Q: float, M: int) -> Dict[str, Any]:
    """Fit the Marchenko–Pastur bulk to an ESD exactly as WeightWatcher 0.7.7's ``mp_fit`` does.

    Steps: rescale the eigenvalues to mean 1 (``W_scale = sqrt(n / Σλ)``, ``λ' = W_scale² λ``);
    grid-search σ over ``slice(0.05 s0, 2 s0, 0.01 s0)`` with ``s0 = sqrt(max λ') / (1 + 1/√Q)``
    using :func:`scipy.optimize.brute` and its default Nelder–Mead (``fmin``) polish; the
    objective is the squared difference between the MP density and a linear-kernel KDE
    (bandwidth 0.1, 1000 points on ``[0, max + 0.5]``, points with density <= 0.01 ignored),
    with a flat penalty when the MP edges are inconsistent with the KDE. When ``Q == 1`` the fit
    is WeightWatcher's quarter-circle law on ``sqrt(λ')``.

    Args:
        evals: eigenvalues (any order; pooled over the slices of a conv layer).
        Q: aspect ratio ``N / M``.
        M: smaller dimension of one matrix (per-slice M for convolutions); only used in the
            Tracy–Widom margin ``TW = Q^-1/2 · bulk_max^(2/3) · M^(-2/3)``.

    Returns:
        A dict with ``num_spikes`` (#``λ' > bulk_max + sqrt(TW)``), ``sigma_mp``, ``mp_softrank``
        (``bulk_max / max λ'``), ``W_scale``, and ``bulk_max`` / ``bulk_min`` on the original
        scale (divided by ``W_scale²``). On any failure every value is NaN (WeightWatcher
        reports -1); nothing is raised.

    Example:
        >>> import numpy as np
        >>> W = np.random.default_rng(0).standard_normal((1000, 500)) / np.sqrt(1000)
        >>> fit = mp_fit(np.linalg.svd(W, compute_uv=False) ** 2, Q=2.0, M=500)
        >>> fit["num_spikes"], round(fit["sigma_mp"], 1)
        (0, 1.0)
    """
    try:
        lam = np.asarray(evals, dtype=np.float64).ravel()
        n = lam.size
        total = float(np.sum(lam))
        if n == 0 or not np.all(np.isfinite(lam)) or not total > 0 or not Q > 0 or not M > 0:
            return _nan_mp_fit()
        W_scale = math.sqrt(n / total)
        lam = (W_scale * W_scale) * lam
        lambda_max = float(np.max(lam))
        inv_sqrt_q = 1.0 / math.sqrt(Q)
        # s0 comes from λ' even on the quarter-circle branch (WW's calc_sigma).
        s0 = math.sqrt(lambda_max / (1.0 + inv_sqrt_q) ** 2)
        to_fit = np.sqrt(lam) if Q == 1 else lam
        objective, on_grid = _make_objective(to_fit, Q)
        # (no warnings.catch_warnings(): it swaps process-global state, unsafe when the analysis
        # runs in a background thread; fmin does not warn with disp=False)
        sigma = _brute_1d(objective, on_grid, slice(0.05 * s0, 2.0 * s0, 0.01 * s0))
        if not math.isfinite(sigma):
            return _nan_mp_fit()
        bulk_max = (sigma * (1.0 + inv_sqrt_q)) ** 2
        bulk_min = (sigma * (1.0 - inv_sqrt_q)) ** 2
        tw = inv_sqrt_q * bulk_max ** (2.0 / 3.0) * float(M) ** (-2.0 / 3.0)
        num_spikes = int(np.count_nonzero(lam > bulk_max + math.sqrt(tw)))
        return {
            "num_spikes": num_spikes,
            "sigma_mp": sigma,
            "mp_softrank": bulk_max / lambda_max,
            "W_scale": W_scale,
            "bulk_max": bulk_max / (W_scale * W_scale),
            "bulk_min": bulk_min / (W_scale * W_scale),
        }
    except Exception:  # WW: any exception -> all six set to -1; we use NaN
        return _nan_mp_fit()


# --------------------------------------------------------------------------------------------
# Randomisation
# --------------------------------------------------------------------------------------------

def shuffle_slices(batch, rng: np.random.Generator):
    """Randomly permute the entries of each slice of ``batch`` *within* that slice.

    WeightWatcher flattens and ``np.random.shuffle``s each matrix (each conv slice) separately,
    so entries never move between slices. ``batch`` has shape ``(rf, rows, cols)`` (a 2-D array
    is treated as one slice). A numpy array is permuted with ``rng``; a torch tensor is permuted
    with ``torch.randperm`` seeded from ``rng`` on the tensor's own device (so no host copy),
    which is reproducible for a given ``rng`` state on a given device type, but CPU and CUDA
    streams differ. The input is not modified; the result has the input's type, dtype and
    device.

    Args:
        batch: a numpy array or a torch tensor, ``(rf, rows, cols)`` or one 2-D matrix.
        rng: the source of randomness.

    Returns:
        The shuffled copy.

    Raises:
        TypeError: ``batch`` is neither a numpy array nor a torch tensor.

    Example:
        >>> import numpy as np
        >>> b = np.arange(8.0).reshape(2, 2, 2)
        >>> s = shuffle_slices(b, np.random.default_rng(0))
        >>> sorted(s[0].ravel().tolist()), sorted(s[1].ravel().tolist())
        ([0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0])
    """
    if isinstance(batch, np.ndarray):
        # (rf, rows, cols) -> one row per slice; a 2-D matrix is a single slice.
        flat = batch.reshape(1, -1) if batch.ndim <= 2 else batch.reshape(batch.shape[0], -1)
        # Generator.permuted shuffles each row independently and returns a copy.
        return rng.permuted(flat, axis=1).reshape(batch.shape)

    import torch  # only when a tensor is passed

    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batch must be a numpy array or a torch tensor, got {type(batch)!r}")
    squeeze = batch.dim() == 2
    t = batch.unsqueeze(0) if squeeze else batch
    flat = t.reshape(t.shape[0], -1)
    gen = torch.Generator(device=t.device)
    gen.manual_seed(int(rng.integers(0, 2 ** 63 - 1)))
    out = torch.empty_like(flat)
    # int32 indices where they fit: randperm and the gather are ~1.4x faster than with int64
    index_dtype = torch.int32 if flat.shape[1] < 2 ** 31 else torch.int64
    for k in range(flat.shape[0]):  # one permutation per slice: O(size of one slice) memory
        perm = torch.randperm(flat.shape[1], generator=gen, device=t.device, dtype=index_dtype)
        torch.index_select(flat[k], 0, perm, out=out[k])
    out = out.reshape(t.shape)
    return out[0] if squeeze else out


def jensen_shannon_distance(p, q) -> float:
    """WeightWatcher's ``rand_distance`` metric: a rank-indexed Jensen–Shannon distance.

    Both eigenvalue vectors are sorted ascending and treated as probability vectors *indexed by
    rank* (not as densities): each is normalised to sum 1, ``m = (p + q) / 2`` and the result is
    ``sqrt((KL(p‖m) + KL(q‖m)) / 2)`` with natural logs (``0·log 0 = 0``), so it lies in
    ``[0, sqrt(ln 2)]``. That is :func:`scipy.spatial.distance.jensenshannon` of the two sorted
    vectors, which computes it; the one difference handled here is that scipy returns NaN when
    rounding leaves the divergence of two (nearly) equal vectors a hair below 0, where this
    returns 0.

    WeightWatcher forms ``m`` from the raw vectors before ``entropy`` normalises; that is the
    same thing whenever both vectors have the same sum, which holds for a matrix and its
    permutation (same Frobenius norm). If the lengths differ (WW would raise), only the ``k``
    largest values of each are compared, ``k`` being the shorter length, since those carry the
    spectrum's structure and WW itself keeps the top ``n_comp`` eigenvalues.

    Args:
        p, q: eigenvalue vectors (any order, any shape; flattened).

    Returns:
        The distance; NaN when either vector is empty, sums to 0 or holds a NaN or infinity.

    Example:
        >>> jensen_shannon_distance([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
        0.0
        >>> round(jensen_shannon_distance([0.0, 0.0, 1.0], [0.0, 1.0, 1.0]), 4)
        0.4645
    """
    p = np.sort(np.asarray(p, dtype=np.float64).ravel())
    q = np.sort(np.asarray(q, dtype=np.float64).ravel())
    k = min(p.size, q.size)
    if k == 0:
        return math.nan
    p, q = p[p.size - k:], q[q.size - k:]
    with np.errstate(invalid="ignore"):
        distance = float(jensenshannon(p, q))
    if math.isnan(distance) and np.all(np.isfinite(p)) and np.all(np.isfinite(q)) \
            and np.sum(p) != 0 and np.sum(q) != 0:
        return 0.0      # sqrt of a divergence rounded to just below 0: the vectors are equal
    return distance


def num_replicas(n_comp: int) -> int:
    """Number of randomised replicas WeightWatcher pools: 5 when ``n_comp < 100``, else 1.

    Example:
        >>> num_replicas(64), num_replicas(500)
        (5, 1)
    """
    return 5 if n_comp < 100 else 1


def randomization_metrics(
    evals: np.ndarray,
    rand_evals: np.ndarray,
    Q: float,
    M: int,
    n_per_replica: Optional[int] = None,
) -> Dict[str, Any]:
    """Metrics of the randomised ESD: ``rand_distance``, correlation traps and the random MP fit.

    WeightWatcher draws one *extra* replica for ``rand_distance``/``ww_softrank``/``ww_maxdist``
    (in its code that replica's maximum, not the pooled maximum, feeds ``ww_softrank``); we use
    replica 1 instead, which has the same distribution and saves an SVD.

    Args:
        evals: the layer's real eigenvalues.
        rand_evals: eigenvalues of the randomised (slice-shuffled) matrices, the replicas
            **concatenated in replica order** (each replica's values may be in any order), or a
            2-D array with one replica per row. All of them are pooled for ``max_rand_eval`` and
            the MP fit.
        Q, M: as for :func:`mp_fit` (per-slice M for convolutions).
        n_per_replica: length of one replica; the first ``n_per_replica`` values are replica 1.
            Defaults to the row length of a 2-D ``rand_evals``, else ``len(evals)`` (one replica
            has as many eigenvalues as the real ESD).

    Returns:
        A dict with ``max_rand_eval`` (pooled max), ``rand_distance`` (JSD between the sorted
        ``evals`` and the sorted first replica), ``ww_softrank`` = max(replica 1)/max(evals),
        ``ww_maxdist`` = max(evals) - max(replica 1), and the MP fit of the pooled values:
        ``num_traps`` (WW's ``rand_num_spikes``), ``rand_sigma_mp``, ``rand_mp_softrank``,
        ``rand_W_scale``, ``rand_bulk_max``, ``rand_bulk_min``.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> W = rng.standard_normal((1, 1000, 500)) / np.sqrt(1000)
        >>> ev = np.linalg.svd(W[0], compute_uv=False) ** 2
        >>> rv = np.linalg.svd(shuffle_slices(W, rng)[0], compute_uv=False) ** 2
        >>> r = randomization_metrics(ev, rv, Q=2.0, M=500)
        >>> r["num_traps"], r["rand_distance"] < 0.01
        (0, True)
    """
    evals = np.asarray(evals, dtype=np.float64).ravel()
    rand = np.asarray(rand_evals, dtype=np.float64)
    if rand.ndim == 2 and n_per_replica is None:
        n_per_replica = rand.shape[1]
    rand = rand.ravel()
    if n_per_replica is None:
        n_per_replica = evals.size
    first = rand[: int(n_per_replica)]

    out: Dict[str, Any] = {k: math.nan for k in RANDOMIZATION_KEYS}
    if rand.size:
        out["max_rand_eval"] = float(np.max(rand))
    if evals.size and first.size:
        lam_max = float(np.max(evals))
        first_max = float(np.max(first))
        out["rand_distance"] = jensen_shannon_distance(evals, first)
        out["ww_softrank"] = first_max / lam_max if lam_max != 0 else math.nan
        out["ww_maxdist"] = lam_max - first_max
    fit = mp_fit(np.sort(rand), Q, M)
    out["num_traps"] = fit["num_spikes"]
    out["rand_sigma_mp"] = fit["sigma_mp"]
    out["rand_mp_softrank"] = fit["mp_softrank"]
    out["rand_W_scale"] = fit["W_scale"]
    out["rand_bulk_max"] = fit["bulk_max"]
    out["rand_bulk_min"] = fit["bulk_min"]
    return out
