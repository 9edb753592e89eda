"""One layer's analysis: eigensolve, precision check, power-law fit and metrics.

:func:`analyze_layer` is the whole of it. :func:`ww_core.analyze` runs it in two steps,
:func:`solve_layer` and :func:`finish_layer`, so that a layer whose float32 spectrum the check
rejects has its float64 eigensolve queued on the solver pool (:func:`~ww_core.spectrum.eigenvalues_later`)
while the next layers are analysed, instead of waiting for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import detx as _detx
from . import metrics as _metrics
from . import precision as _precision
from .batching import shuffled_replicas
from .layer_matrices import LayerMatrices
from .powerlaw import PowerLawFit, fit_powerlaw, hill_alpha
from .result import LayerResult
from .spectrum import (
    PRECISIONS,
    SOLVE_ERRORS,
    SOLVERS,
    Later,
    eigenvalues,
    eigenvalues_later,
    is_torch_tensor,
)

__all__ = ["analyze_layer", "solve_layer", "finish_layer", "solve_precision", "layer_spectrum"]


def solve_precision(precision: str, fix_fingers: Optional[str] = None) -> str:
    """The precision of the first eigensolve: ``"auto"`` starts in float32 (see
    :mod:`ww_core.precision`), except with ``clip_xmax``, whose refits are not checked."""
    if precision == "float64" or (precision == "auto" and fix_fingers):
        return "float64"
    return "float32"


@dataclass
class SolvedLayer:
    """A layer between :func:`solve_layer` and :func:`finish_layer`."""

    lm: LayerMatrices
    res: LayerResult
    batch: Any
    used: str = "float32"
    why64: str = ""
    evals: Optional[np.ndarray] = None
    fit: Optional[PowerLawFit] = None
    #: The float64 re-solve in flight (:func:`~ww_core.spectrum.eigenvalues_later`), or ``None``.
    redo: Optional[Later] = None
    failed: bool = False

    @property
    def pending(self) -> bool:
        """A float64 re-solve is still running."""
        return self.redo is not None

    def fit_spectrum(self, raw_evals: np.ndarray, fix_fingers: Optional[str], max_fingers: int,
                     finger_thresh: float) -> None:
        """Set :attr:`evals` (scaled, ascending, the top components of a LoRA product) from the
        raw eigenvalues and :attr:`fit` to their power-law fit."""
        self.evals = layer_spectrum(raw_evals, self.lm)
        self.fit = fit_powerlaw(self.evals, fix_fingers=fix_fingers, max_fingers=max_fingers,
                                finger_thresh=finger_thresh)

    def cancel(self) -> None:
        """Drop the float64 re-solve if it has not started (its result is not wanted)."""
        if self.redo is not None:
            self.redo.cancel()


def solve_layer(lm: LayerMatrices, *, batch: Any = None, raw_evals: Optional[np.ndarray] = None,
                plan: Optional[Tuple[str, str]] = None, previous: Optional[LayerResult] = None,
                precision: str = "auto", solver: str = "gram", fix_fingers: Optional[str] = None,
                max_fingers: int = 10, finger_thresh: float = 1.0, rank_tol: float = 1e-6,
                rank_collapse_share: float = 0.1, later: bool = False) -> SolvedLayer:
    """The first eigensolve, its fit and (``precision="auto"``) the float32 check.

    When the check rejects the float32 spectrum, the float64 re-solve is started; with
    ``later`` it may still be running on return (:attr:`SolvedLayer.pending`), else it is done.

    Args:
        lm, batch, raw_evals, plan, previous: as :func:`analyze_layer`.
        precision, solver, fix_fingers, max_fingers, finger_thresh, rank_tol,
        rank_collapse_share: as :func:`ww_core.analyze`.
        later: let the float64 re-solve run on the solver pool while the caller goes on.

    Returns:
        A :class:`SolvedLayer`, for :func:`finish_layer`. A failed solve is not raised: the
        layer is flagged there.

    Raises:
        ValueError: an invalid ``precision`` or ``solver``.

    Example:
        >>> import numpy as np, ww_core
        >>> lm = ww_core.find_layers({"fc.weight": np.random.default_rng(0).standard_normal((300, 100))})[0]
        >>> solved = solve_layer(lm, later=True)
        >>> finish_layer(solved).status
        'success'
    """
    if precision not in PRECISIONS or solver not in SOLVERS:
        raise ValueError(f"precision must be one of {PRECISIONS} and solver one of {SOLVERS}, "
                         f"got {precision!r}, {solver!r}")
    res = LayerResult(name=lm.name, type=lm.type, N=lm.N, M=lm.M, rf=lm.rf,
                      num_evals=lm.num_evals, scale=lm.scale)
    if batch is None:
        batch = lm.load()
    used, why64 = plan if plan is not None else _precision.first_precision(
        precision, fix_fingers, lm.N, lm.M, batch, previous)
    out = SolvedLayer(lm, res, batch, used, why64)
    res.solves = 1
    checked = precision == "auto" and used == "float32"
    try:
        if raw_evals is None:
            raw_evals = eigenvalues(batch, used, solver)
        out.fit_spectrum(raw_evals, fix_fingers, max_fingers, finger_thresh)
        if precision == "auto" and not fix_fingers:    # (on a float64 spectrum: for the next time)
            res.float32_check = _precision.float32_disagreement(
                out.evals, out.fit, lm.N, lm.M, rank_tol=rank_tol,
                rank_collapse_share=rank_collapse_share) or ""
        failed, redo = False, checked and bool(res.float32_check)
    except SOLVE_ERRORS:
        # e.g. squares beyond float32's range: float64 may still hold them
        failed, redo = True, checked
        res.float32_check = "the float32 solve failed" if checked else None
    if redo:
        out.used, res.solves = "float64", 2
        out.why64 = "float32 rejected: " + str(res.float32_check)
        try:
            out.redo = eigenvalues_later(batch, "float64", solver)
        except SOLVE_ERRORS:
            out.failed = True
            return out
        if not later or out.redo.ready:       # (nothing in the background: fit it now)
            _collect(out, fix_fingers, max_fingers, finger_thresh)
    elif failed:
        out.failed = True
    return out


def _collect(s: SolvedLayer, fix_fingers: Optional[str], max_fingers: int,
             finger_thresh: float) -> None:
    """Wait for the float64 re-solve and fit it."""
    wait, s.redo = s.redo, None
    try:
        s.fit_spectrum(wait(), fix_fingers, max_fingers, finger_thresh)
    except SOLVE_ERRORS:
        s.failed = True


def finish_layer(s: SolvedLayer, *, rand_raw: Optional[np.ndarray] = None,
                 fix_fingers: Optional[str] = None, max_fingers: int = 10,
                 finger_thresh: float = 1.0, mp_fit: bool = False, randomize: bool = False,
                 rng: Optional[np.random.Generator] = None, precision: str = "auto",
                 solver: str = "gram", keep_evals: bool = False, rank_tol: float = 1e-6,
                 rank_collapse_share: float = 0.1, hill_xmin_pos: float = 2.0,
                 detX: bool = False) -> LayerResult:
    """Metrics, flags and (``randomize``) the shuffled comparison of a solved layer; waits for
    its float64 re-solve first when that is still running.

    Args:
        s: what :func:`solve_layer` returned.
        rand_raw, rng: as :func:`analyze_layer`.
        fix_fingers, max_fingers, finger_thresh, mp_fit, randomize, precision, solver,
        keep_evals, rank_tol, rank_collapse_share, hill_xmin_pos, detX: as
        :func:`ww_core.analyze` (the same values :func:`solve_layer` was given).

    Returns:
        The layer's :class:`~ww_core.LayerResult` (``status="failed"`` and a flag when the
        eigensolve failed).

    Example: see :func:`solve_layer`.
    """
    if s.pending:
        _collect(s, fix_fingers, max_fingers, finger_thresh)
    lm, res, batch, evals, fit = s.lm, s.res, s.batch, s.evals, s.fit
    if s.failed:
        # NaN/inf weights, or entries so large their squares overflow: flag, never raise.
        # (The full finiteness pass runs only here, on failure.)
        res.status = "failed"
        res.flags = ("non-finite",) if not _all_finite(batch) else ("fit-failed",)
        return res
    res.precision, res.precision_reason = s.used, s.why64
    res.alpha, res.xmin, res.xmax, res.D, res.sigma = fit.alpha, fit.xmin, fit.xmax, fit.D, fit.sigma
    res.num_pl_spikes, res.num_fingers, res.raw_alpha = fit.num_pl_spikes, fit.num_fingers, fit.raw_alpha
    res.status = fit.status
    res.warning = _metrics.ww_warning(fit.alpha) if fit.ok else ""
    eps = _precision.EPS[s.used]
    nm = _metrics.norm_metrics(evals, fit.alpha, lm.N, eps=eps)
    for key in ("alpha_weighted", "log_alpha_norm", "log_norm", "log_spectral_norm",
                "spectral_norm", "stable_rank", "entropy", "matrix_rank"):
        setattr(res, key, nm[key])
    res.alpha_hill = hill_alpha(evals, hill_xmin_pos)
    res.rank_collapse = _metrics.rank_collapse_share(evals, max(rank_tol, lm.N * eps))
    Q = lm.N / lm.M
    if mp_fit:
        from .rmt import mp_fit as _mp_fit

        mp = _mp_fit(evals, Q, lm.M)
        res.num_spikes, res.sigma_mp = mp["num_spikes"], mp["sigma_mp"]
        res.mp_softrank, res.bulk_max = mp["mp_softrank"], mp["bulk_max"]
    if randomize and lm.num_components is None:      # (no shuffle of a LoRA product's factors)
        _randomized(res, lm, batch, evals, rand_raw, rng, solve_precision(precision, fix_fingers),
                    solver, keep_evals)
    res.flags = tuple(_metrics.layer_flags(
        alpha=fit.alpha, fit_ok=fit.ok, small_n=fit.small_n or not fit.ok and fit.n_fit < 20,
        collapse=res.rank_collapse, collapse_share=rank_collapse_share, num_traps=res.num_traps))
    if detX:
        for key, value in _detx.detx_columns(
                evals, fit.num_pl_spikes if fit.ok else math.nan).items():
            setattr(res, key, value)
    if keep_evals:
        res.evals = evals
    return res


def _randomized(res: LayerResult, lm: LayerMatrices, batch: Any, evals: np.ndarray,
                rand_raw: Optional[np.ndarray], rng: Optional[np.random.Generator],
                precision: str, solver: str, keep_evals: bool) -> None:
    from . import rmt

    replicas = rmt.num_replicas(lm.num_evals)
    if rand_raw is None:
        shuffled = shuffled_replicas(lm, batch, rng if rng is not None else np.random.default_rng())
        rand_raw = eigenvalues(shuffled, precision, solver)
    rand = [np.sort(part.ravel()) * lm.scale for part in np.split(rand_raw, replicas)]
    # replicas concatenated in order: rand_distance compares the first one with the ESD
    rm = rmt.randomization_metrics(evals, np.concatenate(rand), lm.N / lm.M, lm.M,
                                   n_per_replica=rand[0].size)
    res.rand_distance, res.max_rand_eval, res.num_traps = (
        rm["rand_distance"], rm["max_rand_eval"], rm["num_traps"])
    if keep_evals:
        res.rand_evals = rand[0]


def analyze_layer(
    lm: LayerMatrices,
    *,
    batch: Any = None,
    raw_evals: Optional[np.ndarray] = None,
    rand_raw: Optional[np.ndarray] = None,
    fix_fingers: Optional[str] = None,
    max_fingers: int = 10,
    finger_thresh: float = 1.0,
    mp_fit: bool = False,
    randomize: bool = False,
    rng: Optional[np.random.Generator] = None,
    precision: str = "auto",
    solver: str = "gram",
    keep_evals: bool = False,
    rank_tol: float = 1e-6,
    rank_collapse_share: float = 0.1,
    hill_xmin_pos: float = 2.0,
    detX: bool = False,
    plan: Optional[Tuple[str, str]] = None,
    previous: Optional[LayerResult] = None,
) -> LayerResult:
    """Analyse one layer (weights loaded here and released on return). See :func:`ww_core.analyze`.

    Raises:
        ValueError: an invalid ``precision`` or ``solver`` (numerical trouble is a flag instead).

    ``batch`` (the loaded ``(rf, rows, cols)`` stack), ``raw_evals`` (its unscaled eigenvalues)
    and ``rand_raw`` (those of :func:`~ww_core.batching.shuffled_replicas`) may be passed when
    the caller already has them from a batched eigensolve in ``plan``'s precision (``plan``:
    :func:`ww_core.precision.first_precision`'s answer; asked here, with ``previous``, when
    not given).

    Example:
        >>> import numpy as np, ww_core
        >>> lm = ww_core.find_layers({"fc.weight": np.random.default_rng(0).standard_normal((1000, 500))})[0]
        >>> ww_core.analyze_layer(lm).flags
        ('under-trained',)
    """
    fit_options: Dict[str, Any] = dict(fix_fingers=fix_fingers, max_fingers=max_fingers,
                                       finger_thresh=finger_thresh)
    solved = solve_layer(lm, batch=batch, raw_evals=raw_evals, plan=plan, previous=previous,
                         precision=precision, solver=solver, rank_tol=rank_tol,
                         rank_collapse_share=rank_collapse_share, **fit_options)
    return finish_layer(solved, rand_raw=rand_raw, mp_fit=mp_fit, randomize=randomize, rng=rng,
                        precision=precision, solver=solver, keep_evals=keep_evals,
                        rank_tol=rank_tol, rank_collapse_share=rank_collapse_share,
                        hill_xmin_pos=hill_xmin_pos, detX=detX, **fit_options)


def _all_finite(batch: Any) -> bool:
    if is_torch_tensor(batch):
        import torch

        wide = batch if batch.element_size() > 1 else batch.to(torch.float16)  # float8: no isfinite
        return bool(torch.isfinite(wide).all())
    return bool(np.isfinite(batch).all())


def layer_spectrum(raw_evals: np.ndarray, lm: LayerMatrices) -> np.ndarray:
    """The spectrum a layer's fit sees: its raw eigenvalues (every slice) pooled, sorted, times
    ``lm.scale``, and only the top ``lm.num_components`` of them when that is set (a LoRA
    product).

    Example:
        >>> import numpy as np, ww_core
        >>> lm = ww_core.find_layers({"fc.weight": np.eye(3)})[0]
        >>> layer_spectrum(np.array([[4.0, 1.0, 9.0]]), lm).tolist()
        [1.0, 4.0, 9.0]
    """
    evals = np.sort(raw_evals.ravel()) * lm.scale
    return evals if lm.num_components is None else evals[evals.size - min(lm.num_components, evals.size):]
