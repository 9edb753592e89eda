"""The local record that needs no account: an alpha-over-time plot and an HTML report.

The history files (``history.jsonl``, ``history.csv``) are written by
:class:`ww_callbacks.history.History`; this tracker adds, in the same folder:

* ``alpha_over_time.png``: the mean alpha against the global step with the layers' min-max and
  interquartile bands (every layer's own line when there are at most 12), the WeightWatcher
  thresholds (2, 6) dashed. Each point summarises every layer's latest measurement (with layer
  rotation, a layer not analysed at that step counts with its last alpha). Drawn at analyses
  1, 2, 4, ... up to ``plot_every``, then every ``plot_every`` analyses, and at the end
  (:meth:`LocalTracker.close`), from a bounded series kept in memory (at most
  :data:`MAX_PLOT_POINTS` points). Needs matplotlib (imported lazily, Agg canvas, no pyplot
  state); without it the PNG is skipped with one log line.
* ``report.html`` with ``report-data.js`` (appended to) and ``report-latest.js`` (rewritten, one
  row per layer): a layer x step heatmap, an interactive alpha chart, a sortable/filterable layer
  table, ESDs of the worst flagged layers and the decisions (see
  :mod:`ww_callbacks.trackers.report_live`). An analysis adds O(its rows + layers) to write,
  whatever the number of analyses before it.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

from ww_callbacks.atomic import write_bytes
from ww_callbacks.history import History
from ww_callbacks.trackers.base import DECISION_COLUMNS, Tracker, decision_rows, finite_float
from ww_callbacks.trackers.report_html import (
    TABLE_COLUMNS,
    _cell,
    build_data,
    esd_data,
    render_report,
)
from ww_callbacks.trackers.report_live import LiveReport

__all__ = ["LocalTracker", "TABLE_COLUMNS", "MAX_PLOT_POINTS"]

logger = logging.getLogger("ww_callbacks")

#: The PNG's series keeps at most this many points (older ones are thinned, every other dropped).
MAX_PLOT_POINTS = 2000
#: The per-layer lines of the PNG are drawn for at most this many layers.
MAX_PLOT_LINES = 12


class LocalTracker(Tracker):
    """Writes ``alpha_over_time.png`` and the report into ``output_dir`` as analyses come.

    Args:
        output_dir: the folder (created if needed); the history files live there too.
        plot: write the PNG plot (needs matplotlib).
        report: write the HTML report.
        title: heading of the report.
        log_fn: where the single "matplotlib not installed" line goes.
        strict: re-raise a failing plot instead of reporting it once.
        max_esd: ESD histograms of at most this many flagged layers (worst first); 0 turns them
            off, and with them the request to keep eigenvalues (``wants_evals``).
        max_steps: the heatmap and chart show at most this many analyses (evenly thinned).
        plot_every: after the first analyses (1, 2, 4, ...), redraw the PNG every this many
            analyses (and at the end); ``1`` redraws it at every analysis.

    Raises:
        ValueError: ``plot_every`` below 1.

    Example:
        >>> import tempfile
        >>> t = LocalTracker(tempfile.mkdtemp(), plot=False)
        >>> rows = [{"step": 1, "epoch": 0, "time": 0.0, "name": "fc", "alpha": 3.0, "flags": ""}]
        >>> t.log_analysis(step=1, epoch=0, rows=rows, summary={}, result=None, history=rows)
        >>> t.rows_rendered
        2
    """

    name = "local"
    PLOT = "alpha_over_time.png"
    REPORT = "report.html"

    def __init__(self, output_dir: str, plot: bool = True, report: bool = True,
                 title: str = "WeightWatcher report", log_fn: Optional[Callable[[str], Any]] = None,
                 strict: bool = False, max_esd: int = 12, max_steps: int = 300,
                 plot_every: int = 100) -> None:
        if isinstance(plot_every, bool) or not isinstance(plot_every, int) or plot_every < 1:
            raise ValueError(f"plot_every must be an int >= 1, got {plot_every!r}")
        self.output_dir = os.fspath(output_dir)
        self.plot = plot
        self.report = report
        self.title = title
        self.log_fn = log_fn or logger.info
        self.strict = strict
        self.max_esd = max(int(max_esd), 0)
        self.max_steps = max(int(max_steps), 2)
        self.plot_every = plot_every
        #: Ask the controller to keep eigenvalues (for the ESD histograms).
        self.wants_evals = bool(report and self.max_esd)
        self.live = LiveReport(self.output_dir, title=title, max_steps=self.max_steps)
        #: Analyses this tracker logged, PNG redraws, and rows the report wrote for the last one.
        self.num_analyses = 0
        self.num_plots = 0
        self._no_matplotlib = False
        self._started = False
        self._decisions: Deque[Dict[str, Any]] = deque(maxlen=1000)   # for render_html
        self._alphas: Dict[str, float] = {}
        self._esd: List[Dict[str, Any]] = []
        self._esd_step: Optional[int] = None
        # the PNG's bounded series: (step, mean, min, q1, q3, max) of every layer's latest alpha
        self._latest_alpha: Dict[str, Optional[float]] = {}
        self._points: List[tuple] = []
        self._lines: Optional[Dict[str, List[tuple]]] = {}
        self._plotted = 0                     # len(self._points) at the last redraw

    def _earlier_decisions(self) -> List[Dict[str, Any]]:
        """The decisions in the run folder's ``decisions.jsonl`` (streamed, a resumed run's)."""
        path = os.path.join(self.output_dir, History.DECISIONS)
        out: List[Dict[str, Any]] = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        event = json.loads(line)
                        out += decision_rows(event["step"], event["kind"], event.get("payload") or {})
                    except (ValueError, KeyError, TypeError):
                        continue              # a line cut short by a crash
        return out

    @property
    def plot_path(self) -> str:
        return os.path.join(self.output_dir, self.PLOT)

    @property
    def report_path(self) -> str:
        return os.path.join(self.output_dir, self.REPORT)

    @property
    def rows_rendered(self) -> int:
        """Rows the report wrote for the last analysis (its rows plus one per layer)."""
        return self.live.rows_rendered

    def log_analysis(self, *, step: int, epoch: int, rows: List[Dict[str, Any]],
                     summary: Dict[str, float], result: Any, history: Sequence[Dict[str, Any]]) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self.num_analyses += 1
        self._alphas = {str(r.get("name")): a for r in rows
                        if (a := finite_float(r.get("alpha"))) is not None}
        if self.report and self.max_esd and result is not None:
            esd = esd_data(result, self.max_esd)
            if esd or any(getattr(lay, "evals", None) is not None for lay in result):
                self._esd, self._esd_step = esd, int(step)
        if not self._started:
            # once per process: the report and the plot's series from the history so far
            self._started = True
            source = history if history is not None and len(history) else rows
            if self.report:
                decisions = self._earlier_decisions()
                self._decisions.extend(decisions)
                self.live.start(source, [[_cell(d.get(c)) for c in DECISION_COLUMNS] for d in decisions],
                                summaries={int(step): dict(summary or {})}, on_analysis=self._add_point)
                self.live.write_latest(self._esd, self._esd_step, self._esd_note())
            else:
                for s, group in itertools.groupby(source, key=lambda r: int(r["step"])):
                    self._add_point(s, list(group))
        else:
            self._add_point(int(step), rows)
            if self.report:
                self.live.add(int(step), epoch, rows, summary, self._esd, self._esd_step, self._esd_note())
        n = self.num_analyses
        if n % self.plot_every == 0 or (n <= self.plot_every and n & (n - 1) == 0):
            self._redraw()

    def log_event(self, *, step: int, kind: str, payload: Dict[str, Any]) -> None:
        """Add an action's decisions to the report's timeline (appended to its data file)."""
        new = decision_rows(step, kind, payload, self._alphas)
        self._decisions.extend(new)
        if self.report:
            self.live.add_decisions(new)

    def close(self) -> None:
        """Draw the PNG with the analyses since its last redraw."""
        if len(self._points) != self._plotted or (self._points and not os.path.exists(self.plot_path)):
            self._redraw()

    def _esd_note(self) -> str:
        if not self._esd and self._esd_step is None:
            return ("No eigenvalues were kept for the latest analysis, so no ESD is drawn."
                    if self.max_esd else "ESD histograms are turned off (max_esd=0).")
        return f"Step {self._esd_step}: no flagged layer."

    # ------------------------------------------------------------------ report
    def render_html(self, history: Sequence[Dict[str, Any]], png: Optional[bytes] = None) -> str:
        """A self-contained report of ``history`` (rows of all analyses, data embedded in the page;
        O(rows), unlike the live report); ``png`` is accepted for compatibility and ignored."""
        data = build_data(history, title=self.title, decisions=list(self._decisions), esd=self._esd,
                          esd_step=self._esd_step, esd_note=self._esd_note(),
                          max_steps=self.max_steps)
        return render_report(data)

    # ------------------------------------------------------------------ plot
    def _add_point(self, step: int, rows: List[Dict[str, Any]]) -> None:
        """Fold one analysis into the PNG's bounded series (O(layers))."""
        if not self.plot:
            return
        import numpy as np

        for r in rows:
            self._latest_alpha[str(r.get("name"))] = finite_float(r.get("alpha"))
        values = np.array([a for a in self._latest_alpha.values() if a is not None], dtype=float)
        if values.size:
            q = np.percentile(values, [0, 25, 75, 100])
            self._points.append((int(step), float(values.mean()), *map(float, q)))
        else:
            self._points.append((int(step), None, None, None, None, None))
        if self._lines is not None:
            if len(self._latest_alpha) > MAX_PLOT_LINES:
                self._lines = None                    # too many layers for one line each
            else:
                for r in rows:
                    a = finite_float(r.get("alpha"))
                    if a is not None:
                        self._lines.setdefault(str(r.get("name")), []).append((int(step), a))
        if len(self._points) > MAX_PLOT_POINTS:       # thin the older half: memory stays bounded
            self._points = self._points[:-1:2] + [self._points[-1]]
            self._plotted = 0
            for name, pts in (self._lines or {}).items():
                if len(pts) > MAX_PLOT_POINTS // 2:
                    self._lines[name] = pts[:-1:2] + [pts[-1]]

    def _redraw(self) -> None:
        if not self.plot or not self._points:
            return
        try:
            png = self._plot_png()
        except Exception as exc:
            if self.strict:
                raise
            # the plot is a nice-to-have: the report goes on without it, reported once
            self.plot = False
            self.log_fn(f"ww: the alpha plot failed ({type(exc).__name__}: {exc}); "
                        f"{self.REPORT} continues without it (training continues)")
            return
        if png is not None:
            write_bytes(self.plot_path, png)
            self.num_plots += 1
            self._plotted = len(self._points)

    def _plot_png(self) -> Optional[bytes]:
        if self._no_matplotlib or not self._points:
            return None
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            self._no_matplotlib = True
            self.log_fn("ww: matplotlib is not installed, skipping alpha_over_time.png "
                        "(pip install matplotlib)")
            return None
        import numpy as np

        pts = [p for p in self._points if p[1] is not None]
        steps = np.array([p[0] for p in self._points], dtype=float)
        n_layers = len(self._latest_alpha)
        fig = Figure(figsize=(9, 5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.axhspan(2, 6, color="#2ca02c", alpha=0.06, lw=0)
        ax.axhline(2, color="#d62728", lw=0.8, ls="--")
        ax.axhline(6, color="#ff7f0e", lw=0.8, ls="--")
        if self._lines is not None:
            for name, line in self._lines.items():
                ax.plot(*zip(*line), marker="o", ms=3, lw=1.1, alpha=0.85, label=name)
        elif pts:
            q = np.array([p[2:] for p in pts], dtype=float)
            x = np.array([p[0] for p in pts], dtype=float)
            ax.fill_between(x, q[:, 0], q[:, 3], color="#1f77b4", alpha=0.12, lw=0,
                            label=f"min-max of {n_layers} layers")
            ax.fill_between(x, q[:, 1], q[:, 2], color="#1f77b4", alpha=0.3, lw=0,
                            label="interquartile range")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="black", lw=2.5,
                    marker="s" if len(pts) < 60 else "", ms=4, label="mean")
            top = max(8.0, min(20.0, max(p[5] for p in pts))) + 0.5
        else:
            top = 8.5
        ax.set_ylim(0, top)
        if len(steps) == 1:
            ax.set_xlim(steps[0] - 1, steps[0] + 1)
        ax.set_xlabel("global step")
        ax.set_ylabel("alpha")
        ax.set_title("alpha over training (dashed: 2 over-trained, 6 under-trained)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.subplots_adjust(left=0.07, right=0.8, bottom=0.1, top=0.93)   # no tight_layout pass
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
