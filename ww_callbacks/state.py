"""The controller's checkpoint state: what a resumed run needs to continue the same record.

The history is not in it: ``history.jsonl`` in the run folder is the record, and the state
points into it (folder, last step, row count); a resume reads the rows back from there. Only rows
that could not be written to it (a full or read-only disk) travel in the state, until a write
succeeds (:meth:`ww_callbacks.history.History.state_dict`).

Kept in a mixin of :class:`~ww_callbacks.controller.WeightWatcherController` so that the
controller module holds the run logic and this one the persistence.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from ww_callbacks.atomic import read_json, write_json

__all__ = ["ControllerState", "STATE_VERSION"]

#: Version of :meth:`ControllerState.state_dict`; a newer one is refused.
STATE_VERSION = 1


class ControllerState:
    """``state_dict`` / ``load_state_dict`` and their file forms, for the controller."""

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state for checkpoints: a pointer into the history files, the last
        analysed step and the action state; a few KB whatever the number of analyses (the rows
        themselves only when the history is kept in memory, ``output_dir=None``, or for those a
        full or read-only disk kept out of ``history.jsonl``).

        Never waits for a background analysis: one in flight is not part of this state (its
        step counts as not analysed); its rows reach ``history.jsonl`` when it finishes, and a
        resume from this checkpoint takes them back from there.
        """
        last = self.history.last_step if self.executor.busy else self.last_step
        state = {"version": STATE_VERSION, "last_step": last, "num_analyses": self.num_analyses,
                 "schedule": self.schedule.describe(), "history": self.history.state_dict()}
        if self.action_set.enabled:
            state["actions"] = self.action_set.state_dict()
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
        if self.output_dir is not None and not self._per_run:
            self.history.output_dir = self.output_dir       # a named folder wins over the pointer
        elif self.history.output_dir is not None:
            self.output_dir = self.history.output_dir
        if missing:
            self.log(f"ww: {missing} history rows named by the restored state are missing from "
                     f"{self.history.jsonl_path}; the record continues from the rows found")
        last = state.get("last_step")
        self.last_step = int(last) if last is not None else self.history.last_step
        self.num_analyses = int(state.get("num_analyses", len(self.history.steps)))
        self.action_set.load_state_dict(state.get("actions"))
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
