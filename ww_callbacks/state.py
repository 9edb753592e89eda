"""The controller's run state and its checkpoint form.

:class:`RunState` is owned by :class:`~ww_callbacks.controller.WeightWatcherController`
(``controller.state``): the run's counters and output folder, and the parts it saves with them,
all given to it explicitly (the history, the schedule, the action set, the executor, the error
policy). The controller holds the run logic; this module holds the persistence.

The history is not in the checkpoint: ``history.jsonl`` in the run folder is the record, and the
state points into it (folder, last step, row count); a resume reads the rows back from there. Only
rows that could not be written to it (a full or read-only disk) travel in the state, until a write
succeeds (:meth:`ww_callbacks.history.History.state_dict`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from ww_callbacks.atomic import read_json, write_json

__all__ = ["RunState", "StateField", "delegate", "STATE_VERSION", "STATE_FILE"]

#: Version of :meth:`RunState.state_dict`; a newer one is refused.
STATE_VERSION = 1
#: The run folder's state file: the latest states, one per analysis step (:meth:`RunState.write`).
STATE_FILE = "ww_state.json"
#: How many states the state file keeps (a resume picks the newest at or before its step).
KEEP_STATES = 16


def _state_step(state: Dict[str, Any]) -> int:
    """The step a state describes: its last analysed step or the analysis it started."""
    started = state.get("started") or [-1]
    last = state.get("last_step")
    return max(int(started[0]), int(last) if last is not None else -1)


class StateField:
    """A controller attribute kept in one of its parts: ``last_step = StateField("state")``
    reads and writes ``controller.state.last_step`` (``readonly=True``: reads only; ``attr``: the
    part's attribute, when its name differs)."""

    def __init__(self, part: str, doc: Optional[str] = None, readonly: bool = False,
                 attr: Optional[str] = None) -> None:
        self.part, self.readonly, self.__doc__, self.name = part, readonly, doc, attr

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.part), self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        if self.readonly:
            raise AttributeError(f"{self.name} is read-only")
        setattr(getattr(obj, self.part), self.name, value)


