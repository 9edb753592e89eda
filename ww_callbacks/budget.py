"""The overhead budget: how much of training the analyses and their record may take.

``max_overhead=0.05`` (a keyword of the controller and of every callback) lets the analyses and
their record cost at most 5 % of the training's own time: an analysis that falls due is started
only when the cost spent so far plus the expected cost of this one stays within
``max_overhead × training time``; otherwise it is skipped (counted in
:attr:`OverheadBudget.skipped`), so analyses requested often are spaced out. The first analysis
always runs (it measures the cost). The realised share is reported after every analysis
(``ww/overhead`` in the summary keys, ``overhead x.x %`` in the per-analysis line), with or
without a cap.

What is counted:

* **CPU** (the weights are not on a GPU): CPU time, since the analysis shares the training's
  cores. The background analysis runs in its own thread with one torch thread (so all its work
  is on that thread's clock, :func:`time.thread_time`) and, on Linux, at a lower priority
  (``nice``); a synchronous analysis is the process's CPU time while training waits. The
  training's time is the process's CPU time minus the analyses' cost.
* **GPU**: wall time, the analysis' own duration against the time since training started.

Both add what the hook (the weight copy) and the record (history, trackers, actions) took while
the training thread waited for them, on the same clock.

Example:
    >>> clock = [0.0]
    >>> budget = OverheadBudget(0.05, clock=lambda: clock[0])
    >>> budget.start()
    >>> budget.allow()              # the first analysis always runs
    True
    >>> budget.charge(1.0)          # it cost 1 s
    >>> clock[0] = 11.0             # 10 s of training later
    >>> budget.allow(), budget.share()   # another 1 s would make 2 s of 10 s: 20 % > 5 %
    (False, 0.1)
    >>> clock[0] = 41.0             # 40 s of training: 2 s is 5 %
    >>> budget.allow()
    True
"""

from __future__ import annotations

import math
import numbers
import os
import threading
import time
from typing import Any, Callable, Optional, Union

__all__ = ["OverheadBudget", "check_max_overhead", "lower_thread_priority", "on_gpu"]

#: Default ``nice`` increment of the background analysis thread on Linux: none. A lower
#: priority made no measurable difference to training's CPU time, and under a busy training loop
#: it starves the analysis so that the next ones are skipped as still running.
DEFAULT_NICE = 0


