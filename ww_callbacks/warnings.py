"""The one warning category of ``ww_callbacks``.

Misconfiguration that does not stop training (``configure()`` never called, a ``start_fraction``
that cannot be applied, a schedule that never fires before the end, a tracker or an
``EarlyStopping`` monitor that cannot work) is reported with
``warnings.warn(..., WeightWatcherWarning)`` (Lightning: ``rank_zero_warn``), on global rank 0,
so that it can be filtered, turned into an error in tests, or silenced::

    import warnings
    from ww_callbacks import WeightWatcherWarning
    warnings.filterwarnings("ignore", category=WeightWatcherWarning)

:class:`~ww_callbacks.history.HistoryWarning` (the history files could not be written) is a
subclass, so the filter above silences it too. Per-analysis lines and error reports stay log
lines (``log_fn``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

__all__ = ["WeightWatcherWarning", "warn"]


class WeightWatcherWarning(UserWarning):
    """A ``ww_callbacks`` setting that does not do what it says (training continues)."""


def warn(message: str, stacklevel: int = 2, warn_fn: Optional[Callable[..., Any]] = None) -> None:
    """Emit ``message`` as a :class:`WeightWatcherWarning`; ``stacklevel`` counts from the caller
    of this function. ``warn_fn``: another ``warn(message, category=...)`` (Lightning's
    ``rank_zero_warn``)."""
    if warn_fn is not None:
        warn_fn(message, category=WeightWatcherWarning, stacklevel=stacklevel + 1)
    else:
        warnings.warn(message, WeightWatcherWarning, stacklevel=stacklevel + 1)
