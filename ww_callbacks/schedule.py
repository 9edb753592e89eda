"""When to analyse: a small pure class, independent of any training framework.

Two modes:

* **epoch schedule** (default, ``every_n_epochs=1``): analyse at the end of every n-th epoch
  (epochs counted 1-based, so ``every_n_epochs=2`` analyses after epochs 2, 4, ...);
* **step schedule** (``every_n_steps`` given): analyse whenever the global step (the number of
  optimizer steps done, so gradient accumulation is accounted for) is a multiple of n.

Either way nothing runs before ``start_fraction`` of the planned training is done, because alpha
means little before the layers have learned correlations. "Done" is measured:

1. in optimizer steps, ``step >= ceil(start_fraction * total_steps)``, when the total number of
   steps is known (Lightning's ``estimated_stepping_batches``, HF's ``max_steps``);
2. otherwise in completed epochs, ``completed >= ceil(start_fraction * total_epochs)``, when only
   the number of epochs is known (e.g. an ``IterableDataset`` without ``__len__`` and
   ``max_epochs`` only);
3. otherwise (endless training: ``max_steps=-1`` and no epoch limit) the analysis starts
   immediately and :meth:`Schedule.configure` returns a warning to show once.

``start_fraction=0`` analyses from the first scheduled point; ``start_fraction=1`` leaves only the
final analysis at the end of training (the controller's ``finish``), plus a scheduled point that
falls exactly on the last step.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Optional

__all__ = ["Schedule"]

_EPS = 1e-9


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _known(total: Any) -> Optional[int]:
    """A usable positive finite total, else None (None, -1, 0, inf, nan are all 'unknown')."""
    if total is None or isinstance(total, bool):
        return None
    try:
        total = float(total)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(total) or total <= 0:
        return None
    return int(total)


class Schedule:
    """Decides whether an analysis is due.

    Args:
        start_fraction: share of the planned training (in ``[0, 1]``) after which analyses start.
        every_n_epochs: epoch schedule period; ``None`` means 1 unless ``every_n_steps`` is given.
        every_n_steps: step schedule period; when given, the schedule is step-based and
            ``every_n_epochs`` must not be given.

    Raises:
        ValueError: on an out-of-range ``start_fraction``, a non-positive or non-integer period,
            or both periods given.

    Example:
        >>> s = Schedule(start_fraction=0.5, every_n_steps=10)
        >>> s.configure(total_steps=100)
        >>> [step for step in range(1, 101) if s.should_run(step=step, epoch=0)]
        [50, 60, 70, 80, 90, 100]
    """

    def __init__(self, start_fraction: float = 0.5, every_n_epochs: Optional[int] = None,
                 every_n_steps: Optional[int] = None) -> None:
        if isinstance(start_fraction, bool) or not isinstance(start_fraction, numbers.Real) \
                or not (0.0 <= float(start_fraction) <= 1.0):
            raise ValueError(f"start_fraction must be a number in [0, 1], got {start_fraction!r}")
        if every_n_steps is not None and every_n_epochs is not None:
            raise ValueError("give either every_n_epochs or every_n_steps, not both "
                             f"(got every_n_epochs={every_n_epochs!r}, every_n_steps={every_n_steps!r})")
        if every_n_steps is not None:
            _check_positive_int("every_n_steps", every_n_steps)
        if every_n_epochs is not None:
            _check_positive_int("every_n_epochs", every_n_epochs)
        self.start_fraction = float(start_fraction)
        self.every_n_steps = int(every_n_steps) if every_n_steps is not None else None
        self.every_n_epochs = None if every_n_steps is not None else int(every_n_epochs or 1)
        self.total_steps: Optional[int] = None
        self.total_epochs: Optional[int] = None

    @property
    def mode(self) -> str:
        """``"steps"`` or ``"epochs"``."""
        return "steps" if self.every_n_steps is not None else "epochs"

    def configure(self, total_steps: Any = None, total_epochs: Any = None) -> Optional[str]:
        """Record the planned length; returns a warning text when the start falls back or the
        schedule never falls due within the planned length.

        ``total_steps``/``total_epochs`` of ``None``, ``-1``, ``0`` or ``inf`` mean unknown.
        """
        self.total_steps = _known(total_steps)
        self.total_epochs = _known(total_epochs)
        if self.start_fraction > 0 and self.total_steps is None and self.total_epochs is None:
            return (f"the total training length is unknown (total_steps={total_steps!r}, "
                    f"total_epochs={total_epochs!r}), so start_fraction={self.start_fraction:g} "
                    "cannot be applied: analyses start immediately")
        return self._never_due()

    def _never_due(self) -> Optional[str]:
        """Why no analysis falls due before the planned end, else ``None``."""
        if self.every_n_steps is not None and self.total_steps is not None:
            n = self.every_n_steps
            first = n * math.ceil(max(self.start_step or 0, 1) / n)
            if first > self.total_steps:
                return (f"every_n_steps={n} with start_fraction={self.start_fraction:g} first falls due "
                        f"at step {first}, after the planned {self.total_steps} steps: only the final "
                        "analysis at the end of training runs")
        if self.every_n_steps is None and self.total_epochs is not None \
                and self.every_n_epochs > self.total_epochs:
            return (f"every_n_epochs={self.every_n_epochs} is more than the planned {self.total_epochs} "
                    "epochs: only the final analysis at the end of training runs")
        return None

    @property
    def start_step(self) -> Optional[int]:
        """First step at which analyses may run, when the total number of steps is known."""
        if self.total_steps is None:
            return None
        return int(math.ceil(self.start_fraction * self.total_steps - _EPS))

    @property
    def start_epoch(self) -> Optional[int]:
        """Completed epochs needed before analyses may run (used when steps are unknown)."""
        if self.total_epochs is None:
            return None
        return int(math.ceil(self.start_fraction * self.total_epochs - _EPS))

    def started(self, step: int, epoch: int, epoch_end: bool = False) -> bool:
        """Whether ``start_fraction`` of the training is done at this point.

        Args:
            step: global (optimizer) step, i.e. the number of optimizer steps done.
            epoch: 0-based index of the current epoch.
            epoch_end: True when called at the end of ``epoch`` (it then counts as completed).
        """
        if self.start_fraction == 0:
            return True
        if self.total_steps is not None:
            return step >= self.start_step
        if self.total_epochs is not None:
            completed = epoch + 1 if epoch_end else epoch
            return completed >= self.start_epoch
        return True

    def with_start(self, start_fraction: float) -> "Schedule":
        """The same interval and planned length, from another ``start_fraction`` (e.g. auto-freeze's
        earlier start, :attr:`ww_callbacks.settings.Freeze.start_fraction`)."""
        other = Schedule(start_fraction, self.every_n_epochs if self.mode == "epochs" else None,
                         self.every_n_steps)
        other.total_steps, other.total_epochs = self.total_steps, self.total_epochs
        return other

    def should_run(self, step: int, epoch: int, epoch_end: bool = False) -> bool:
        """Whether the schedule asks for an analysis now (ignores what was analysed already)."""
        if not self.started(step, epoch, epoch_end):
            return False
        if self.every_n_steps is not None:
            return not epoch_end and step > 0 and step % self.every_n_steps == 0
        return epoch_end and (epoch + 1) % self.every_n_epochs == 0

    def describe(self) -> Dict[str, Any]:
        """The settings and the resolved start, for logs and state."""
        return {"mode": self.mode, "start_fraction": self.start_fraction,
                "every_n_epochs": self.every_n_epochs, "every_n_steps": self.every_n_steps,
                "total_steps": self.total_steps, "total_epochs": self.total_epochs,
                "start_step": self.start_step, "start_epoch": self.start_epoch}

    def __repr__(self) -> str:
        period = (f"every_n_steps={self.every_n_steps}" if self.mode == "steps"
                  else f"every_n_epochs={self.every_n_epochs}")
        return f"Schedule(start_fraction={self.start_fraction:g}, {period})"


def early_schedule(schedule: Schedule, start_fraction: Optional[float]) -> Optional[Schedule]:
    """The analyses an action that starts before ``schedule`` needs in between: ``schedule``'s
    interval from ``start_fraction`` (``None`` when the action starts with ``schedule`` or later).

    Example:
        >>> s = Schedule(start_fraction=0.5, every_n_steps=10)
        >>> _ = s.configure(total_steps=100)
        >>> early = early_schedule(s, 0.2)
        >>> [step for step in range(1, 101) if early.should_run(step, 0) and not s.started(step, 0)]
        [20, 30, 40]
        >>> early_schedule(s, None) is None and early_schedule(s, 0.5) is None
        True
    """
    if start_fraction is None or start_fraction >= schedule.start_fraction:
        return None
    return schedule.with_start(start_fraction)