def check_max_overhead(value: Any) -> "OverheadBudget":
    """The :class:`OverheadBudget` of a ``max_overhead=`` keyword.

    Args:
        value: ``None`` (no cap; the share is still reported), a share in ``(0, 1]``, or an
            :class:`OverheadBudget`.

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, OverheadBudget):
        return value
    return OverheadBudget(value)


def on_gpu(model: Any) -> bool:
    """Whether the first parameter of ``model`` (a torch module) lives on a CUDA device."""
    params = getattr(model, "parameters", None)
    if not callable(params):
        return False
    try:
        first = next(iter(params()))
    except (StopIteration, TypeError):
        return False
    return getattr(getattr(first, "device", None), "type", None) == "cuda"


def lower_thread_priority(nice: int = DEFAULT_NICE, threads: Optional[int] = 1) -> None:
    """Set the calling thread's torch threads and, on Linux, its ``nice`` value.

    Linux schedules threads individually, so ``os.setpriority`` on the thread's native id lowers
    this thread only (threads it starts later inherit it). Errors (no permission, no torch) are
    ignored: this only ever lowers what the analysis takes.
    """
    if threads is not None:
        try:
            import torch

            torch.set_num_threads(int(threads))     # per thread: training keeps its own count
        except Exception:  # pragma: no cover - no torch
            pass
    if nice and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(nice))
        except OSError:  # pragma: no cover - not permitted
            pass


class OverheadBudget:
    """Holds the analyses' share of the training time at or below ``max_overhead``.

    Args:
        max_overhead: the share (``0.05`` = 5 %), or ``None``: no cap, only measured.
        clock: ``"auto"`` (default): CPU time (:func:`time.process_time`) unless the model is on
            a GPU, then wall time; ``"cpu"``, ``"wall"``, or a function returning seconds (tests:
            it then also times the analyses).
        nice: ``nice`` increment of the background analysis thread on Linux (``0``: none).
        threads: torch threads of the background analysis thread (``None``: torch's default;
            its CPU time is then only partly on the thread's clock).

    Raises:
        ValueError: an invalid value (the message names the keyword).
    """

    def __init__(self, max_overhead: Optional[float] = None,
                 clock: Union[str, Callable[[], float]] = "auto", nice: int = DEFAULT_NICE,
                 threads: Optional[int] = 1) -> None:
        if max_overhead is not None and (isinstance(max_overhead, bool)
                                         or not isinstance(max_overhead, numbers.Real)
                                         or not 0.0 < float(max_overhead) <= 1.0):
            raise ValueError(f"max_overhead must be a share in (0, 1] (0.05 = 5 %) or None, "
                             f"got {max_overhead!r}")
        if not (callable(clock) or clock in ("auto", "cpu", "wall")):
            raise ValueError(f"max_overhead clock must be 'auto', 'cpu', 'wall' or a function, got {clock!r}")
        if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
            raise ValueError(f"max_overhead nice must be an integer in [0, 19], got {nice!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"max_overhead threads must be a positive integer or None, got {threads!r}")
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self.clock = clock
        self.nice, self.threads = nice, threads
        #: Analyses that fell due and were skipped to hold the budget.
        self.skipped = 0
        #: Seconds charged so far (analyses, hook, record).
        self.spent = 0.0
        #: Analyses charged so far.
        self.charged = 0
        self._t0: Optional[float] = None
        self._last_cost: Optional[float] = None
        self._last_layers: Optional[int] = None
        self._mode: Optional[str] = None if clock == "auto" else ("custom" if callable(clock) else clock)

    @property
    def mode(self) -> str:
        """``"cpu"``, ``"wall"`` or ``"custom"`` (``"cpu"`` until :meth:`use_device` decides)."""
        return self._mode or "cpu"

    def use_device(self, model: Any) -> None:
        """With ``clock="auto"``, choose wall time for a model on a GPU, else CPU time (once)."""
        if self._mode is None:
            self._mode = "wall" if on_gpu(model) else "cpu"
            if self._t0 is not None and self._mode == "wall":
                self._t0 = None          # restart the reference on the wall clock
                self.start()

    def now(self) -> float:
        """The training clock: the process's CPU time, wall time, or the given function."""
        if callable(self.clock):
            return float(self.clock())
        return time.perf_counter() if self.mode == "wall" else time.process_time()

    @property
    def thread_clock(self) -> Callable[[], float]:
        """What times a background analysis, in its own thread."""
        if callable(self.clock):
            return self.clock
        return time.perf_counter if self.mode == "wall" else time.thread_time

    @property
    def process_clock(self) -> Callable[[], float]:
        """What times a synchronous analysis, the weight copy and the record (training waits
        meanwhile, so the process's CPU time then is theirs)."""
        return self.clock if callable(self.clock) else self.now


    def start(self) -> None:
        """Start counting the training time (the controller calls it in ``configure``; once)."""
        if self._t0 is None:
            self._t0 = self.now()

    def training_seconds(self) -> float:
        """The training's own time so far: the clock since :meth:`start` minus what was charged."""
        if self._t0 is None:
            return 0.0
        return max(self.now() - self._t0 - self.spent, 0.0)

    def share(self) -> Optional[float]:
        """The realised share: seconds charged / training seconds (``None`` before any)."""
        if not self.charged:
            return None
        training = self.training_seconds()
        return self.spent / training if training > 0 else math.inf

    def estimate(self, layers: Optional[int] = None) -> float:
        """The expected cost of the next analysis: the last one's, per layer when both counts
        are known."""
        if self._last_cost is None:
            return 0.0
        if layers and self._last_layers:
            return self._last_cost * layers / self._last_layers
        return self._last_cost

    def allow(self, layers: Optional[int] = None) -> bool:
        """Whether an analysis (of ``layers`` layers, if known) may start now; a refusal is counted
        in :attr:`skipped`."""
        if self.max_overhead is None or not self.charged:
            return True
        if self.spent + self.estimate(layers) <= self.max_overhead * self.training_seconds():
            return True
        self.skipped += 1
        return False

    def charge(self, seconds: float, layers: Optional[int] = None, analysis: bool = True) -> None:
        """Add ``seconds`` of cost; ``analysis=True`` (an analysis' own cost, of ``layers``
        layers) also sets the estimate of the next one, ``False`` adds to the latest one (its
        record)."""
        seconds = max(float(seconds), 0.0)
        self.spent += seconds
        if analysis:
            self.charged += 1
            self._last_cost, self._last_layers = seconds, layers
        elif self._last_cost is not None:
            self._last_cost += seconds

    def admit(self, executor: Any, model: Any, step: int, layers: Optional[int] = None,
              log: Callable[[str], Any] = lambda line: None) -> bool:
        """:meth:`allow` for the controller: the first time, choose the clock from ``model``'s
        device and give ``executor`` its clocks and worker setup (on a CPU: one torch thread,
        ``nice``); ``log`` the first refusal.
        """
        if executor.worker_setup is None:
            self.use_device(model)
            executor.thread_clock, executor.process_clock = self.thread_clock, self.process_clock
            wall = self.mode == "wall"
            executor.worker_setup = lambda: lower_thread_priority(0 if wall else self.nice,
                                                                  None if wall else self.threads)
        if self.allow(layers):
            return True
        if self.skipped == 1:
            log(f"ww step {step}: analysis skipped to hold max_overhead={self.max_overhead:g} "
                f"(realised {self.share() or 0.0:.1%}); later ones are spaced out the same way")
        return False

    def describe(self) -> str:
        """The per-analysis line's part: ``overhead 3.2 %`` (and the analyses skipped)."""
        share = self.share()
        text = "overhead " + (f"{share:.1%}" if share is not None and math.isfinite(share) else "n/a")
        return text + (f", {self.skipped} skipped by max_overhead" if self.skipped else "")

    def state_dict(self) -> dict:
        """What a resume keeps: the counters (the clock restarts)."""
        return {"skipped": self.skipped}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Restore :meth:`state_dict` (a missing state changes nothing)."""
        if state:
            self.skipped = int(state.get("skipped", 0))

    def __repr__(self) -> str:
        return f"OverheadBudget(max_overhead={self.max_overhead!r}, clock={self.clock!r})"
