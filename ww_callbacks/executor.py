"""The background analysis: one worker thread, at most one analysis in flight.

Training waits only for the weight copy (:func:`ww_core.snapshot`); the spectra are computed in
the ``ww-analysis`` thread and the result is collected by a later :meth:`BackgroundAnalysis.collect`,
stamped with the step it belongs to.

Example:
    >>> bg = BackgroundAnalysis()
    >>> bg.submit(step=10, epoch=0, started=0.0, hook_seconds=0.01, fn=sum, args=([1, 2],))
    >>> bg.collect(wait=True).result
    3
    >>> bg.busy, bg.shutdown()
    (False, None)
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["BackgroundAnalysis", "Finished"]


@dataclass
class Finished:
    """A collected background analysis.

    Attributes:
        step: the training step the weights were copied at.
        epoch: the epoch they belong to.
        started: Unix time of the copy.
        hook_seconds: how long training waited for it (the copy, plus any wait in ``collect``).
        waited: the part of ``hook_seconds`` spent waiting in ``collect``.
        result: the analysis result (``None`` when it raised).
        error: the exception it raised, else ``None``.
    """

    step: int
    epoch: int
    started: float
    hook_seconds: float
    waited: float = 0.0
    result: Any = None
    error: Optional[BaseException] = None


class BackgroundAnalysis:
    """Runs one analysis at a time in a single worker thread (``ww-analysis``)."""

    def __init__(self) -> None:
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[tuple] = None     # (future, step, epoch, started, hook_seconds)

    @property
    def busy(self) -> bool:
        """Whether an analysis was submitted and not yet collected."""
        return self._pending is not None

    def submit(self, step: int, epoch: int, started: float, hook_seconds: float,
               fn: Callable[..., Any], args: tuple = (), kwargs: Optional[dict] = None) -> None:
        """Start ``fn(*args, **kwargs)`` in the worker thread.

        Raises:
            RuntimeError: an analysis is still pending (collect it first).
        """
        if self._pending is not None:
            raise RuntimeError("an analysis is already in flight")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ww-analysis")
        future: Future = self._executor.submit(fn, *args, **(kwargs or {}))
        self._pending = (future, step, epoch, started, hook_seconds)

    def collect(self, wait: bool = False) -> Optional[Finished]:
        """The finished analysis (``wait=True`` waits for it), or ``None`` when none is ready.

        The seconds spent waiting are added to ``hook_seconds``: training waited for them too.
        """
        if self._pending is None:
            return None
        future, step, epoch, started, hook = self._pending
        waited = 0.0
        if not future.done():
            if not wait:
                return None
            t0 = time.perf_counter()
            futures_wait([future])
            waited = time.perf_counter() - t0
        self._pending = None
        done = Finished(step, epoch, started, hook + waited, waited)
        try:
            done.result = future.result()
        except Exception as exc:
            done.error = exc
        return done

    def shutdown(self) -> None:
        """Stop the worker thread (waits for a running analysis)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
