"""The local tracker's live report: a fixed page plus data files, so that an analysis costs what it
adds, not what the run has analysed so far.

Three files in the output folder:

* ``report.html``: the page (frame, CSS, ``report.js``), written once per process. It loads the two
  files below with ``<script src>``, which works when the page is opened from disk (``file://``).
* ``report-data.js``: append-only, one ``ww_report.add({...})`` line per analysis (the alpha of
  each layer it measured, by layer index; the layers first seen; the summary row) and one
  ``ww_report.decide([...])`` line per action event. Each analysis appends O(its rows).
* ``report-latest.js``: rewritten after each analysis: one row per layer with its latest
  measurement (and the step of it: with layer rotation, a layer skipped by the last analyses keeps
  its last row), and the ESDs of the latest analysis. O(layers), whatever the number of analyses.

The page assembles what :func:`~ww_callbacks.trackers.report_html.build_data` would embed (the
heatmap and chart thinned to ``max_steps`` analyses; a layer not measured at a step is a gap,
not a value). When a process starts a report (a fresh or a resumed run), it rewrites
``report-data.js`` once from the history, so a resumed report holds exactly the history's rows.

Example:
    >>> import tempfile
    >>> live = LiveReport(tempfile.mkdtemp())
    >>> live.start([], [])
    >>> live.add(10, 0, [{"step": 10, "name": "fc", "alpha": 3.2, "flags": ""}], {})
    >>> live.rows_rendered          # the analysis' row, then the latest table's row
    2
"""

from __future__ import annotations

import datetime as _dt
import html
import itertools
import json
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from ww_callbacks.atomic import append_bytes, atomic_open
from ww_callbacks.trackers.base import DECISION_COLUMNS, UNJUDGED_FLAGS, finite_float, is_unjudged
from ww_callbacks.trackers.report_html import (
    ALPHA_HIGH,
    ALPHA_LOW,
    SUMMARY_COLUMNS,
    TABLE_COLUMNS,
    _cell,
    _num,
    json_text,
    latest_cells,
    page,
    summary_row,
)

__all__ = ["LiveReport", "read_report_data"]


