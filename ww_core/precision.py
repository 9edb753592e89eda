"""When a float32 spectrum can stand in for the float64 one.

``precision="auto"`` (the default) solves every layer in float32, which is about twice as fast
as float64 on a CPU and much faster on a GPU, and keeps that result only where float32 provably
cannot change what is reported; other layers are solved again in float64. The checks use the
float32 spectrum alone:

* **Resolution.** A float32 eigenvalue of the Gram matrix is off by at most about
  ``ν = 4·(√M + √N)·eps32·λ_max`` (N ≥ M the matrix sides). Eigenvalues below ``10·ν`` are
  *unresolved*.
* **The fitted tail.** The winning ``xmin`` must be resolved, the winner's alpha must be
  insensitive to the rounding (:data:`ALPHA_SHIFT_BOUND`), and no candidate the KS scan could
  prefer in float64 may give a different alpha: every resolved candidate within
  :data:`KS_SLACK` of the best KS distance must have an alpha within :data:`ALPHA_TOL` of the
  winner's, and every unresolved candidate must lose by at least :data:`UNRESOLVED_KS_MARGIN`.
* **Rank collapse.** The flag is decided exactly: if the share of eigenvalues at or below
  ``max(rank_tol, N·eps32)·λ_max`` exceeds ``rank_collapse_share`` in float32, float64 decides.

In float32, ``matrix_rank`` counts eigenvalues above ``λ_max·N·eps32`` (float64:
``λ_max·N·eps64``), i.e. the rank that the precision used can resolve; it and ``entropy`` (which
uses it) may be lower than WeightWatcher's for nearly square layers, whose smallest eigenvalues
sit below float32's resolution. ``precision="float64"`` reproduces WeightWatcher's values exactly.

The measurements behind the constants (how far below ν the real errors are, how far KS distances
move) are in ``docs/precision.md``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .powerlaw import PowerLawFit

EPS = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}
#: Resolved candidates whose float32 KS distance is within this of the best could win in float64.
KS_SLACK = 2e-4
#: Largest alpha change a float32 result may hide (far below the 0.01 agreement tolerance).
ALPHA_TOL = 1e-3
#: An unresolved candidate (xmin below 10·ν) must lose the KS scan by at least this much.
UNRESOLVED_KS_MARGIN = 0.1
#: Bound on the winner's own alpha shift, ``(α-1)²·ν/xmin`` (relative errors δ of the tail values
#: move ``α - 1 = m / Σ ln(λ/xmin)`` by about ``(α-1)²·δ``); see docs/precision.md.
ALPHA_SHIFT_BOUND = 0.05


def resolution(lambda_max: float, N: int, M: int, precision: str = "float32") -> float:
    """Bound ``ν`` on the absolute error of the eigenvalues of a Gram matrix in ``precision``.

    Example:
        >>> f"{resolution(1.0, 4096, 4096):.1e}"
        '6.1e-05'
    """
    return 4.0 * (math.sqrt(M) + math.sqrt(N)) * EPS[precision] * float(lambda_max)


def rank_threshold(lambda_max: float, N: int, precision: str) -> float:
    """Eigenvalues above this count towards ``matrix_rank`` (``λ_max·N·eps`` of ``precision``)."""
    return float(lambda_max) * max(N, 1) * EPS[precision]


def float32_disagreement(evals: np.ndarray, fit: PowerLawFit, N: int, M: int, *, rank_tol: float,
                         rank_collapse_share: float) -> Optional[str]:
    """Why float32 eigenvalues might not give the float64 result, or ``None`` when they do.

    Args:
        evals: the layer's (scaled) float32-solved eigenvalues, ascending.
        fit: the power-law fit of ``evals``.
        N, M: the larger and smaller side of one matrix.
        rank_tol, rank_collapse_share: the rank-collapse rule (see :func:`ww_core.analyze`).

    Example:
        >>> from ww_core.powerlaw import fit_powerlaw
        >>> ev = np.sort(np.random.default_rng(0).pareto(2.0, 500) + 1.0)   # a noisy tail
        >>> float32_disagreement(ev, fit_powerlaw(ev), 1000, 500, rank_tol=1e-6,
        ...                      rank_collapse_share=0.1)
        'KS near-tie between different alphas'
    """
    if evals.size == 0:
        return "no eigenvalues"
    lmax = float(evals[-1])
    collapsed = np.count_nonzero(evals <= max(rank_tol * lmax, rank_threshold(lmax, N, "float32")))
    if collapsed > rank_collapse_share * evals.size:
        return "rank collapse undecided"
    if not fit.ok or fit.candidate_D is None:
        return "no regular fit"
    resolved_from = 10.0 * resolution(lmax, N, M)
    if fit.xmin < resolved_from:
        return "xmin below float32 resolution"
    if (fit.alpha - 1.0) ** 2 * resolution(lmax, N, M) / fit.xmin > ALPHA_SHIFT_BOUND:
        return "alpha too sensitive to float32 rounding"
    D, alpha, x = fit.candidate_D, fit.candidate_alpha, fit.candidate_x
    best = float(np.min(D))
    resolved = x >= resolved_from
    if np.any(~resolved & (D < best + UNRESOLVED_KS_MARGIN)):
        return "an unresolved xmin nearly wins"
    near = resolved & (D <= best + KS_SLACK)
    if np.any(np.abs(alpha[near] - fit.alpha) > ALPHA_TOL):
        return "KS near-tie between different alphas"
    return None
