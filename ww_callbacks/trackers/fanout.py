"""Calling the trackers without letting one of them stall or break training.

Each tracker gets its own daemon thread: a call is handed to it and the training thread waits
at most ``timeout`` seconds for the answer. A tracker that raises, or does not answer in time (a
hung network call, a dead server), is dropped with one report; the others, and the history
files the controller writes itself, continue. A hung call is abandoned in its daemon thread,
which cannot keep the process alive at exit. With ``strict`` the calls run in the training
thread and errors propagate.

Example:
    >>> class Slow:
    ...     name = "slow"
    ...     def log_event(self, **kw):
    ...         import time; time.sleep(5)
    ...     def close(self): pass
    >>> reports = []
    >>> fan = TrackerFanout(lambda key, context, exc: reports.append(context), timeout=0.2)
    >>> trackers = [Slow()]
    >>> fan(trackers, "at step 3", "log_event", step=3, kind="freeze", payload={})
    >>> trackers, reports
    ([], ['tracker slow did not answer within 0.2 s at step 3; tracker dropped'])
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Dict, List, Optional

from ww_callbacks.trackers.base import Tracker

__all__ = ["TrackerFanout", "DEFAULT_TIMEOUT"]

#: Seconds the training thread waits for one tracker call before dropping the tracker.
DEFAULT_TIMEOUT = 30.0


class _Worker:
    """One daemon thread running one tracker's calls, in order."""

    def __init__(self, name: str) -> None:
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"ww-tracker-{name}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fn, kwargs, box, done = job
            try:
                box["value"] = fn(**kwargs)
            except BaseException as exc:  # handed back to the caller
                box["error"] = exc
            done.set()

    def call(self, fn: Callable[..., Any], kwargs: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        box: Dict[str, Any] = {}
        done = threading.Event()
        self._queue.put((fn, kwargs, box, done))
        if not done.wait(timeout):
            box["timeout"] = True
        return box

    def stop(self) -> None:
        self._queue.put(None)


class TrackerFanout:
    """Calls a method on every tracker of a list, isolating the training thread from them.

    Args:
        report: ``report(key, context, exc)``, the controller's once-per-kind error report.
        timeout: seconds to wait for one call (``None``: wait as long as it takes).
        strict: call in the training thread and let errors propagate.
    """

    def __init__(self, report: Callable[[str, str, BaseException], Any],
                 timeout: Optional[float] = DEFAULT_TIMEOUT, strict: bool = False) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"tracker_timeout must be a positive number of seconds or None, got {timeout!r}")
        self.report, self.timeout, self.strict = report, timeout, strict
        self._workers: Dict[int, _Worker] = {}

    def __call__(self, trackers: List[Tracker], when: str, method: str, **kwargs: Any) -> None:
        """``tracker.<method>(**kwargs)`` for each tracker of ``trackers``, in order; a tracker
        that fails or hangs is removed from the list."""
        for tracker in list(trackers):
            name = getattr(tracker, "name", type(tracker).__name__)
            fn = getattr(tracker, method)
            if self.strict:
                fn(**kwargs)
                continue
            worker = self._workers.get(id(tracker))
            if worker is None:
                worker = self._workers[id(tracker)] = _Worker(str(name))
            box = worker.call(fn, kwargs, self.timeout if self.timeout is not None else 1e9)
            if "timeout" in box:
                trackers.remove(tracker)
                self._workers.pop(id(tracker), None)
                self.report(f"tracker {id(tracker)}", f"tracker {name} did not answer within "
                            f"{self.timeout:g} s {when}; tracker dropped",
                            TimeoutError(f"no answer after {self.timeout:g} s"))
            elif "error" in box and isinstance(box["error"], Exception):
                trackers.remove(tracker)
                self.report(f"tracker {id(tracker)}", f"tracker {name} failed {when}; tracker disabled",
                            box["error"])
                self._close(tracker)
            elif "error" in box:
                raise box["error"]                     # KeyboardInterrupt, SystemExit

    def _close(self, tracker: Tracker) -> None:
        worker = self._workers.pop(id(tracker), None)
        if worker is not None:
            worker.call(lambda: tracker.close(), {}, self.timeout or 1e9)
            worker.stop()

    def close(self, trackers: List[Tracker]) -> None:
        """Close every tracker (each within the timeout, errors reported) and stop the threads."""
        for tracker in list(trackers):
            name = getattr(tracker, "name", type(tracker).__name__)
            if self.strict:
                tracker.close()
                continue
            worker = self._workers.pop(id(tracker), None) or _Worker(str(name))
            box = worker.call(tracker.close, {}, self.timeout if self.timeout is not None else 1e9)
            worker.stop()
            if "timeout" in box:
                self.report(f"closing tracker {name}", f"tracker {name} did not close within "
                            f"{self.timeout:g} s; abandoned", TimeoutError("close"))
            elif "error" in box:
                self.report(f"closing tracker {name}", f"closing tracker {name}", box["error"])
        for worker in self._workers.values():
            worker.stop()
        self._workers.clear()
