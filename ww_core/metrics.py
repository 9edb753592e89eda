"""Norm metrics of a spectrum and the per-layer flags."""

from __future__ import annotations

import math
from typing import Dict, List

import numpy as np

#: WeightWatcher's thresholds for its ``warning`` column.
OVER_TRAINED_THRESH = 2.0
UNDER_TRAINED_THRESH = 6.0
#: float64 machine epsilon as WeightWatcher hard-codes it in ``matrix_rank``.
_EPS64 = 2.220446049250313e-16
# Added to each probability in the entropy (WeightWatcher's EPSILON on CPU hosts).
_ENTROPY_EPS = 1e-10

FLAGS = ("under-trained", "over-trained", "rank-collapse", "non-finite", "too-few-evals",
         "fit-failed", "correlation-trap")


def matrix_rank(evals: np.ndarray, N: int, eps: float = _EPS64) -> int:
    """Numerical rank: #{λ_i > λ_max · N · eps}, WeightWatcher's count recast for a Gram matrix.

    WeightWatcher counts σ_i > σ_max · N · eps64 on singular values. Eigenvalues of a Gram matrix
    have a rounding floor (~eps·λ_max) far above that threshold, so zero directions are recognised
    relative to the floor of the precision used (``eps``; see docs: differences from
    WeightWatcher).
    """
    if evals.size == 0:
        return 0
    lmax = float(evals.max())
    return int(np.count_nonzero(evals > lmax * max(N, 1) * eps))


def norm_metrics(evals: np.ndarray, alpha: float, N: int, eps: float = _EPS64) -> Dict[str, float]:
    """WeightWatcher's norm columns of one (scaled) spectrum; ``alpha`` may be ``nan``.

    ``eps`` is the machine epsilon of the precision the spectrum was solved in (for the rank).
    """
    total = float(evals.sum())
    lmax = float(evals.max()) if evals.size else math.nan
    rank = matrix_rank(evals, N, eps)
    out: Dict[str, float] = {
        "norm": total,
        "log_norm": math.log10(total) if total > 0 else math.nan,
        "spectral_norm": lmax,
        "log_spectral_norm": math.log10(lmax) if lmax > 0 else math.nan,
        "stable_rank": total / lmax if lmax > 0 else math.nan,
        "matrix_rank": rank,
        "alpha_weighted": alpha * math.log10(lmax) if lmax > 0 else math.nan,
    }
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        s = float(np.sum(evals ** alpha)) if math.isfinite(alpha) else math.nan
    out["log_alpha_norm"] = math.log10(s) if s > 0 and math.isfinite(s) else math.nan
    if total > 0 and rank > 1:
        p = evals / total + _ENTROPY_EPS
        out["entropy"] = float(-np.sum(p * np.log(p)) / math.log(rank + _ENTROPY_EPS))
    else:
        out["entropy"] = math.nan
    return out


def rank_collapse_share(evals: np.ndarray, rel_tol: float) -> float:
    """Share of eigenvalues at or below ``rel_tol · λ_max`` (near-zero directions)."""
    if evals.size == 0:
        return math.nan
    lmax = float(evals.max())
    if lmax <= 0:
        return 1.0
    return float(np.count_nonzero(evals <= rel_tol * lmax)) / evals.size


def ww_warning(alpha: float) -> str:
    """WeightWatcher's ``warning`` column for a successful fit ('' for a failed one)."""
    if not math.isfinite(alpha):
        return ""
    if alpha < OVER_TRAINED_THRESH:
        return "over-trained"
    if alpha > UNDER_TRAINED_THRESH:
        return "under-trained"
    return ""


def layer_flags(*, alpha: float, fit_ok: bool, small_n: bool, collapse: float,
                collapse_share: float, num_traps: float) -> List[str]:
    """The named flags of one analysed layer (see :data:`FLAGS`).

    A fit on too few eigenvalues (``small_n``, e.g. a rank-8 LoRA update) says ``too-few-evals``
    only: its alpha is too uncertain to call the layer over- or under-trained, whatever
    WeightWatcher's ``warning`` column (:func:`ww_warning`, kept as is) says.
    """
    flags: List[str] = []
    warning = ww_warning(alpha) if fit_ok and not small_n else ""
    if warning:
        flags.append(warning)
    if math.isfinite(collapse) and collapse > collapse_share:
        flags.append("rank-collapse")
    if small_n:
        flags.append("too-few-evals")
    if not fit_ok:
        flags.append("fit-failed")
    if math.isfinite(num_traps) and num_traps > 0:
        flags.append("correlation-trap")
    return flags
