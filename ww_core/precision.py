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

**Prediction** (:func:`first_precision`): a layer the check is likely to reject is solved in
float64 directly, so that no layer is solved twice when the prediction is right:

* **The previous analysis of the layer**, when the caller passes it (``analyze(previous=...)``):
  its :attr:`~ww_core.LayerResult.float32_check` (the check's verdict on that spectrum, also
  computed for float64-solved layers) decides.
* **Cheap facts otherwise**, for matrices with at least :data:`MANY_EVALS` eigenvalues (smaller
  ones cost little to re-solve): the stable-rank share ``‖W‖²_F / (λ_max·M)``, estimated with
  :data:`POWER_STEPS` power steps, against a random matrix's (Marchenko–Pastur:
  ``1/(1+√(M/N))²``). Below :data:`HEAVY_TAIL_SHARE` of it the layer is heavy-tailed, and with
  that many KS candidates near-ties between different alphas are likely: float64. A random-like
  bulk gets float64 when the alpha-shift bound of its expected tail fit (alpha about
  ``0.5·√M``) exceeds :data:`ALPHA_SHIFT_BOUND`.

A float32 result is still kept only where the checks above accept it, so the prediction changes
the cost, never the result.

The measurements behind the constants (how far below ν the real errors are, how far KS distances
move, how often each kind of layer is rejected) are in ``docs/precision.md``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np

from .powerlaw import PowerLawFit
from .spectrum import is_torch_tensor

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
#: Matrices with fewer eigenvalues than this are always tried in float32 first.
MANY_EVALS = 1024
#: Heavy-tailed: a stable-rank share below this fraction of a random matrix's.
HEAVY_TAIL_SHARE = 0.6
#: Power-iteration steps of the ``λ_max`` estimate behind the stable-rank share.
POWER_STEPS = 4
#: ``λ_max / xmin`` of a random bulk's tail fit (measured 1.12-1.19).
BULK_XMIN_RATIO = 1.2


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


def mp_stable_rank_share(N: int, M: int) -> float:
    """``‖W‖²_F / (λ_max·M)`` of a large random ``N×M`` matrix (Marchenko–Pastur edge).

    Example:
        >>> mp_stable_rank_share(1000, 1000)
        0.25
    """
    return 1.0 / (1.0 + math.sqrt(M / N)) ** 2


def stable_rank_share(batch: Any, steps: int = POWER_STEPS) -> float:
    """``Σ‖W_i‖²_F / (rf·M·λ_max)`` of a ``(rf, rows, cols)`` stack, ``λ_max`` (the largest over
    the slices) estimated from below by ``steps`` power steps from a fixed start; ``nan`` for
    non-finite weights. It costs about ``2·steps`` products with the weights (no Gram matrix).

    Example:
        >>> round(stable_rank_share(np.diag([4.0, 1.0, 1.0, 1.0])[None]), 4)   # 19 / (4·16)
        0.2969
    """
    if is_torch_tensor(batch):
        import torch

        w = batch.detach()
        w = w if w.dtype in (torch.float32, torch.float64) else w.float()
        w = w if w.shape[-2] >= w.shape[-1] else w.mT
        gen = torch.Generator(device=w.device).manual_seed(0)
        v = torch.randn(w.shape[0], w.shape[-1], 1, generator=gen, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for _ in range(steps):
                v = w.mT @ (w @ v)
                v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
            lmax = float((w @ v).norm(dim=1).max()) ** 2
            fro2 = float(torch.linalg.vector_norm(w)) ** 2
    else:
        w = np.asarray(batch)
        w = w if w.dtype in (np.float32, np.float64) else w.astype(np.float32)
        w = w if w.shape[-2] >= w.shape[-1] else np.swapaxes(w, -1, -2)
        v = np.random.default_rng(0).standard_normal((w.shape[0], w.shape[-1], 1)).astype(w.dtype)
        with np.errstate(all="ignore"):
            for _ in range(steps):
                v = np.swapaxes(w, -1, -2) @ (w @ v)
                v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
            lmax = float(np.linalg.norm(w @ v, axis=1).max()) ** 2
            fro2 = float(np.linalg.norm(w.ravel())) ** 2
    if not (math.isfinite(lmax) and math.isfinite(fro2)) or lmax <= 0.0:
        return math.nan
    return fro2 / (w.shape[0] * w.shape[-1] * lmax)


def predict_float64(N: int, M: int, batch: Any = None, previous: Any = None) -> str:
    """Why the float32 check is likely to reject this layer (solve it in float64 directly), or
    ``""`` (try float32 first). See the module docstring for the rules.

    Args:
        N, M: the larger and smaller side of one matrix.
        batch: the loaded ``(rf, rows, cols)`` weights (only read when ``M >= MANY_EVALS``).
        previous: the layer's :class:`~ww_core.LayerResult` from an earlier analysis, if any.

    Example:
        >>> predict_float64(4096, 4096)          # a random-like bulk of this size
        'random-like bulk: alpha too sensitive to float32 rounding'
        >>> predict_float64(1536, 384)
        ''
    """
    known = getattr(previous, "float32_check", None)
    if known is not None and (previous.N, previous.M) == (N, M):
        return f"the previous analysis' spectrum failed the float32 check ({known})" if known else ""
    if M < MANY_EVALS:
        return ""
    share = stable_rank_share(batch) / mp_stable_rank_share(N, M) if batch is not None else 1.0
    if share < HEAVY_TAIL_SHARE:
        return "heavy-tailed with many eigenvalues: KS near-ties likely"
    if math.isnan(share):
        return ""
    alpha = 0.5 * math.sqrt(M)
    if (alpha - 1.0) ** 2 * resolution(BULK_XMIN_RATIO, N, M) > ALPHA_SHIFT_BOUND:
        return "random-like bulk: alpha too sensitive to float32 rounding"
    return ""


def first_precision(precision: str, fix_fingers: Any, N: int, M: int, batch: Any = None,
                    previous: Any = None) -> Tuple[str, str]:
    """``(precision of the layer's first eigensolve, why float64)`` for ``analyze(precision=...)``.

    ``"auto"`` asks :func:`predict_float64` (``why`` is its reason, ``""`` for float32);
    ``clip_xmax`` refits are not checked, so ``"auto"`` with ``fix_fingers`` is float64.

    Example:
        >>> first_precision("auto", None, 1536, 384)
        ('float32', '')
    """
    if precision == "float32":
        return "float32", ""
    if precision == "float64":
        return "float64", ""
    if fix_fingers:
        return "float64", "fix_fingers refits are not checked"
    why = predict_float64(N, M, batch, previous)
    return ("float64", "predicted: " + why) if why else ("float32", "")
