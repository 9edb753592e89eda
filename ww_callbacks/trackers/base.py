"""The interface every tracker backend implements."""

from __future__ import annotations

from typing import Any, Dict, List


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
