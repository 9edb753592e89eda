"""The error policy and the console line: how ``ww_callbacks`` speaks to the user.

Monitoring must never break training: an error in the analysis, a tracker or an action is
reported **once per kind** through ``log_fn`` (on global rank 0 only) and training continues;
``strict=True`` re-raises instead (for tests and debugging).

Example:
    >>> lines = []
    >>> rep = ErrorReporter(log_fn=lines.append)
    >>> rep.guard("dividing", lambda: 1 / 0) is None
    True
    >>> rep.guard("dividing", lambda: 1 / 0) is None   # same kind: not reported again
    True
    >>> len(lines), lines[0].split(":")[1].strip()
    (1, 'dividing')
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Callable, Optional

__all__ = ["ErrorReporter", "format_line", "logger"]

logger = logging.getLogger("ww_callbacks")

#: How many flagged layers the compact log line names before "+N more".
MAX_FLAGGED_IN_LINE = 5


class ErrorReporter:
    """Reports each kind of error once and keeps training going.

    Args:
        log_fn: where messages go (default: the ``ww_callbacks`` logger at INFO).
        strict: re-raise instead of reporting.

    Attributes:
        is_global_zero: only global rank 0 writes messages (set by the controller).

    Raises:
        ValueError: ``log_fn`` is not callable.
    """

    def __init__(self, log_fn: Optional[Callable[[str], Any]] = None, strict: bool = False) -> None:
        if log_fn is not None and not callable(log_fn):
            raise ValueError(f"log_fn must be callable, got {log_fn!r}")
        self.log_fn = log_fn if log_fn is not None else logger.info
        self.strict = bool(strict)
        self.is_global_zero = True
        self._reported: set = set()

    def log(self, message: str) -> None:
        """Send ``message`` to ``log_fn`` (falls back to the logger if ``log_fn`` raises)."""
        try:
            self.log_fn(message)
        except Exception:  # a broken log_fn must not break training
            logger.info(message)

    def report(self, key: str, context: str, exc: BaseException) -> None:
        """Report ``exc`` under ``key`` once (rank 0 only); re-raise when ``strict``.

        Args:
            key: the kind of error; a second error of the same kind is not reported.
            context: what was being done, e.g. ``"analysis at step 40 failed"``.
            exc: the exception (details go to the logger at DEBUG).

        Raises:
            BaseException: ``exc`` itself when ``strict``.
        """
        if self.strict:
            raise exc
        if key in self._reported or not self.is_global_zero:
            return
        self._reported.add(key)
        self.log(f"ww: {context}: {type(exc).__name__}: {exc} (training continues; further "
                 f"errors of this kind are not reported)")
        logger.debug("ww_callbacks error details (%s)", context, exc_info=exc)

    def guard(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or ``None`` after reporting its error under ``what``."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.report(what, what, exc)
            return None


def format_line(result: Any, step: int, epoch: int) -> str:
    """The one-line summary of an analysis.

    Example:
        >>> from types import SimpleNamespace as L
        >>> res = L(layers=[L(name="fc1", alpha=3.0, flags=()),
        ...                 L(name="fc2", alpha=7.0, flags=("under-trained",))])
        >>> format_line(res, 120, 3)
        'ww step 120 epoch 3: mean alpha 5.00 (2 layers), flagged: fc2 under-trained'

    Layers fitted on too few eigenvalues (only ``too-few-evals``, e.g. LoRA updates) are not
    judged, so not listed as flagged: the line counts them.

        >>> res = L(layers=[L(name="q.lora_BA", alpha=1.2, flags=("too-few-evals",))])
        >>> format_line(res, 8, 0)
        'ww step 8 epoch 0: mean alpha 1.20 (1 layers), flagged: none; 1 fitted on too few eigenvalues'
    """
    from ww_callbacks.trackers.base import is_flagged, is_unjudged

    layers = list(getattr(result, "layers", ()))
    alphas = [la.alpha for la in layers
              if isinstance(la.alpha, numbers.Real) and math.isfinite(la.alpha)]
    mean = f"{sum(alphas) / len(alphas):.2f}" if alphas else "n/a"
    flagged = [f"{la.name} {'/'.join(la.flags)}" for la in layers if is_flagged(la.flags)]
    text = ", ".join(flagged[:MAX_FLAGGED_IN_LINE]) or "none"
    if len(flagged) > MAX_FLAGGED_IN_LINE:
        text += f", +{len(flagged) - MAX_FLAGGED_IN_LINE} more"
    unjudged = sum(1 for la in layers if is_unjudged(la.flags))
    if unjudged:
        text += f"; {unjudged} fitted on too few eigenvalues"
    skipped = list(getattr(result, "skipped", None) or ())
    if not layers and skipped:      # say why nothing was analysed
        reasons = sorted({str(getattr(s, "reason", "")) for s in skipped})
        text = f"none; {len(skipped)} skipped ({reasons[0]}{', ...' if len(reasons) > 1 else ''})"
    return f"ww step {step} epoch {epoch}: mean alpha {mean} ({len(layers)} layers), flagged: {text}"
