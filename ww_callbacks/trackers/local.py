"""The local record that needs no account: an alpha-over-time plot and a self-contained HTML report.

The history files (``history.jsonl``, ``history.csv``) are written by
:class:`ww_callbacks.history.History`; this tracker adds, in the same folder and rewritten
atomically after every analysis (and after each action decision):

* ``alpha_over_time.png``: the mean alpha against the global step with the layers' min-max and
  interquartile bands (every layer's own line when there are at most 12), the WeightWatcher
  thresholds (2, 6) dashed. Needs matplotlib (imported lazily, Agg canvas, no pyplot state);
  without it the PNG is skipped with one log line.
* ``report.html``: one file, no external resources, made for hundreds of layers and analyses: a
  layer x step heatmap, an interactive alpha chart, a sortable/filterable layer table, ESDs of
  the worst flagged layers and the decisions (see :mod:`ww_callbacks.trackers.report_html`).
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

from ww_callbacks.atomic import write_bytes
from ww_callbacks.history import History
from ww_callbacks.trackers.base import Tracker, decision_rows, finite_float
from ww_callbacks.trackers.report_html import TABLE_COLUMNS, build_data, by_step, esd_data, render_report

__all__ = ["LocalTracker", "TABLE_COLUMNS"]

logger = logging.getLogger("ww_callbacks")


class LocalTracker(Tracker):
    """Writes ``alpha_over_time.png`` and ``report.html`` into ``output_dir`` after each analysis.

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
    """

    name = "local"
    PLOT = "alpha_over_time.png"
    REPORT = "report.html"

    def __init__(self, output_dir: str, plot: bool = True, report: bool = True,
                 title: str = "WeightWatcher report", log_fn: Optional[Callable[[str], Any]] = None,
                 strict: bool = False, max_esd: int = 12, max_steps: int = 300) -> None:
        self.output_dir = os.fspath(output_dir)
        self.plot = plot
        self.report = report
        self.title = title
        self.log_fn = log_fn or logger.info
        self.strict = strict
        self.max_esd = max(int(max_esd), 0)
        self.max_steps = max(int(max_steps), 2)
        #: Ask the controller to keep eigenvalues (for the ESD histograms).
        self.wants_evals = bool(report and self.max_esd)
        self._no_matplotlib = False
        self._history: Optional[List[Dict[str, Any]]] = None
        self._decisions: List[Dict[str, Any]] = self._earlier_decisions()
        self._summaries: Dict[int, Dict[str, Any]] = {}
        self._alphas: Dict[str, float] = {}
        self._esd: List[Dict[str, Any]] = []
        self._esd_step: Optional[int] = None

    def _earlier_decisions(self) -> List[Dict[str, Any]]:
        """The decisions already in the run folder's ``decisions.jsonl`` (a resumed run)."""
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

    def log_analysis(self, *, step: int, epoch: int, rows: List[Dict[str, Any]],
                     summary: Dict[str, float], result: Any, history: List[Dict[str, Any]]) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self._history = history
        self._summaries[int(step)] = dict(summary or {})
        self._alphas = {str(r.get("name")): a for r in rows
                        if (a := finite_float(r.get("alpha"))) is not None}
        if self.report and self.max_esd and result is not None:
            esd = esd_data(result, self.max_esd)
            if esd or any(getattr(lay, "evals", None) is not None for lay in result):
                self._esd, self._esd_step = esd, int(step)
        png = None
        if self.plot:
            try:
                png = self._plot_png(history)
            except Exception as exc:
                if self.strict:
                    raise
                # the plot is a nice-to-have: the report goes on without it, reported once
                self.plot = False
                self.log_fn(f"ww: the alpha plot failed ({type(exc).__name__}: {exc}); "
                            f"{self.REPORT} continues without it (training continues)")
        if png is not None:
            write_bytes(self.plot_path, png)
        self._write_report()

    def log_event(self, *, step: int, kind: str, payload: Dict[str, Any]) -> None:
        """Add an action's decisions to the report's timeline and rewrite the report."""
        self._decisions += decision_rows(step, kind, payload, self._alphas)
        if self._history is not None:
            self._write_report()

    def _write_report(self) -> None:
        if self.report:
            write_bytes(self.report_path, self.render_html(self._history or []).encode("utf-8"))

    # ------------------------------------------------------------------ report
    def render_html(self, history: Sequence[Dict[str, Any]], png: Optional[bytes] = None) -> str:
        """The self-contained report for ``history`` (rows of all analyses).

        ``png`` is accepted for compatibility and ignored: the page draws its own charts.
        """
        if not self._esd and self._esd_step is None:
            note = ("No eigenvalues were kept for the latest analysis, so no ESD is drawn."
                    if self.max_esd else "ESD histograms are turned off (max_esd=0).")
        else:
            note = f"Step {self._esd_step}: no flagged layer."
        data = build_data(history, title=self.title, decisions=self._decisions, esd=self._esd,
                          esd_step=self._esd_step, esd_note=note, summaries=self._summaries,
                          max_steps=self.max_steps)
        return render_report(data)

    # ------------------------------------------------------------------ plot
    def _plot_png(self, history: Sequence[Dict[str, Any]]) -> Optional[bytes]:
        if self._no_matplotlib or not history:
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

        groups = by_step(history)
        steps = np.array(list(groups), dtype=float)
        per_step = [np.array([a for a in (finite_float(r.get("alpha")) for r in rows) if a is not None])
                    for rows in groups.values()]
        names = list(dict.fromkeys(str(r.get("name")) for rows in groups.values() for r in rows))
        fig = Figure(figsize=(9, 5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.axhspan(2, 6, color="#2ca02c", alpha=0.06, lw=0)
        ax.axhline(2, color="#d62728", lw=0.8, ls="--")
        ax.axhline(6, color="#ff7f0e", lw=0.8, ls="--")
        ok = np.array([v.size > 0 for v in per_step])
        if len(names) <= 12:
            for name in names:
                pts = [(s, a) for s, rows in groups.items() for r in rows
                       if str(r.get("name")) == name and (a := finite_float(r.get("alpha"))) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, lw=1.1, alpha=0.85, label=name)
        elif ok.any():
            q = np.array([np.percentile(v, [0, 25, 75, 100]) for v in per_step if v.size], dtype=float)
            ax.fill_between(steps[ok], q[:, 0], q[:, 3], color="#1f77b4", alpha=0.12, lw=0,
                            label=f"min-max of {len(names)} layers")
            ax.fill_between(steps[ok], q[:, 1], q[:, 2], color="#1f77b4", alpha=0.3, lw=0,
                            label="interquartile range")
        if ok.any():
            means = np.array([v.mean() for v in per_step if v.size], dtype=float)
            ax.plot(steps[ok], means, color="black", lw=2.5, marker="s" if ok.sum() < 60 else "",
                    ms=4, label="mean")
            top = max(8.0, min(20.0, float(max(np.percentile(v, 99) for v in per_step if v.size)))) + 0.5
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
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