class LiveReport:
    """Writes and extends the live report's three files in ``output_dir``.

    Args:
        output_dir: the folder (created if needed).
        title: the page heading.
        max_steps: the heatmap and chart show at most this many analyses (evenly thinned).
        max_decisions: the decisions table shows the newest this many.
    """

    PAGE = "report.html"
    DATA = "report-data.js"
    LATEST = "report-latest.js"

    def __init__(self, output_dir: str, title: str = "WeightWatcher report", max_steps: int = 300,
                 max_decisions: int = 1000) -> None:
        self.output_dir = os.fspath(output_dir)
        self.title = title
        self.max_steps = max(int(max_steps), 2)
        self.max_decisions = max(int(max_decisions), 0)
        self.started = False
        #: Rows written by the last :meth:`add` (the analysis' rows plus the latest table's).
        self.rows_rendered = 0
        self._index: Dict[str, int] = {}
        self._cells: Dict[int, list] = {}
        self._alpha: Dict[str, Optional[float]] = {}
        self._latest_step: Optional[int] = None
        self._latest_epoch: Optional[int] = None

    def path(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    # ------------------------------------------------------------------ writing
    def start(self, history: Iterable[Dict[str, Any]], decisions: Iterable[Sequence[Any]],
              summaries: Optional[Dict[int, Dict[str, Any]]] = None,
              on_analysis: Optional[Callable[[int, List[Dict[str, Any]]], Any]] = None) -> None:
        """Write the page and rebuild ``report-data.js`` from ``history`` (every row so far, in
        step order, streamed one analysis at a time; ``on_analysis(step, rows)`` sees each) and
        ``decisions`` (decision table cells)."""
        os.makedirs(self.output_dir, exist_ok=True)
        self._index, self._cells, self._alpha = {}, {}, {}
        rendered = 0
        with atomic_open(self.path(self.DATA), "w", encoding="utf-8") as fh:
            fh.write("/* WeightWatcher report data: one line per analysis or decision event */\n")
            for step, group in itertools.groupby(history, key=lambda r: int(r["step"])):
                rows = list(group)
                fh.write(self._chunk(step, rows, (summaries or {}).get(step)))
                rendered += len(rows)
                if on_analysis is not None:
                    on_analysis(step, rows)
            cells = [list(d) for d in decisions]
            for start in range(0, len(cells), 500):
                fh.write(f"ww_report.decide({json_text(cells[start:start + 500])});\n")
        with atomic_open(self.path(self.PAGE), "w", encoding="utf-8") as fh:
            fh.write(self.render_page())
        self.started = True
        self.write_latest()
        self.rows_rendered = rendered + len(self._cells)

    def add(self, step: int, epoch: int, rows: List[Dict[str, Any]], summary: Optional[Dict[str, Any]],
            esd: Sequence[Dict[str, Any]] = (), esd_step: Optional[int] = None, esd_note: str = "") -> None:
        """Append one analysis and rewrite the latest table (O(its rows + layers))."""
        if not rows:
            return
        data = self._chunk(int(step), rows, summary)
        append_bytes(self.path(self.DATA), data.encode("utf-8"), fsync=False)
        self.write_latest(esd, esd_step, esd_note)
        self.rows_rendered = len(rows) + len(self._cells)

    def add_decisions(self, rows: Sequence[Dict[str, Any]]) -> None:
        """Append an event's decision rows (``base.decision_rows``)."""
        if rows and self.started:
            cells = [[_cell(d.get(c)) for c in DECISION_COLUMNS] for d in rows]
            append_bytes(self.path(self.DATA),
                         f"ww_report.decide({json_text(cells)});\n".encode("utf-8"), fsync=False)

    # ------------------------------------------------------------------ pieces
    def _chunk(self, step: int, rows: List[Dict[str, Any]], summary: Optional[Dict[str, Any]]) -> str:
        new, idx, alpha, few = [], [], [], []
        for row in rows:
            name = str(row.get("name"))
            if name not in self._index:
                self._index[name] = len(self._index)
                new.append([name, str(row.get("type") or "")])
            i = self._index[name]
            idx.append(i)
            alpha.append(_num(row.get("alpha")))
            if is_unjudged(row.get("flags")):
                few.append(i)
            self._cells[i] = latest_cells(i, row, self._alpha.get(name))
            self._alpha[name] = finite_float(row.get("alpha"))
        self._latest_step, self._latest_epoch = step, rows[0].get("epoch")
        chunk: Dict[str, Any] = {"s": step, "e": _cell(rows[0].get("epoch")), "a": alpha,
                                 "m": summary_row(step, rows, summary)}
        if new:
            chunk["n"] = new
        if idx != list(range(len(self._index))):
            chunk["i"] = idx                      # a partial analysis (or a reordered one)
        if few:
            chunk["u"] = few
        return f"ww_report.add({json_text(chunk)});\n"

    def write_latest(self, esd: Sequence[Dict[str, Any]] = (), esd_step: Optional[int] = None,
                     esd_note: str = "") -> None:
        """Rewrite ``report-latest.js``: every layer's latest row, and ``esd`` of ``esd_step``."""
        latest = {"updated": _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
                  "latest_step": self._latest_step, "latest_epoch": _cell(self._latest_epoch),
                  "latest": [self._cells[i] for i in sorted(self._cells)],
                  "esd": list(esd), "esd_step": esd_step, "esd_note": esd_note}
        with atomic_open(self.path(self.LATEST), "w", encoding="utf-8") as fh:
            fh.write(f"ww_report.set_latest({json_text(latest)});\n")

    def render_page(self) -> str:
        """The fixed page: loads ``report-data.js`` and ``report-latest.js`` beside it."""
        config = {"title": self.title, "band": [ALPHA_LOW, ALPHA_HIGH], "max_steps": self.max_steps,
                  "max_decisions": self.max_decisions, "unjudged_flags": list(UNJUDGED_FLAGS),
                  "columns": ["#"] + list(TABLE_COLUMNS), "summary_columns": list(SUMMARY_COLUMNS),
                  "decision_columns": list(DECISION_COLUMNS)}
        prelude = ("<script>window.ww_report=Object.assign(" + json_text(config) + ",{chunks:[],"
                   "decisions:[],latest:null,add:function(c){this.chunks.push(c);},"
                   "decide:function(r){for(var k=0;k<r.length;k++)this.decisions.push(r[k]);},"
                   "set_latest:function(l){this.latest=l;}});</script>\n"
                   f'<script src="{html.escape(self.DATA)}"></script>\n'
                   f'<script src="{html.escape(self.LATEST)}"></script>')
        head = "<div id='head'><p>No analysis yet.</p></div>"
        return page(self.title, head, prelude)


def _calls(path: str, name: str) -> List[Any]:
    """The JSON arguments of the ``ww_report.<name>(...);`` lines of a report file."""
    head, out = f"ww_report.{name}(", []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip()
            if line.startswith(head) and line.endswith(");"):
                try:
                    out.append(json.loads(line[len(head):-2]))
                except ValueError:
                    continue                  # a line cut short by a crash
    return out


def read_report_data(output_dir: str) -> Dict[str, Any]:
    """What the live report in ``output_dir`` shows, as the page assembles it (every analysis, not
    thinned): ``layers``, ``steps``, ``alpha`` (layer x step, ``None``: not measured or no fit),
    ``summary``, ``decisions``, ``latest`` (one row per layer), ``latest_step``, ``esd``...

    Raises:
        FileNotFoundError: no ``report-data.js`` in ``output_dir``.

    Example:
        >>> import tempfile
        >>> live = LiveReport(tempfile.mkdtemp())
        >>> live.start([{"step": 3, "name": "fc", "alpha": 3.2}], [])
        >>> data = read_report_data(live.output_dir)
        >>> data["layers"], data["steps"], data["alpha"], data["latest_step"]
        (['fc'], [3], [[3.2]], 3)
    """
    path = os.path.join(output_dir, LiveReport.DATA)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no live report in {output_dir} ({LiveReport.DATA} is missing)")
    layers: List[str] = []
    by_step: Dict[int, Dict[str, Any]] = {}
    for chunk in _calls(path, "add"):
        layers += [n for n, _ in chunk.get("n", ())]
        by_step[int(chunk["s"])] = chunk
    steps = sorted(by_step)
    alpha: List[List[Optional[float]]] = [[None] * len(steps) for _ in layers]
    for j, step in enumerate(steps):
        chunk = by_step[step]
        for k, value in enumerate(chunk["a"]):
            alpha[chunk["i"][k] if "i" in chunk else k][j] = value
    latest = (_calls(os.path.join(output_dir, LiveReport.LATEST), "set_latest") or [{}])[-1]
    decisions = [d for batch in _calls(path, "decide") for d in batch]
    return {"layers": layers, "steps": steps, "alpha": alpha, "num_analyses": len(steps),
            "summary_columns": list(SUMMARY_COLUMNS), "summary": [by_step[s]["m"] for s in steps],
            "decision_columns": list(DECISION_COLUMNS), "decisions": decisions,
            "columns": ["#"] + list(TABLE_COLUMNS), "latest": latest.get("latest", []),
            "latest_step": latest.get("latest_step"), "latest_epoch": latest.get("latest_epoch"),
            "esd": latest.get("esd", []), "esd_step": latest.get("esd_step")}
