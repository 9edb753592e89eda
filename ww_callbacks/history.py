"""The analysis history: one row per analysed layer per analysis, on disk (in memory until written).

Each row holds every ``ww_core.COLUMNS`` field plus ``step`` (the trainer's global step),
``epoch`` (0-based) and ``time`` (Unix time of the analysis). Rows are appended to
``history.jsonl`` and ``history.csv`` in the output directory as soon as an analysis finishes.

On disk, non-finite floats are written as ``null`` (JSONL) and ``nan`` (CSV); :meth:`History.state_dict`
stores them as ``None`` (strict JSON) and :func:`read_jsonl` / :meth:`History.load_state_dict` read
them back as ``nan``.

Writes that fail (full disk, read-only or vanished folder, file-size limit):

* **Whole rows or nothing.** Appends go through :func:`ww_callbacks.atomic.append_bytes` (written,
  fsynced for ``history.jsonl``, and on any error truncated back to the size before), rewrites
  through an fsynced temp file renamed over the target: the files only ever hold whole lines.
  ``history.csv``, a copy for spreadsheets, is appended without fsync (one fsync per analysis,
  not two) and rewritten when its size is not the one this process left.
* **Kept and retried.** Unwritten rows stay in memory (at most ``max_pending_rows``; beyond it
  the oldest unwritten rows are dropped, counted in :attr:`History.dropped_rows` and warned
  about once). Every later write (the next analysis, :meth:`History.sync` at ``configure``)
  writes them first, oldest first, one append per analysis, as many as the disk takes, then
  the new ones.
* **Reported once.** The first failure warns once per :class:`History` (:class:`HistoryWarning`)
  and raises; the controller logs it once (``writing the history files``), training continues.
* **In checkpoints.** :meth:`History.state_dict` carries the unwritten rows (at most
  :data:`MAX_PENDING_STATE_ROWS`, oldest first): a run resumed once the disk takes writes again
  writes them, and continues with every row once.

Memory: once both files hold a row, it leaves memory. :attr:`History.rows` reads the written rows
back from ``history.jsonl`` when iterated; what the actions and the latest view need is kept in
a :class:`~ww_callbacks.history_view.RecentIndex` (:attr:`History.steps`, :meth:`History.latest`,
:meth:`History.series`, :meth:`History.mean_series`): one row per layer plus a short window,
whatever the number of analyses. A history with no output folder, or in a process that does not
write (ranks other than 0), keeps its rows in memory (the latter at most ``max_pending_rows``,
the newest).

Resume: :meth:`History.state_dict` carries a pointer into ``history.jsonl`` (plus the unwritten
rows); :meth:`History.load_state_dict` restores them, :meth:`History.truncate` drops rows after
the resumed step (written by a run that then crashed), :meth:`History.recover` takes back from
disk the rows analysed after the checkpoint was saved but at or before its step (same weights),
and the files are rewritten the first time this process writes (the rows a resume read back stay
in memory until then), so the curves continue with no gap and no duplicate step. An output
directory therefore belongs to one run: a fresh run (no state loaded) starts new files.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any, Dict, Iterable, List, Optional

from ww_callbacks.atomic import append_bytes, atomic_open
from ww_callbacks.history_files import HISTORY_KEYS, HistoryFiles, HistoryWarning, _from_json_value
from ww_callbacks.history_view import HistoryRows, RecentIndex

__all__ = ["History", "HistoryWarning", "HISTORY_KEYS", "MAX_PENDING_ROWS", "MAX_PENDING_STATE_ROWS",
           "read_jsonl"]

logger = logging.getLogger("ww_callbacks")


#: At most this many rows not yet on disk go into :meth:`History.state_dict` (about 1 KB each as
#: JSON); the oldest are kept, a resume reports any beyond as missing.
MAX_PENDING_STATE_ROWS = 10_000

#: Rows kept in memory while the files cannot take them (about 1 KB each); the oldest unwritten
#: rows beyond it are dropped (and counted) so that a full disk cannot exhaust memory.
MAX_PENDING_ROWS = 20_000

#: Decision lines kept for a retry when ``decisions.jsonl`` cannot be written (oldest dropped).
MAX_PENDING_DECISIONS = 1_000


def read_jsonl(path: str, skip_bad_lines: bool = False) -> List[Dict[str, Any]]:
    """Rows of a ``history.jsonl`` file (``null`` read back as ``nan``).

    A last line that is not a whole JSON object (cut short by a crash, or by a full disk with
    versions before whole-line appends) is skipped with a :class:`HistoryWarning`.

    Args:
        skip_bad_lines: skip unparseable lines anywhere in the file too (with one warning);
            without it such a line before the last raises.

    Raises:
        OSError: the file cannot be read.
        ValueError: a bad line before the last one (unless ``skip_bad_lines``).
    """
    rows, skipped, bad = [], [], None
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if bad is not None and not skip_bad_lines:    # a bad line with more after it
                raise bad
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"not a JSON object: {line[:40]!r}")
            except ValueError as exc:
                skipped.append(number)
                bad = ValueError(f"{path}, line {number}: {exc}")
                continue
            rows.append({k: _from_json_value(v) for k, v in row.items()})
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} line(s) cut short (line {skipped[0]}"
                      f"{', ...' if len(skipped) > 1 else ''}); the rows before are read",
                      HistoryWarning, stacklevel=2)
    return rows


class History(HistoryFiles):
    """Per-layer metrics of every analysis, oldest first.

    Args:
        output_dir: where ``history.jsonl`` and ``history.csv`` go; ``None`` keeps the history in
            memory only.
        write: whether this process writes the files (only global rank 0 should).
        recent_window: analyses per layer kept in memory for :meth:`series` (the actions' view).
        max_pending_rows: rows kept in memory while the files cannot be written (see the module
            docstring); ``None``: :data:`MAX_PENDING_ROWS`.

    Example:
        >>> h = History()                                   # memory only
        >>> h.append([{"step": 1, "name": "fc", "alpha": 3.0}])
        >>> h.append([{"step": 2, "name": "fc", "alpha": 2.9}])
        >>> h.steps, h.series("alpha"), h.latest()["fc"]["step"]
        ([1, 2], {'fc': [3.0, 2.9]}, 2)
    """

    JSONL = "history.jsonl"
    CSV = "history.csv"
    #: Every action decision (freeze, LR factors, stop), one JSON object a line.
    DECISIONS = "decisions.jsonl"

    def __init__(self, output_dir: Optional[str] = None, write: bool = True, recent_window: int = 32,
                 max_pending_rows: Optional[int] = None) -> None:
        self.output_dir = os.fspath(output_dir) if output_dir is not None else None
        self.write = write
        self.index = RecentIndex(recent_window)
        self.max_pending_rows = MAX_PENDING_ROWS if max_pending_rows is None else int(max_pending_rows)
        if self.max_pending_rows < 1:
            raise ValueError(f"max_pending_rows must be >= 1, got {max_pending_rows!r}")
        # rows [0, _base) are only on disk (the first _base lines of history.jsonl); _mem holds
        # rows _base onwards
        self._mem: List[Dict[str, Any]] = []
        self._base = 0
        self._base_last_step: Optional[int] = None
        #: Unwritten rows dropped because more than ``max_pending_rows`` waited for the disk.
        self.dropped_rows = 0
        self._warned_drop = False
        self._fieldnames: Optional[List[str]] = None   # the header of history.csv on disk
        # per file: rewrite it from memory before appending (once per process, after a resume)
        self._stale = {self.JSONL: True, self.CSV: True}
        # per file: how many leading rows of self.rows it holds, and its size after our last write
        self._on_disk = {self.JSONL: 0, self.CSV: 0}
        self._size: Dict[str, int] = {}
        self._pending_decisions: List[bytes] = []
        self._warned = False
        self._failing = False

    # ------------------------------------------------------------------ paths and queries
    @property
    def jsonl_path(self) -> Optional[str]:
        return os.path.join(self.output_dir, self.JSONL) if self.output_dir else None

    @property
    def csv_path(self) -> Optional[str]:
        return os.path.join(self.output_dir, self.CSV) if self.output_dir else None

    @property
    def rows(self) -> HistoryRows:
        """Every row, oldest first: a list-like view (``len`` is free; iterating reads the rows
        already written back from ``history.jsonl``). Assigning a list replaces the rows."""
        return HistoryRows(self._iter_disk, self._mem, self._base)

    @rows.setter
    def rows(self, rows: Iterable[Dict[str, Any]]) -> None:
        self._set_rows([dict(r) for r in rows])

    @property
    def rows_in_memory(self) -> int:
        """How many rows this history holds in memory (the unwritten ones, once files are written)."""
        return len(self._mem)

    @property
    def steps(self) -> List[int]:
        """The analysed steps that produced rows, ascending, without repeats."""
        return list(self.index.steps)

    @property
    def last_step(self) -> Optional[int]:
        return self.index.steps[-1] if self.index.steps else None

    def __len__(self) -> int:
        return self._base + len(self._mem)

    def latest(self) -> Dict[str, Dict[str, Any]]:
        """Each layer's most recent row (first-seen order); with layer rotation a layer missing
        from the last analyses keeps its last row, whose ``step`` says when it was measured."""
        return dict(self.index.latest)

    def series(self, metric: str = "alpha") -> Dict[str, List[float]]:
        """Per layer, the last ``recent_window`` values of ``metric`` (nan: no fit), oldest first:
        ``series_from_rows(rows)`` limited to the window, at no cost per analysis."""
        return self.index.series(metric)

    def mean_series(self, metric: str = "alpha") -> List[float]:
        """The mean of the finite ``metric`` values per analysed step: ``mean_series_from_rows(rows)``
        kept as the analyses come (one float per analysis)."""
        return self.index.mean_series(metric)

    def rows_at(self, step: int) -> List[Dict[str, Any]]:
        disk = ([r for r in self._iter_disk() if r["step"] == step]
                if self._base and step <= (self._base_last_step if self._base_last_step is not None else step)
                else [])
        return disk + [r for r in self._mem if r["step"] == step]

    def to_dataframe(self):
        """The rows as a pandas DataFrame (needs pandas)."""
        import pandas as pd

        rows = list(self.rows)
        return pd.DataFrame(rows, columns=self._columns(rows) if rows else None)

    # ------------------------------------------------------------------ mutation
    def append(self, rows: Iterable[Dict[str, Any]]) -> None:
        """Add the rows of one analysis and write them, after any earlier unwritten ones.

        Raises:
            OSError: a file could not be written; the rows stay in memory for the next write.
        """
        new = [dict(r) for r in rows]
        self._mem.extend(new)
        self.index.add(new)
        if not self._can_write():
            self._bound_memory()
            return
        try:
            self._flush()
        finally:
            self._bound_memory()

    def append_decision(self, step: int, kind: str, payload: Dict[str, Any]) -> None:
        """Append an action's decision to ``decisions.jsonl`` (when this process writes), whole or
        not at all; lines that could not be written are retried with the next decision (at most
        :data:`MAX_PENDING_DECISIONS`).

        Raises:
            OSError: the file could not be written.
        """
        if not self._can_write():
            return
        line = json.dumps({"step": int(step), "kind": kind, "payload": payload}, default=str) + "\n"
        self._pending_decisions = self._pending_decisions[-(MAX_PENDING_DECISIONS - 1):]
        self._pending_decisions.append(line.encode("utf-8"))
        os.makedirs(self.output_dir, exist_ok=True)
        append_bytes(os.path.join(self.output_dir, self.DECISIONS), b"".join(self._pending_decisions))
        self._pending_decisions = []

    def _truncate_decisions(self, after_step: int) -> None:
        path = os.path.join(self.output_dir, self.DECISIONS) if self._can_write() else None
        if path is None or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as fh:
            lines = [ln for ln in fh if ln.strip()]
        kept = []
        for ln in lines:
            try:
                if int(json.loads(ln)["step"]) <= after_step:
                    kept.append(ln if ln.endswith("\n") else ln + "\n")
            except (ValueError, KeyError, TypeError):
                continue                      # a line cut short by a crash
        if len(kept) != len(lines):
            try:
                with atomic_open(path, fsync=True) as fh:
                    fh.writelines(kept)
            except OSError as exc:            # a resume must not fail on a full or read-only disk
                warnings.warn(f"{path}: decisions after step {after_step} could not be removed "
                              f"({type(exc).__name__}: {exc})", HistoryWarning, stacklevel=3)

    def truncate(self, after_step: int) -> int:
        """Drop rows (and decisions) with ``step > after_step``; returns how many rows were dropped."""
        self._truncate_decisions(after_step)
        self._pending_decisions = [d for d in self._pending_decisions if json.loads(d)["step"] <= after_step]
        if self.last_step is None or self.last_step <= after_step:
            return 0                                  # nothing to drop: no need to read the rows
        self._materialise()
        before = len(self._mem)
        on_disk = {id(r) for r in self._mem[:self._on_disk[self.JSONL]]}
        self._mem = [r for r in self._mem if r["step"] <= after_step]
        self.index.rebuild(self._mem)
        dropped = before - len(self._mem)
        if dropped:
            self._mark_stale(known=next((i for i, r in enumerate(self._mem) if id(r) not in on_disk),
                                        len(self._mem)))
        return dropped

    def recover(self, up_to_step: int) -> int:
        """Add rows from ``history.jsonl`` on disk with ``last_step < step <= up_to_step``.

        Used on resume: an analysis at the checkpoint's own step may have run after the
        checkpoint was saved (Lightning saves at validation end, before the epoch-end hook), so
        its rows are on disk but not in the checkpoint; they belong to the same weights. Returns
        how many rows were added.
        """
        path = self.jsonl_path
        if path is None or not os.path.exists(path):
            return 0
        last = self.last_step if len(self) else -1
        try:
            found = [r for r in read_jsonl(path, skip_bad_lines=True)
                     if isinstance(r.get("step"), int) and last < r["step"] <= up_to_step]
        except OSError:
            return 0
        if found:
            found.sort(key=lambda r: r["step"])
            self._mem.extend(found)
            self.index.add(found)
            self._mark_stale(known=self._on_disk[self.JSONL])
        return len(found)

    def sync(self) -> None:
        """Make the files hold every in-memory row: rewrite them the first time this process
        writes (or after a resume), else append the rows not written yet.

        Raises:
            OSError: a file could not be written (the rows stay in memory).
        """
        if self._can_write():
            self._flush()

    def rewrite(self) -> None:
        """Rewrite both files from the in-memory rows (atomically: fsynced temp file, then rename).

        Raises:
            OSError: a file could not be written (the old file is left as it was).
        """
        if self._can_write():
            self._mark_stale(known=self._on_disk[self.JSONL])
            self._flush()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state: a pointer into ``history.jsonl`` (a few hundred bytes), plus
        under ``pending`` the rows not in that file yet (a write failed; at most
        :data:`MAX_PENDING_STATE_ROWS`, the oldest first).

        With no output folder (memory only) the rows themselves: column names plus one value
        list per row (non-finite -> None).
        """
        if self.output_dir is None:
            return self._encode_rows(self._mem)
        state = {"version": 2, "output_dir": os.path.abspath(self.output_dir), "file": self.JSONL,
                 "last_step": self.last_step, "num_rows": len(self)}
        if self._can_write() and len(self) > self._on_disk[self.JSONL]:
            state["pending"] = self._encode_rows(
                self._mem[self._on_disk[self.JSONL] - self._base:][:MAX_PENDING_STATE_ROWS])
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> int:
        """Restore :meth:`state_dict`: the rows themselves, or those up to the pointer's step read
        back from its file plus the state's ``pending`` rows of steps the file lacks
        (``output_dir`` is set to the pointer's folder when that exists).

        Returns:
            How many rows the state named that could not be found (0 when all were).
        """
        if "rows" in state or "output_dir" not in state:
            self._set_rows(self._decode_rows(state))
            self._mark_stale(known=0)
            return 0
        folder = state["output_dir"]
        if os.path.isdir(folder) or self.output_dir is None:
            self.output_dir = folder
        last = state.get("last_step")

        def wanted(row: Dict[str, Any]) -> bool:
            return isinstance(row.get("step"), int) and (last is None or row["step"] <= last)

        path = self.jsonl_path
        on_file = [r for r in (read_jsonl(path, skip_bad_lines=True)
                               if path and os.path.exists(path) else []) if wanted(r)]
        file_steps = {r["step"] for r in on_file}
        kept = [r for r in self._decode_rows(state.get("pending") or {})
                if wanted(r) and r["step"] not in file_steps]
        merged = sorted([(r["step"], 0, i, r) for i, r in enumerate(on_file)]
                        + [(r["step"], 1, i, r) for i, r in enumerate(kept)], key=lambda t: t[:3])
        self._set_rows([t[3] for t in merged])
        self._mark_stale(known=next((i for i, t in enumerate(merged) if t[1]), len(merged)))
        return max(int(state.get("num_rows", 0)) - len(self), 0)
