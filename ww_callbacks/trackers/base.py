"""The interface every tracker backend implements."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List

from ww_callbacks.values import finite_float, plain_value  # noqa: F401  (shared by the trackers)


class Tracker:
    """Receives each finished analysis. Subclasses override what they support.

    The controller calls trackers only on global rank 0, catches every exception a tracker raises
    (a failing tracker is disabled after reporting once, the local record keeps going) and calls
    :meth:`close` once at the end of training.

    Args of :meth:`log_analysis`:
        step: the trainer's global step the analysed weights belong to.
        epoch: the epoch (0-based) at that step.
        rows: one dict per analysed layer: ``ww_core.result.COLUMNS`` plus ``step`` and ``epoch``.
        summary: ``AnalysisResult.summary()`` of this analysis.
        result: the :class:`ww_core.AnalysisResult` itself (eigenvalues available when the
            controller kept them, for ESD images of flagged layers).
        history: every row logged so far (all analyses, oldest first), for curve charts.
    """

    name = "tracker"

    def log_analysis(self, *, step: int, epoch: int, rows: List[Dict[str, Any]],
                     summary: Dict[str, float], result: Any, history: List[Dict[str, Any]]) -> None:
        raise NotImplementedError

    def log_event(self, *, step: int, kind: str, payload: Dict[str, Any]) -> None:
        """An action or recommendation (freeze, learning-rate factors, stop). Optional."""

    def close(self) -> None:
        """Flush and release; never closes a run the trainer owns."""


# -- helpers shared by the backends: metric keys and plain values ------------------------------
#: Per-layer columns logged as scalars (when finite) by the scalar trackers.
LAYER_METRICS = (
    "alpha", "alpha_hill", "alpha_weighted", "log_alpha_norm", "D", "log_norm", "log_spectral_norm",
    "spectral_norm", "stable_rank", "entropy", "num_pl_spikes", "rand_distance", "num_traps",
    "mp_softrank",
)


def metric_key(prefix: str, layer: str, metric: str) -> str:
    """``<prefix>/<layer>/<metric>``."""
    return f"{prefix}/{layer}/{metric}"


def flat_metrics(rows: Iterable[Dict[str, Any]], summary: Dict[str, Any], prefix: str = "ww",
                 metrics: Iterable[str] = LAYER_METRICS) -> Dict[str, float]:
    """Scalars of one analysis: ``<prefix>/<layer>/<metric>`` and ``<prefix>/summary/<metric>``.

    Non-finite values (``alpha`` of a failed fit is ``nan``) and non-numeric columns are left out,
    so every backend receives the same plottable set.
    """
    out: Dict[str, float] = {}
    metrics = tuple(metrics)
    for row in rows:
        name = str(row.get("name"))
        for metric in metrics:
            value = finite_float(row.get(metric))
            if value is not None:
                out[metric_key(prefix, name, metric)] = value
    for metric, value in (summary or {}).items():
        value = finite_float(value)
        if value is not None:
            out[f"{prefix}/summary/{metric}"] = value
    return out