def delegate(part: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """A controller method that calls ``func`` (a method of one of its parts) on that part:
    ``state_dict = delegate("state", RunState.state_dict)``; same signature and docstring."""
    @functools.wraps(func)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return func(getattr(self, part), *args, **kwargs)
    return method


class RunState:
    """What a run has done so far, and its checkpoint form.

    Args:
        history: the run's :class:`~ww_callbacks.history.History`.
        schedule: its :class:`~ww_callbacks.schedule.Schedule` (described in the state).
        action_set: its :class:`~ww_callbacks.actions.ActionSet` (state saved when enabled).
        executor: its :class:`~ww_callbacks.executor.AnalysisExecutor` (is one in flight?).
        output_dir: the named output folder, else ``None``.
        per_run: whether the folder is chosen per run (no ``output_dir`` named).
        log: one line to the user (rank 0).
        guard: the error policy's ``guard(what, fn, *args)``.
        parts: further parts with ``state_dict()``/``load_state_dict(state)``, by key.
    """

    def __init__(self, history: Any, schedule: Any, action_set: Any, executor: Any,
                 output_dir: Optional[str], per_run: bool, log: Callable[[str], Any],
                 guard: Callable[..., Any], parts: Optional[Dict[str, Any]] = None) -> None:
        self.history, self.schedule, self.action_set, self.executor = history, schedule, action_set, executor
        #: Further parts saved under their key (``state_dict``/``load_state_dict``): the rotation...
        self.parts: Dict[str, Any] = dict(parts or {})
        self.output_dir, self.per_run = output_dir, per_run
        self.log, self.guard = log, guard
        self.last_step: Optional[int] = None     # last step analysed (or attempted)
        self.num_analyses = 0
        self.is_global_zero = True
        self.configured = False
        self.finished = False
        #: ``(step, epoch)`` of the latest analysis started (recorded or not).
        self.started: Optional[Tuple[int, int]] = None
        #: Whether a state was loaded (the framework's checkpoint or the state file).
        self.restored = False
        #: ``(step, epoch)`` of an analysis due at the resume step and lost in a crash.
        self.redo: Optional[Tuple[int, int]] = None
        self._saved: List[Dict[str, Any]] = []   # what the state file holds

    @property
    def state_path(self) -> Optional[str]:
        """The run folder's :data:`STATE_FILE` (``None`` without a folder)."""
        return os.path.join(self.output_dir, STATE_FILE) if self.output_dir else None

    def write(self) -> None:
        """Add the current state to the run folder's state file, atomically (rank 0); it keeps
        the last :data:`KEEP_STATES`, one per step, so a resume from an older checkpoint finds
        the state of its step.

        Raises:
            OSError: the file cannot be written.
        """
        path = self.state_path
        if path is None or not self.is_global_zero:
            return
        state = self.state_dict()
        step = _state_step(state)
        self._saved = [s for s in self._saved if _state_step(s) < step][-(KEEP_STATES - 1):] + [state]
        write_json(path, {"version": STATE_VERSION, "states": self._saved})

    def read(self, current_step: int) -> Optional[Dict[str, Any]]:
        """The state file's newest state at or before ``current_step`` (the file keeps only
        those from now on), else ``None``.

        Raises:
            OSError: the file exists but cannot be read.
            ValueError: it is not a state file.
        """
        path = self.state_path
        if path is None or not os.path.exists(path):
            return None
        data = read_json(path)
        states = data.get("states", [data]) if isinstance(data, dict) else None  # [data]: one state
        if not isinstance(states, list) or not all(isinstance(s, dict) for s in states):
            raise ValueError(f"{path} does not hold a ww_callbacks state")
        self._saved = [s for s in states if _state_step(s) <= current_step]
        return self._saved[-1] if self._saved else None

    def resume(self, current_step: int, reapply: Callable[[], Any] = lambda: None) -> None:
        """Align the run with a trainer at ``current_step``: above 0, take the state file's
        state of that step when no state was loaded (then ``reapply()`` the actions), drop
        later rows, recover earlier ones the checkpoint missed, and note an analysis due at
        ``current_step`` that a crash lost (:attr:`redo`)."""
        if current_step > 0:
            saved = self.guard("reading the state file", self.read, current_step)
            if saved and not self.restored:
                self.load_state_dict(saved)
                reapply()
        dropped = self.history.truncate(current_step)
        recovered = (self.guard("reading the history file", self.history.recover, current_step) or 0) \
            if current_step > 0 and self.is_global_zero else 0
        steps = [s for s in (self.last_step, self.history.last_step) if s is not None]
        self.last_step = min(max(steps), current_step) if steps else None
        self.redo = None
        if self.started is not None and self.started[0] == current_step > 0 \
                and current_step not in set(self.history.steps):
            self.redo = self.started
            self.last_step = self.history.last_step
        if dropped or recovered:
            self.log(f"ww: resumed at step {current_step}: dropped {dropped} history rows recorded "
                     f"after it, recovered {recovered} rows from {self.history.jsonl_path}")

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state for checkpoints: a pointer into the history files, the last
        analysed step and the action state; a few KB whatever the number of analyses (the rows
        themselves only when the history is kept in memory, ``output_dir=MEMORY_ONLY``, or for those a
        full or read-only disk kept out of ``history.jsonl``).

        Never waits for a background analysis: one in flight is not part of this state (its
        step counts as not analysed); its rows reach ``history.jsonl`` when it finishes, and a
        resume from this checkpoint takes them back from there.
        """
        last = self.history.last_step if self.executor.busy else self.last_step
        state = {"version": STATE_VERSION, "last_step": last, "num_analyses": self.num_analyses,
                 "started": list(self.started) if self.started is not None else None,
                 "schedule": self.schedule.describe(), "history": self.history.state_dict()}
        if self.action_set.enabled:
            state["actions"] = self.action_set.state_dict()
        for key, part in self.parts.items():
            state[key] = part.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the files are rewritten at the next ``configure``/write.

        Raises:
            ValueError: the state was written by a newer version.
        """
        if not state:
            return
        if state.get("version", STATE_VERSION) > STATE_VERSION:
            raise ValueError(f"state version {state.get('version')} is newer than this "
                             f"ww_callbacks understands ({STATE_VERSION})")
        missing = self.history.load_state_dict(state.get("history", {}))
        if self.output_dir is not None and not self.per_run:
            self.history.output_dir = self.output_dir       # a named folder wins over the pointer
        elif self.history.output_dir is not None:
            self.output_dir = self.history.output_dir
        if missing:
            self.log(f"ww: {missing} history rows named by the restored state are missing from "
                     f"{self.history.jsonl_path}; the record continues from the rows found")
        last = state.get("last_step")
        self.last_step = int(last) if last is not None else self.history.last_step
        self.num_analyses = int(state.get("num_analyses", len(self.history.steps)))
        started = state.get("started")
        self.started = (int(started[0]), int(started[1])) if started else None
        self.action_set.load_state_dict(state.get("actions"))
        for key, part in self.parts.items():
            part.load_state_dict(state.get(key))
        self.restored = True
        self.finished = False
        if self.configured and self.is_global_zero:
            self.guard("writing the history files", self.history.sync)

    def save_state(self, path: str, **extra: Any) -> None:
        """Write :meth:`state_dict` (plus the adapter's ``extra`` keys) to ``path`` atomically.

        Raises:
            OSError: the file cannot be written.
        """
        write_json(path, {**self.state_dict(), "adapter": extra})

    def load_state(self, path: str) -> Optional[Dict[str, Any]]:
        """Restore a :meth:`save_state` file; returns its ``extra`` keys, ``None`` if it is missing.

        Raises:
            OSError: the file exists but cannot be read.
            ValueError: it is not a valid state file.
        """
        if not os.path.exists(path):
            return None
        state = read_json(path)
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a ww_callbacks state")
        self.load_state_dict(state)
        return dict(state.get("adapter") or {})
