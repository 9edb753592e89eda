"""Power-law fits of the tail of an eigenvalue spectrum.

:func:`fit_powerlaw` reproduces WeightWatcher 0.7.7's default fitter (``WWFit``) exactly: every
sorted eigenvalue but the last is a candidate ``xmin``; for each, the continuous MLE (Hill) exponent
and the Kolmogorov–Smirnov distance between the fitted and the empirical tail are computed, and the
candidate with the smallest distance wins. Below 20 values WeightWatcher switches to a small-sample
path, reproduced as well. :func:`hill_alpha` is TempBalance's cheap fixed-``xmin`` estimator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

#: Eigenvalues at or below this value are not fitted (WeightWatcher's ``EVALS_THRESH``).
EVALS_THRESH = 1e-5
#: Below this many values the small-sample path is used (WeightWatcher 0.7.7).
SMALL_N = 20
#: The small-sample path needs at least this many values in the tail.
SMALL_N_MIN_TAIL = 8
# (candidate, value) pairs per block of the KS scan: 512 KB temporaries stay in cache.
_BLOCK_ELEMENTS = 1 << 16


@dataclass
class PowerLawFit:
    """The outcome of one fit. ``alpha`` is ``nan`` when ``status == "failed"``."""

    alpha: float = math.nan
    xmin: float = math.nan
    xmax: float = math.nan
    D: float = math.nan
    sigma: float = math.nan
    num_pl_spikes: int = 0
    #: How many values were fitted (after the ``EVALS_THRESH`` filter and any clipping).
    n_fit: int = 0
    small_n: bool = False
    num_fingers: int = 0
    raw_alpha: float = math.nan
    status: str = "failed"
    #: Every candidate's KS distance and exponent (candidate i is the i-th fitted value), kept
    #: to judge how firmly the winner won (see :mod:`ww_core.precision`).
    candidate_D: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    candidate_alpha: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    candidate_x: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "success"


def _ks_distances(logx: np.ndarray, alphas: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """KS distance of each candidate's fitted tail to the empirical tail.

    For candidate i with m = n - i tail values, D_i = max_k |1 - (x_{i+k}/x_i)^(1-a_i) - k/m|
    (the lower step of the empirical CDF at the tail points, as WeightWatcher does). Candidates with
    a_i <= 1 (or non-finite) get D = 1. Computed in small blocks of candidates with in-place
    operations: blocks that fit in cache are ~15x faster than one big matrix.
    """
    n = logx.size
    out = np.ones(candidates.size)
    valid = np.isfinite(alphas) & (alphas > 1.0)
    if not valid.any():
        return out
    idx = candidates[valid]
    a = alphas[valid]
    d = np.empty(idx.size)
    pos = np.arange(n, dtype=np.float64)
    block = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, idx.size, block):
        rows = idx[start:start + block]
        first = int(rows.min())
        e = logx[None, first:] - logx[rows][:, None]
        np.maximum(e, 0.0, out=e)              # left of a tail: masked below; keep exp() finite
        e *= (1.0 - a[start:start + block])[:, None]
        np.exp(e, out=e)                       # (x_j / x_i)^(1 - a_i)
        np.subtract(1.0, e, out=e)
        step = (pos[None, first:] - rows[:, None]) / (n - rows)[:, None].astype(np.float64)
        e -= step                              # k / m
        np.abs(e, out=e)
        e[step < 0] = 0.0                      # outside the tail: |.| >= 0 is neutral
        d[start:start + block] = e.max(axis=1)
    out[valid] = d
    return out


def _fit_sorted(x: np.ndarray) -> PowerLawFit:
    """Fit ascending, positive values ``x`` (no threshold applied here)."""
    n = x.size
    if n < 2:
        return PowerLawFit(n_fit=n)
    logx = np.log(x)
    tail_log_sum = np.cumsum(logx[::-1])[::-1]                 # L_i = sum_{j>=i} ln x_j
    if n < SMALL_N:
        cand = np.arange(n)
        m = (n - cand).astype(float)
        S = tail_log_sum - m * logx                            # sum_{j>=i} ln(x_j / x_i)
        ok = (m >= SMALL_N_MIN_TAIL) & (S > 1e-12)
        alphas = np.full(n, np.nan)
        alphas[ok] = 1.0 + (m[ok] - 1.0) / S[ok]               # bias-corrected MLE
        D = np.ones(n)
        if ok.any():
            D[ok] = _ks_distances(logx, alphas[ok], cand[ok])
        # WeightWatcher's constructor re-selects by argmin D, so that is the effective rule.
        best = int(np.argmin(D))
        small = True
    else:
        cand = np.arange(n - 1)                                # every value except the last
        m = (n - cand).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            alphas = 1.0 + m / (tail_log_sum[:-1] - m * logx[:-1])
        D = _ks_distances(logx, alphas, cand)
        best = int(np.argmin(D))
        small = False
    alpha = float(alphas[best])
    # alpha <= 1 is not a normalisable power law: only reached when every candidate is degenerate
    # (e.g. all values equal, where rounding turns 1 + m/0 into a huge negative number).
    if not math.isfinite(alpha) or alpha <= 1.0:
        return PowerLawFit(n_fit=n, small_n=small)
    xmin = float(x[best])
    m_best = n - best
    return PowerLawFit(
        alpha=alpha, xmin=xmin, xmax=float(x[-1]), D=float(D[best]),
        sigma=(alpha - 1.0) / math.sqrt(m_best), num_pl_spikes=int(np.count_nonzero(x >= xmin)),
        n_fit=n, small_n=small, status="success",
        candidate_D=D, candidate_alpha=alphas, candidate_x=x[:D.size],
    )


def fit_powerlaw(
    evals: np.ndarray,
    *,
    fix_fingers: Optional[str] = None,
    max_fingers: int = 10,
    finger_thresh: float = 1.0,
) -> PowerLawFit:
    """Fit p(λ) ∝ λ^-alpha to the tail of an eigenvalue spectrum, as WeightWatcher 0.7.7 does.

    Args:
        evals: eigenvalues in any order; values <= 1e-5 and non-finite values are ignored.
        fix_fingers: ``None`` or ``"clip_xmax"``: refit after dropping the top 2..max_fingers-1
            eigenvalues and keep the first refit whose alpha is lower by more than
            ``finger_thresh`` (WeightWatcher's loop, including its quirks: ``num_fingers`` is the
            number dropped minus one, and ``max_fingers`` falls back to 10 unless >= n/2).
        max_fingers: see ``fix_fingers``.
        finger_thresh: see ``fix_fingers``.

    Returns:
        A :class:`PowerLawFit`; ``status == "failed"`` (alpha ``nan``) when no fit is possible.

    Example:
        >>> import numpy as np
        >>> x = (np.random.default_rng(0).pareto(2.0, 5000) + 1.0)   # density exponent 3
        >>> round(fit_powerlaw(x).alpha, 1)
        3.0
    """
    if fix_fingers not in (None, False, "clip_xmax"):
        raise ValueError(f"fix_fingers must be None or 'clip_xmax', got {fix_fingers!r}")
    x = np.asarray(evals, dtype=np.float64).ravel()
    x = np.sort(x[np.isfinite(x) & (x > EVALS_THRESH)])
    first = _fit_sorted(x)
    if fix_fingers != "clip_xmax" or not first.ok:
        return first
    n = x.size
    if max_fingers < n / 2:                                    # WeightWatcher resets it (quirk)
        max_fingers = 10
    for idx in range(2, max_fingers):
        if n - idx < 2:
            break
        f = _fit_sorted(x[:-idx])
        if not f.ok:
            break
        if f.alpha + finger_thresh < first.alpha:
            f.num_fingers = idx - 1
            f.raw_alpha = first.alpha
            f.num_pl_spikes = int(np.count_nonzero(x >= f.xmin))  # counts the clipped values too
            return f
        if f.alpha <= 2.0:
            break
    first.raw_alpha = first.alpha
    return first


def hill_alpha(evals: np.ndarray, xmin_pos: float = 2.0) -> float:
    """TempBalance's fixed-xmin Hill estimator (``PL_Alpha_Hill``).

    With the n eigenvalues ascending, i = floor(n / xmin_pos), xmin = λ_i and
    alpha = 1 + (n - i) / Σ_{j>=i} ln(λ_j / λ_i). ``xmin_pos=2`` uses the top half.
    Returns ``nan`` when undefined (fewer than 2 tail values, or a flat tail).

    Example:
        >>> round(hill_alpha([1.0, 2.0, 4.0, 8.0]), 6)     # tail = [4, 8]: 1 + 2 / ln 2
        3.88539
    """
    if xmin_pos <= 1.0:
        raise ValueError(f"xmin_pos must be > 1, got {xmin_pos}")
    x = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    x = x[np.isfinite(x)]
    n = x.size
    i = int(n / xmin_pos)
    if n - i < 2 or x[i] <= 0:
        return math.nan
    S = float(np.sum(np.log(x[i:]) - math.log(x[i])))   # logs first: ratios may overflow
    return 1.0 + (n - i) / S if S > 0 else math.nan


#: ``fit=`` values :func:`ww_core.analyze` accepts (WeightWatcher's names of the power law).
FITS = ("PL", "power_law")
#: WeightWatcher 0.7.7's truncated power laws, which have no reference to agree with.
TRUNCATED_FITS = ("TPL", "E_TPL", "truncated_power_law")


def check_fit(fit: str) -> str:
    """Validate :func:`ww_core.analyze`'s ``fit`` option.

    WeightWatcher 0.7.7 fits its truncated power laws (``"TPL"``, ``"E_TPL"``) only through the
    ``powerlaw`` package, and with the ``powerlaw`` 2.x its pins install, every such fit fails
    (``alpha`` −1 on every layer), so those values have no reference to agree with and are refused.

    Args:
        fit: ``"PL"`` (or ``"power_law"``).

    Returns:
        ``"PL"``.

    Raises:
        ValueError: a truncated power law, or an unknown value.

    Example:
        >>> check_fit("PL")
        'PL'
    """
    if fit in FITS:
        return "PL"
    if fit in TRUNCATED_FITS:
        raise ValueError(f"fit={fit!r} is not supported: WeightWatcher 0.7.7 computes truncated "
                         "power laws only through the powerlaw package, whose 2.x releases fail "
                         "every such fit (alpha -1), so there is nothing to agree with; use fit='PL'")
    raise ValueError(f"fit must be 'PL', got {fit!r}")
