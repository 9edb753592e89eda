"""The analysis history: one row per analysed layer per analysis, kept in memory and on disk.

Each row holds every ``ww_core.COLUMNS`` field plus ``step`` (the trainer's global step),
``epoch`` (0-based) and ``time`` (Unix time of the analysis). Rows are appended to
``history.jsonl`` and ``history.csv`` in the output directory as soon as an analysis finishes.

On disk, non-finite floats are written as ``null`` (JSONL) and ``nan`` (CSV); :meth:`History.state_dict`
stores them as ``None`` (strict JSON) and :func:`read_jsonl` / :meth:`History.load_state_dict` read
them back as ``nan``.

Writes that fail (full disk, read-only or vanished folder, file-size limit):

* **Whole rows or nothing.** Appends go through :func:`ww_callbacks.atomic.append_bytes` (written,
  fsynced, and on any error truncated back to the size before), rewrites through an fsynced temp
  file renamed over the target: the files only ever hold whole lines.
* **Kept and retried.** Unwritten rows are the tail of :attr:`History.rows`, which holds every row
  anyway (no copy, no memory beyond the history itself). Every later write (the next analysis,
  :meth:`History.sync` at ``configure``) writes them first, oldest first, one append per
  analysis, as many as the disk takes, then the new ones.
* **Reported once.** The first failure warns once per :class:`History` (:class:`HistoryWarning`)
  and raises; the controller logs it once (``writing the history files``), training continues.
* **In checkpoints.** :meth:`History.state_dict` carries the unwritten rows (at most
  :data:`MAX_PENDING_STATE_ROWS`, oldest first): a run resumed once the disk takes writes again
  writes them, and continues with every row once.

Resume: :meth:`History.state_dict` carries a pointer into ``history.jsonl`` (plus the unwritten
rows); :meth:`History.load_state_dict` restores them, :meth:`History.truncate` drops rows after
the resumed step (written by a run that then crashed), :meth:`History.recover` takes back from
disk the rows analysed after the checkpoint was saved but at or before its step (same weights),
and the files are rewritten from memory the first time this process writes, so the curves
continue with no gap and no duplicate step. An output directory therefore belongs to one run: a
fresh run (no state loaded) starts new files.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence

from ww_callbacks.atomic import append_bytes, atomic_open
from ww_callbacks.values import plain_value
from ww_callbacks.warnings import WeightWatcherWarning

__all__ = ["History", "HistoryWarning", "HISTORY_KEYS", "MAX_PENDING_STATE_ROWS", "read_jsonl"]

logger = logging.getLogger("ww_callbacks")

#: Keys the history adds in front of the engine's columns.
HISTORY_KEYS = ("step", "epoch", "time")

#: At most this many rows not yet on disk go into :meth:`History.state_dict` (about 1 KB each as
#: JSON); the oldest are kept, a resume reports any beyond as missing.
MAX_PENDING_STATE_ROWS = 10_000

#: Decision lines kept for a retry when ``decisions.jsonl`` cannot be written (oldest dropped).
MAX_PENDING_DECISIONS = 1_000


class HistoryWarning(WeightWatcherWarning, RuntimeWarning):
    """The history files could not be written (rows kept in memory), or a history file holds a
    line cut short that was skipped when reading it. Filter with
    ``warnings.filterwarnings("ignore", category=HistoryWarning)`` (or with
    :class:`~ww_callbacks.warnings.WeightWatcherWarning`, its base, with every other warning of
    ``ww_callbacks``); still a ``RuntimeWarning``."""


def _engine_columns() -> Sequence[str]:
    try:
        from ww_core import COLUMNS
    except Exception:  # pragma: no cover - ww_core is part of this project
        return ()
    return COLUMNS


def _from_json_value(value: Any) -> Any:
    return math.nan if value is None else value


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


class History:
    """Per-layer metrics of every analysis, oldest first.

    Args:
        output_dir: where ``history.jsonl`` and ``history.csv`` go; ``None`` keeps the history in
            memory only.
        write: whether this process writes the files (only global rank 0 should).
    """

    JSONL = "history.jsonl"
    CSV = "history.csv"
    #: Every action decision (freeze, LR factors, stop), one JSON object a line.
    DECISIONS = "decisions.jsonl"

    def __init__(self, output_dir: Optional[str] = None, write: bool = True) -> None:
        self.output_dir = os.fspath(output_dir) if output_dir is not None else None
        self.write = write
        self.rows: List[Dict[str, Any]] = []
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
    def steps(self) -> List[int]:
        """The analysed steps that produced rows, ascending, without repeats."""
        return sorted({int(r["step"]) for r in self.rows})

    @property
    def last_step(self) -> Optional[int]:
        return max((int(r["step"]) for r in self.rows), default=None)

    def __len__(self) -> int:
        return len(self.rows)

    def rows_at(self, step: int) -> List[Dict[str, Any]]:
        return [r for r in self.rows if r["step"] == step]

    def to_dataframe(self):
        """The rows as a pandas DataFrame (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self._columns(self.rows) if self.rows else None)

    # ------------------------------------------------------------------ mutation
    def append(self, rows: Iterable[Dict[str, Any]]) -> None:
        """Add the rows of one analysis and write them, after any earlier unwritten ones.

        Raises:
            OSError: a file could not be written; the rows stay in memory for the next write.
        """
        self.rows.extend(dict(r) for r in rows)
        if self._can_write():
            self._flush()

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
        before = len(self.rows)
        on_disk = {id(r) for r in self.rows[:self._on_disk[self.JSONL]]}
        self.rows = [r for r in self.rows if r["step"] <= after_step]
        dropped = before - len(self.rows)
        if dropped:
            self._mark_stale(known=next((i for i, r in enumerate(self.rows) if id(r) not in on_disk),
                                        len(self.rows)))
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
        last = self.last_step if self.rows else -1
        try:
            found = [r for r in read_jsonl(path, skip_bad_lines=True)
                     if isinstance(r.get("step"), int) and last < r["step"] <= up_to_step]
        except OSError:
            return 0
        if found:
            self.rows.extend(sorted(found, key=lambda r: r["step"]))
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
            return self._encode_rows(self.rows)
        state = {"version": 2, "output_dir": os.path.abspath(self.output_dir), "file": self.JSONL,
                 "last_step": self.last_step, "num_rows": len(self.rows)}
        if self._can_write() and len(self.rows) > self._on_disk[self.JSONL]:
            state["pending"] = self._encode_rows(
                self.rows[self._on_disk[self.JSONL]:][:MAX_PENDING_STATE_ROWS])
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> int:
        """Restore :meth:`state_dict`: the rows themselves, or those up to the pointer's step read
        back from its file plus the state's ``pending`` rows of steps the file lacks
        (``output_dir`` is set to the pointer's folder when that exists).

        Returns:
            How many rows the state named that could not be found (0 when all were).
        """
        if "rows" in state or "output_dir" not in state:
            self.rows = self._decode_rows(state)
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
        self.rows = [t[3] for t in merged]
        self._mark_stale(known=next((i for i, t in enumerate(merged) if t[1]), len(merged)))
        return max(int(state.get("num_rows", 0)) - len(self.rows), 0)

    # ------------------------------------------------------------------ internals
    def _can_write(self) -> bool:
        return self.write and self.output_dir is not None

    def _mark_stale(self, known: int) -> None:
        """The files must be rewritten from memory; the first ``known`` rows are in the JSONL."""
        self._stale = {self.JSONL: True, self.CSV: True}
        self._on_disk = {self.JSONL: known, self.CSV: 0}

    def _columns(self, rows: Sequence[Dict[str, Any]]) -> List[str]:
        cols = list(HISTORY_KEYS) + [c for c in _engine_columns() if c not in HISTORY_KEYS]
        seen = set(cols)
        for row in rows:
            for key in row:
                if key not in seen:
                    seen.add(key)
                    cols.append(key)
        return cols

    def _encode_rows(self, rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        columns = self._columns(rows)
        return {"version": 1, "columns": columns,
                "rows": [[plain_value(r.get(c, None)) for c in columns] for r in rows]}

    @staticmethod
    def _decode_rows(state: Dict[str, Any]) -> List[Dict[str, Any]]:
        columns = list(state.get("columns", ()))
        return [{c: _from_json_value(v) for c, v in zip(columns, values)}
                for values in state.get("rows", ())]

    @staticmethod
    def _json_line(row: Dict[str, Any]) -> str:
        return json.dumps({k: plain_value(v) for k, v in row.items()}, allow_nan=False,
                          default=str) + "\n"

    @staticmethod
    def _csv_row(row: Dict[str, Any]) -> Dict[str, Any]:
        return {k: (",".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in row.items()}

    def _csv_text(self, rows: Sequence[Dict[str, Any]], fieldnames: List[str], header: bool) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore")
        if header:
            writer.writeheader()
        writer.writerows(self._csv_row(r) for r in rows)
        return buf.getvalue()

    def _flush(self) -> None:
        """Bring both files up to :attr:`rows`; warn once and raise the first error on failure."""
        errors = []
        for name in (self.JSONL, self.CSV):
            try:
                self._flush_file(name)
            except OSError as exc:
                errors.append((name, exc))
        if not errors:
            if self._failing:
                self._failing = False
                logger.info("ww: the history files in %s are written again; no row is missing",
                            self.output_dir)
            return
        self._failing = True
        name, exc = errors[0]
        kept = (f"{len(self.rows) - self._on_disk[name]} rows not in {name} yet, kept in memory and "
                f"checkpoints until the folder takes them")
        if not self._warned:
            self._warned = True
            warnings.warn(f"ww_callbacks: the history files in {self.output_dir} could not be written "
                          f"({type(exc).__name__}: {exc}); {kept} (not warned again)",
                          HistoryWarning, stacklevel=3)
        if exc.errno is None:
            raise exc
        path = exc.filename or os.path.join(self.output_dir, name)
        raise OSError(exc.errno, f"{exc.strerror} ({kept})", path) from exc

    def _flush_file(self, name: str) -> None:
        path = os.path.join(self.output_dir, name)
        if not self._stale[name]:
            if self._on_disk[name] == len(self.rows):
                return
            try:
                size = os.path.getsize(path)
            except OSError:
                size = -1
            if size != self._size.get(name):    # a tail left by a failed rollback, or not ours
                self._stale[name] = True
        if self._stale[name]:
            self._rewrite_file(name)
            return
        rows = self.rows[self._on_disk[name]:]
        if name == self.CSV and any(k not in self._fieldnames for r in rows for k in r):
            self._rewrite_file(name)             # a new column: a new header
            return
        # one append per analysis, oldest first: as many whole analyses as the disk takes
        for _, group in itertools.groupby(rows, key=lambda r: r["step"]):
            group = list(group)
            data = ("".join(self._json_line(r) for r in group) if name == self.JSONL
                    else self._csv_text(group, self._fieldnames, header=False))
            self._size[name] = append_bytes(path, data.encode("utf-8"))
            self._on_disk[name] += len(group)

    def _rewrite_file(self, name: str) -> None:
        path = os.path.join(self.output_dir, name)
        fieldnames = self._columns(self.rows)
        data = ("".join(self._json_line(r) for r in self.rows) if name == self.JSONL
                else self._csv_text(self.rows, fieldnames, header=True)).encode("utf-8")
        with atomic_open(path, "wb", fsync=True) as fh:
            fh.write(data)
        if name == self.CSV:
            self._fieldnames = fieldnames
        self._size[name] = len(data)
        self._stale[name] = False
        self._on_disk[name] = len(self.rows)
