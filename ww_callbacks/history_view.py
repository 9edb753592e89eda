"""What the history keeps in memory besides its unwritten rows: the analysed steps, each layer's
latest row and a short per-layer window of the metrics the actions read.

:class:`RecentIndex` is updated with each analysis (O(rows of that analysis)) and holds, whatever
the number of analyses, one row per layer plus ``window`` small tuples per layer; the per-step
means (one float per analysis and metric) and the step list are the only parts that grow, by a
few bytes per analysis. :class:`HistoryRows` is the list-like view ``History.rows``: it reads the
rows already written back from ``history.jsonl`` when iterated, so nothing but the unwritten rows
stays in memory.

Example:
    >>> index = RecentIndex(window=2)
    >>> index.add([{"step": 1, "name": "fc", "alpha": 3.0}, {"step": 1, "name": "out", "alpha": 5.0}])
    >>> index.add([{"step": 2, "name": "fc", "alpha": 2.5}])          # a partial analysis
    >>> index.series("alpha"), index.mean_series("alpha")
    ({'fc': [3.0, 2.5], 'out': [5.0]}, [4.0, 2.5])
    >>> {name: row["step"] for name, row in index.latest.items()}
    {'fc': 2, 'out': 1}
"""

from __future__ import annotations

import bisect
import json
import math
import numbers
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

__all__ = ["RecentIndex", "HistoryRows", "RECENT_METRICS", "iter_jsonl"]

#: The metrics kept per layer in the recent window (those the actions read).
RECENT_METRICS = ("alpha", "alpha_hill")


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    return None


def iter_jsonl(path: str, limit: int) -> Iterator[Dict[str, Any]]:
    """The first ``limit`` whole JSON rows of ``path`` (``null`` read back as ``nan``), streamed.

    Lines that do not parse (cut short by a crash) are skipped; a missing file yields nothing.
    """
    if limit <= 0:
        return
    try:
        fh = open(path, encoding="utf-8", errors="replace")
    except OSError:
        return
    with fh:
        count = 0
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict):
                continue
            yield {k: (math.nan if v is None else v) for k, v in row.items()}
            count += 1
            if count >= limit:
                return


class RecentIndex:
    """Steps, latest row per layer, recent per-layer metric windows and per-step means.

    Args:
        window: analyses kept per layer in :meth:`series` (``>= 1``).

    Raises:
        ValueError: ``window`` is not an int >= 1.
    """

    def __init__(self, window: int = 32) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"recent_window must be an int >= 1, got {window!r}")
        self.window = window
        self.clear()

    def clear(self) -> None:
        self.steps: List[int] = []
        #: Each layer's most recent row (first-seen order), with the step it was measured at.
        self.latest: Dict[str, Dict[str, Any]] = {}
        self._recent: Dict[str, Deque[Tuple[int, Tuple[float, ...]]]] = {}
        # per metric: step -> (sum, count) of finite values (one entry per analysed step)
        self._sums: Dict[str, Dict[int, Tuple[float, int]]] = {m: {} for m in RECENT_METRICS}

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Index the rows of one analysis (or any rows, oldest first)."""
        for row in rows:
            step, name = int(row.get("step", 0)), str(row.get("name"))
            if not self.steps or step > self.steps[-1]:
                self.steps.append(step)
            elif step not in self.steps:
                bisect.insort(self.steps, step)
            self.latest[name] = dict(row)
            values = tuple(_finite(row.get(m)) for m in RECENT_METRICS)
            window = self._recent.setdefault(name, deque(maxlen=self.window))
            if window and window[-1][0] == step:
                window[-1] = (step, values)
            else:
                window.append((step, values))
            for metric, value in zip(RECENT_METRICS, values):
                total, count = self._sums[metric].get(step, (0.0, 0))
                if value is not None:
                    total, count = total + value, count + 1
                self._sums[metric][step] = (total, count)   # a tuple of numbers: not GC-tracked

    def rebuild(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Forget everything and index ``rows`` (after a resume or a truncation)."""
        self.clear()
        self.add(sorted(rows, key=lambda r: int(r.get("step", 0))))

    def series(self, metric: str = "alpha") -> Dict[str, List[float]]:
        """Per layer, the last ``window`` values of ``metric`` (nan where no fit), oldest first."""
        k = RECENT_METRICS.index(metric)
        return {name: [math.nan if v[k] is None else v[k] for _, v in window]
                for name, window in self._recent.items()}

    def mean_series(self, metric: str = "alpha") -> List[float]:
        """The mean of the finite ``metric`` values of each analysed step, in step order."""
        sums = self._sums[metric]
        return [sums[s][0] / sums[s][1] if s in sums and sums[s][1] else math.nan
                for s in self.steps]


class HistoryRows(Sequence):
    """The list-like ``History.rows``: rows already written are read back from disk on demand.

    ``len`` costs nothing; iterating, indexing or comparing reads ``history.jsonl`` (the rows
    written) followed by the rows still in memory.
    """

    def __init__(self, disk: Callable[[], Iterator[Dict[str, Any]]], memory: List[Dict[str, Any]],
                 on_disk: int) -> None:
        self._disk, self._memory, self._on_disk = disk, memory, on_disk

    def __len__(self) -> int:
        return self._on_disk + len(self._memory)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        if self._on_disk:
            yield from self._disk()
        yield from list(self._memory)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, int) and 0 <= index - self._on_disk < len(self._memory):
            return self._memory[index - self._on_disk]
        if isinstance(index, int) and -len(self._memory) <= index < 0:
            return self._memory[index]                  # the newest rows, without reading the file
        return list(self)[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, HistoryRows)):
            return list(self) == list(other)
        return NotImplemented

    def __add__(self, other: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return list(self) + list(other)

    def __repr__(self) -> str:
        return f"HistoryRows({len(self)} rows, {len(self._memory)} in memory)"
