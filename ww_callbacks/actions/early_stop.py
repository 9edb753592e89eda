"""Early-stop signal from the mean alpha (framework-free policy; off unless the user asks).

Two triggers, checked on the series of mean alphas (one value per analysis, oldest first):

* **plateau**: the mean alpha has not improved (dropped by more than ``min_delta`` below the best
  value seen before) in the last ``patience`` analyses. Alpha falls as layers learn, so "improve"
  means "decrease";
* **over-trained**: the latest mean alpha is below ``lower_bound`` (WeightWatcher's README
  suggests stopping when the mean alpha drops below 2.0).

**Experimental**: the 2.0 bound is calibrated for WeightWatcher's CSN ``alpha`` on well-trained
models, not for the Hill estimator, and the mean alpha is not monotone in quality during LLM
pre-training (see ``docs/actions.md``).

The adapter asks the trainer to stop with its own mechanism (Lightning
``trainer.should_stop = True``, HF ``control.should_training_stop = True``, Keras
``model.stop_training = True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence

from ww_callbacks.actions._common import check_metric, finite

__all__ = ["EarlyStopPolicy", "StopDecision"]

_STATE_VERSION = 1


@dataclass
class StopDecision:
    """``stop`` and, when it is true, the ``reason`` (``""`` otherwise)."""

    stop: bool = False
    reason: str = ""

    def __bool__(self) -> bool:
        return self.stop

    def to_dict(self) -> Dict[str, Any]:
        return {"stop": self.stop, "reason": self.reason}


class EarlyStopPolicy:
    """Stop when the mean alpha plateaus for ``patience`` analyses or falls below ``lower_bound``.

    Args:
        patience: analyses without improvement before stopping (``>= 1``); ``None`` disables the
            plateau trigger.
        min_delta: an analysis improves only if its mean alpha is below the previous best by more
            than this (``>= 0``).
        lower_bound: stop when the latest mean alpha is below this; ``None`` disables it.
        metric: which alpha the adapter averages (``"alpha"``, the CSN scale of the bound, or
            ``"alpha_hill"``); :meth:`should_stop` itself only sees the series.

    Example:
        >>> p = EarlyStopPolicy(patience=2, min_delta=0.01)
        >>> p.should_stop([4.0, 3.5, 3.2]).stop
        False
        >>> p.should_stop([4.0, 3.5, 3.2, 3.21, 3.195]).reason
        'mean alpha has not improved by more than 0.01 below 3.200 for 2 analyses'
        >>> p.should_stop([3.0, 1.9]).reason
        'mean alpha 1.900 below the over-trained bound 2'
    """

    def __init__(self, patience: Optional[int] = 3, min_delta: float = 0.0,
                 lower_bound: Optional[float] = 2.0, metric: str = "alpha") -> None:
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int)
                                     or patience < 1):
            raise ValueError(f"patience must be an int >= 1 or None, got {patience!r}")
        if not finite(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        if lower_bound is not None and not finite(lower_bound):
            raise ValueError(f"lower_bound must be a finite number or None, got {lower_bound!r}")
        if patience is None and lower_bound is None:
            raise ValueError("patience and lower_bound are both None: nothing could stop training")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.lower_bound = None if lower_bound is None else float(lower_bound)
        self.metric = check_metric(metric)
        #: The decision that stopped training, once one did (kept across a resume).
        self.stopped: Optional[Dict[str, Any]] = None

    def should_stop(self, mean_alpha_series: Sequence[float]) -> StopDecision:
        """Decide from the mean alphas so far (oldest first, this analysis last).

        Non-finite entries (analyses where no fit succeeded) are ignored.
        """
        series = [float(v) for v in mean_alpha_series if finite(v)]
        if not series:
            return StopDecision()
        latest = series[-1]
        if self.lower_bound is not None and latest < self.lower_bound:
            return StopDecision(True, f"mean alpha {latest:.3f} below the over-trained bound "
                                      f"{self.lower_bound:g}")
        k = self.patience
        if k is not None and len(series) > k:
            best_before = min(series[:-k])
            if min(series[-k:]) >= best_before - self.min_delta:
                return StopDecision(True, f"mean alpha has not improved by more than "
                                          f"{self.min_delta:g} below {best_before:.3f} for {k} "
                                          f"analyses")
        return StopDecision()

    def record(self, decision: StopDecision, step: Optional[int] = None,
               epoch: Optional[int] = None) -> None:
        """Remember a stop decision (state for checkpoints and reports)."""
        if decision.stop and self.stopped is None:
            self.stopped = {**decision.to_dict(), "step": step, "epoch": epoch}

    def state_dict(self) -> Dict[str, Any]:
        return {"version": _STATE_VERSION, "stopped": self.stopped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if int(state.get("version", _STATE_VERSION)) > _STATE_VERSION:
            raise ValueError(f"early-stop state version {state.get('version')} is newer than "
                             f"supported ({_STATE_VERSION})")
        self.stopped = state.get("stopped")

    def __repr__(self) -> str:
        return (f"EarlyStopPolicy(patience={self.patience}, min_delta={self.min_delta}, "
                f"lower_bound={self.lower_bound}, metric={self.metric!r})")
