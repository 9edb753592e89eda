"""How :class:`ww_callbacks.history.History` writes its files: appends of whole analyses, streamed
rewrites, the rows leaving memory once both files hold them, and the bound on unwritten rows.
(See :mod:`ww_callbacks.history` for the guarantees.)"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import warnings
from typing import Any, Dict, Iterable, Iterator, List, Sequence

from ww_callbacks.atomic import append_bytes, atomic_open
from ww_callbacks.history_view import iter_jsonl
from ww_callbacks.values import plain_value
from ww_callbacks.warnings import WeightWatcherWarning

__all__ = ["HistoryFiles", "HistoryWarning", "HISTORY_KEYS"]

logger = logging.getLogger("ww_callbacks")

#: Keys the history adds in front of the engine's columns.
HISTORY_KEYS = ("step", "epoch", "time")

_ENCODER = json.JSONEncoder(allow_nan=False, default=str)


def _plain(value: Any) -> Any:
    """:func:`plain_value` with a fast path for the common cells (str, int, finite float)."""
    kind = type(value)
    if kind is str or kind is int:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    return plain_value(value)


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


class HistoryFiles:
    """The file half of :class:`~ww_callbacks.history.History` (which sets the attributes used)."""

    JSONL = "history.jsonl"
    CSV = "history.csv"

    def _can_write(self) -> bool:
        return self.write and self.output_dir is not None

    def _iter_disk(self) -> Iterator[Dict[str, Any]]:
        """The rows only on disk (the first ``_base`` lines of ``history.jsonl``), streamed."""
        if self._base and self.output_dir is not None:
            yield from iter_jsonl(os.path.join(self.output_dir, self.JSONL), self._base)

    def _iter_all(self) -> Iterator[Dict[str, Any]]:
        yield from self._iter_disk()
        yield from list(self._mem)

    def _set_rows(self, rows: List[Dict[str, Any]]) -> None:
        self._mem, self._base, self._base_last_step = rows, 0, None
        self.index.rebuild(rows)

    def _materialise(self) -> None:
        """Bring the rows only on disk back into memory (a resume that drops rows; once)."""
        if self._base:
            self._mem = list(self._iter_disk()) + self._mem
            self._base, self._base_last_step = 0, None

    def _bound_memory(self) -> None:
        """Drop the oldest rows beyond ``max_pending_rows`` that no file holds (reported once)."""
        if self.output_dir is None:
            return                                    # memory only: the rows are the record
        first = max(self._on_disk.values()) - self._base if self._can_write() else 0
        excess = len(self._mem) - first - self.max_pending_rows
        if excess <= 0:
            return
        del self._mem[first:first + excess]
        if not self._can_write():
            return                                    # a rank that does not write: newest kept
        self.dropped_rows += excess
        if not self._warned_drop:
            self._warned_drop = True
            warnings.warn(f"ww_callbacks: more than {self.max_pending_rows} rows wait for "
                          f"{self.output_dir}; the oldest unwritten rows are dropped (counted in "
                          f"History.dropped_rows; not warned again)", HistoryWarning, stacklevel=3)

    def _drop_written(self) -> None:
        """Rows both files hold leave memory (readable again through :attr:`rows`)."""
        if any(self._stale.values()):
            return
        done = min(self._on_disk.values()) - self._base
        if done > 0:
            self._base_last_step = int(self._mem[done - 1]["step"])
            del self._mem[:done]
            self._base += done

    def _mark_stale(self, known: int) -> None:
        """The files must be rewritten from memory; the first ``known`` rows are in the JSONL."""
        self._stale = {self.JSONL: True, self.CSV: True}
        self._on_disk = {self.JSONL: known, self.CSV: 0}

    def _columns(self, rows: Iterable[Dict[str, Any]]) -> List[str]:
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
        return _ENCODER.encode({k: _plain(v) for k, v in row.items()}) + "\n"

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
            self._drop_written()
            if self._failing:
                self._failing = False
                logger.info("ww: the history files in %s are written again; no row is missing",
                            self.output_dir)
            return
        self._failing = True
        name, exc = errors[0]
        kept = (f"{len(self) - self._on_disk[name]} rows not in {name} yet, kept in memory and "
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
            if self._on_disk[name] == len(self):
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
        rows = self._mem[self._on_disk[name] - self._base:]
        if name == self.CSV and any(k not in self._fieldnames for r in rows for k in r):
            self._rewrite_file(name)             # a new column: a new header
            return
        # one append per analysis, oldest first: as many whole analyses as the disk takes
        for _, group in itertools.groupby(rows, key=lambda r: r["step"]):
            group = list(group)
            data = ("".join(self._json_line(r) for r in group) if name == self.JSONL
                    else self._csv_text(group, self._fieldnames, header=False))
            # the JSONL is the record (fsynced); the CSV is its copy for spreadsheets (rewritten
            # from the JSONL when its size is not what this process left)
            self._size[name] = append_bytes(path, data.encode("utf-8"), fsync=name == self.JSONL)
            self._on_disk[name] += len(group)

    def _rewrite_file(self, name: str) -> None:
        """Rewrite ``name`` from every row, streamed (the rows only on disk are read back from
        ``history.jsonl`` while the new file is written beside it)."""
        path = os.path.join(self.output_dir, name)
        fieldnames = self._columns(self._iter_all())
        size, header = 0, True
        with atomic_open(path, "wb", fsync=True) as fh:
            rows = self._iter_all()
            while True:
                chunk = list(itertools.islice(rows, 2000))
                if not chunk and not header:
                    break
                data = ("".join(self._json_line(r) for r in chunk) if name == self.JSONL
                        else self._csv_text(chunk, fieldnames, header=header)).encode("utf-8")
                header = False
                fh.write(data)
                size += len(data)
                if not chunk:
                    break
        if name == self.CSV:
            self._fieldnames = fieldnames
        self._size[name] = size
        self._stale[name] = False
        self._on_disk[name] = len(self)
