"""Any logger with ``log_metrics(metrics, step)``: the summary scalars of each analysis.

Lightning's ``CSVLogger``, ``CometLogger``, ``NeptuneLogger``, DVCLive's logger and any custom
``Logger`` get the ``ww/<summary key>`` scalars (mean/median alpha, flagged and frozen counts,
...; :data:`~ww_callbacks.trackers.base.SUMMARY_KEYS`) at the trainer's step, through their own
API; per-layer values stay in the history files and the dedicated trackers.

Example:
    >>> class Printer:
    ...     def log_metrics(self, metrics, step):
    ...         print(step, sorted(metrics)[:2])
    >>> MetricsLoggerTracker(Printer()).log_analysis(step=8, epoch=0, rows=[{"alpha": 3.0}],
    ...     summary={"num_layers": 1}, result=None, history=[])
    8 ['ww/alpha_max', 'ww/alpha_mean']
"""

from __future__ import annotations

from typing import Any, Dict, List

from ww_callbacks.trackers.base import Tracker, summary_scalars

__all__ = ["MetricsLoggerTracker"]


class MetricsLoggerTracker(Tracker):
    """Send the summary scalars to ``logger.log_metrics(metrics, step)``.

    Args:
        logger: the logger (never closed or finalised here: the trainer owns it).
        prefix: key prefix (``ww``).

    Raises:
        ValueError: ``logger`` has no ``log_metrics``.
    """

    name = "logger"

    def __init__(self, logger: Any, prefix: str = "ww") -> None:
        if not callable(getattr(logger, "log_metrics", None)):
            raise ValueError(f"{type(logger).__name__} has no log_metrics(metrics, step)")
        self.logger = logger
        self.prefix = prefix
        self.name = f"logger:{type(logger).__name__}"

    def log_analysis(self, *, step: int, epoch: int, rows: List[Dict[str, Any]],
                     summary: Dict[str, float], result: Any, history: List[Dict[str, Any]]) -> None:
        metrics = {f"{self.prefix}/{k}": v for k, v in summary_scalars(rows, summary).items()}
        if metrics:
            self.logger.log_metrics(metrics, step=int(step))
