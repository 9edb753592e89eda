"""The analysis history: one row per analysed layer per analysis, kept in memory and on disk.

Each row holds every ``ww_core.result.COLUMNS`` field plus ``step`` (the trainer's global step),
``epoch`` (0-based) and ``time`` (Unix time of the analysis). Rows are appended to
``history.jsonl`` and ``history.csv`` in the output directory as soon as an analysis finishes
(flushed and fsynced, so nothing is lost if training or the machine crashes).

On disk, non-finite floats are written as ``null`` (JSONL) and ``nan`` (CSV); :meth:`History.state_dict`
stores them as ``None`` (strict JSON) and :func:`read_jsonl` / :meth:`History.load_state_dict` read
them back as ``nan``.

Resume: :meth:`History.state_dict` carries the rows (checkpoints store it);
:meth:`History.load_state_dict` restores them, :meth:`History.truncate` drops rows after the
resumed step (written after the last checkpoint by a run that then crashed),
:meth:`History.recover` takes back from disk the rows analysed after the checkpoint was saved but
at or before its step (same weights), and the files are
rewritten from the in-memory rows the first time this process writes, so the curves continue with
no gap and no duplicate step. An output directory therefore belongs to one run: a fresh run (no
state loaded) starts new files.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

from ww_callbacks.atomic import atomic_open
from ww_callbacks.values import plain_value

__all__ = ["History", "HISTORY_KEYS", "read_jsonl"]

#: Keys the history adds in front of the engine's columns.
HISTORY_KEYS = ("step", "epoch", "time")


def _engine_columns() -> Sequence[str]:
    try:
        from ww_core.result import COLUMNS
    except Exception:  # pragma: no cover - ww_core is part of this project
        return ()
    return COLUMNS


def _from_json_value(value: Any) -> Any:
    return math.nan if value is None else value


def read_jsonl(path: str, skip_bad_lines: bool = False) -> List[Dict[str, Any]]:
    """Rows of a ``history.jsonl`` file (``null`` read back as ``nan``).

    ``skip_bad_lines`` ignores unparseable lines (a line cut short by a crash).
    """
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                if skip_bad_lines:
                    continue
                raise
            rows.append({k: _from_json_value(v) for k, v in row.items()})
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
        self._fieldnames: Optional[List[str]] = None
        self._synced = False  # files on disk match self.rows (rewritten once per process)

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
        """Add the rows of one analysis and append them to the files (when writing)."""
        rows = [dict(r) for r in rows]
        self.rows.extend(rows)
        if not self._can_write():
            return
        if not self._synced:
            self.rewrite()
            return
        self._append_files(rows)

    def append_decision(self, step: int, kind: str, payload: Dict[str, Any]) -> None:
        """Append an action's decision to ``decisions.jsonl`` (when this process writes)."""
        if not self._can_write():
            return
        os.makedirs(self.output_dir, exist_ok=True)
        line = json.dumps({"step": int(step), "kind": kind, "payload": payload}, default=str)
        with open(os.path.join(self.output_dir, self.DECISIONS), "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

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
                    kept.append(ln)
            except (ValueError, KeyError, TypeError):
                continue                      # a line cut short by a crash
        if len(kept) != len(lines):
            with atomic_open(path) as fh:
                fh.writelines(kept)

    def truncate(self, after_step: int) -> int:
        """Drop rows (and decisions) with ``step > after_step``; returns how many rows were dropped."""
        self._truncate_decisions(after_step)
        before = len(self.rows)
        self.rows = [r for r in self.rows if r["step"] <= after_step]
        dropped = before - len(self.rows)
        if dropped:
            self._synced = False
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
            self._synced = False
        return len(found)

    def sync(self) -> None:
        """Make the files match the in-memory rows (rewrites them once per process)."""
        if self._can_write() and not self._synced:
            self.rewrite()

    def rewrite(self) -> None:
        """Rewrite both files from the in-memory rows (atomically: temp file then rename)."""
        if not self._can_write():
            return
        self._fieldnames = self._columns(self.rows)
        with atomic_open(self.jsonl_path) as fh:
            for row in self.rows:
                fh.write(self._json_line(row))
        with atomic_open(self.csv_path, newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._fieldnames, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self._csv_row(r) for r in self.rows)
        self._synced = True

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state of a few hundred bytes: a pointer into ``history.jsonl``.

        With no output folder (memory only) the rows themselves: column names plus one value
        list per row (non-finite -> None).
        """
        if self.output_dir is not None:
            return {"version": 2, "output_dir": os.path.abspath(self.output_dir), "file": self.JSONL,
                    "last_step": self.last_step, "num_rows": len(self.rows)}
        columns = self._columns(self.rows)
        return {"version": 1, "columns": columns,
                "rows": [[plain_value(r.get(c, None)) for c in columns] for r in self.rows]}

    def load_state_dict(self, state: Dict[str, Any]) -> int:
        """Restore :meth:`state_dict`: the rows themselves, or those up to the pointer's step read
        back from its file (``output_dir`` is set to the pointer's folder when that exists).

        Returns:
            How many rows the state named that could not be found (0 when all were).
        """
        self._synced = False
        if "rows" in state or "output_dir" not in state:
            columns = list(state.get("columns", ()))
            self.rows = [{c: _from_json_value(v) for c, v in zip(columns, values)}
                         for values in state.get("rows", ())]
            return 0
        folder = state["output_dir"]
        if os.path.isdir(folder) or self.output_dir is None:
            self.output_dir = folder
        last = state.get("last_step")
        path = self.jsonl_path
        rows = read_jsonl(path, skip_bad_lines=True) if path and os.path.exists(path) else []
        self.rows = sorted((r for r in rows if isinstance(r.get("step"), int)
                            and (last is None or r["step"] <= last)), key=lambda r: r["step"])
        return max(int(state.get("num_rows", 0)) - len(self.rows), 0)

    # ------------------------------------------------------------------ internals
    def _can_write(self) -> bool:
        return self.write and self.output_dir is not None

    def _columns(self, rows: Sequence[Dict[str, Any]]) -> List[str]:
        cols = list(HISTORY_KEYS) + [c for c in _engine_columns() if c not in HISTORY_KEYS]
        seen = set(cols)
        for row in rows:
            for key in row:
                if key not in seen:
                    seen.add(key)
                    cols.append(key)
        return cols

    @staticmethod
    def _json_line(row: Dict[str, Any]) -> str:
        return json.dumps({k: plain_value(v) for k, v in row.items()}, allow_nan=False) + "\n"

    @staticmethod
    def _csv_row(row: Dict[str, Any]) -> Dict[str, Any]:
        return {k: (",".join(map(str, v)) if isinstance(v, tuple) else v) for k, v in row.items()}

    def _append_files(self, rows: List[Dict[str, Any]]) -> None:
        with open(self.jsonl_path, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(self._json_line(row))
            fh.flush()
            os.fsync(fh.fileno())       # on disk at the end of each analysis, not only in a cache
        new_keys = [k for r in rows for k in r if k not in self._fieldnames]
        if new_keys:  # a column appeared: the CSV header changes, rewrite it
            self.rewrite()
            return
        with open(self.csv_path, "a", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._fieldnames, extrasaction="ignore")
            writer.writerows(self._csv_row(r) for r in rows)
            fh.flush()
            os.fsync(fh.fileno())
