"""The local record that needs no account: an alpha-over-time plot and a self-contained HTML report.

The history files (``history.jsonl``, ``history.csv``) are written by
:class:`ww_callbacks.history.History`; this tracker adds, in the same folder and rewritten after
every analysis:

* ``alpha_over_time.png``: alpha of every layer against the global step, the layer mean in bold,
  the WeightWatcher bands (alpha < 2 over-trained, alpha > 6 under-trained) shaded. Needs
  matplotlib (imported lazily, Agg canvas, no pyplot state); without it the PNG is skipped with
  one log line and the report embeds a small SVG of the mean alpha instead.
* ``report.html``: one file, no external resources: the plot (inline base64 PNG or SVG), the
  latest per-layer metrics with flagged layers highlighted, and a summary line per analysis.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
import math
import os
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence

from ww_callbacks.atomic import write_bytes
from ww_callbacks.trackers.base import Tracker, finite_float, plain_value

__all__ = ["LocalTracker"]

logger = logging.getLogger("ww_callbacks")

#: Columns of the per-layer table in the report.
TABLE_COLUMNS = ("name", "type", "N", "M", "num_evals", "alpha", "d_alpha", "alpha_weighted",
                 "log_norm", "log_spectral_norm", "stable_rank", "D", "num_pl_spikes", "warning",
                 "flags")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px}
.meta{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3;position:sticky;top:0}
td.l,th.l{text-align:left}
tr.flag{background:#fff1d6} tr.flag td.flags{color:#b00;font-weight:600}
img,svg{max-width:100%;height:auto}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return f"{value:.3g}" if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-2) else f"{value:.3f}"
    if value is None:
        return ""
    return str(value)


def _flags_of(row: Dict[str, Any]) -> str:
    flags = plain_value(row.get("flags", ""))  # tuple -> "a,b"; None / nan -> None
    return "" if flags is None else str(flags)


def _by_step(history: Sequence[Dict[str, Any]]) -> "OrderedDict[int, List[Dict[str, Any]]]":
    groups: "OrderedDict[int, List[Dict[str, Any]]]" = OrderedDict()
    for row in sorted(history, key=lambda r: r["step"]):
        groups.setdefault(int(row["step"]), []).append(row)
    return groups


def _mean_alpha(rows: Sequence[Dict[str, Any]]) -> float:
    alphas = [a for a in (finite_float(r.get("alpha")) for r in rows) if a is not None]
    return sum(alphas) / len(alphas) if alphas else math.nan


class LocalTracker(Tracker):
    """Writes ``alpha_over_time.png`` and ``report.html`` into ``output_dir`` after each analysis.

    Args:
        output_dir: the folder (created if needed); the history files live there too.
        plot: write the PNG plot (needs matplotlib).
        report: write the HTML report.
        title: heading of the report.
        log_fn: where the single "matplotlib not installed" line goes.
    """

    name = "local"
    PLOT = "alpha_over_time.png"
    REPORT = "report.html"

    def __init__(self, output_dir: str, plot: bool = True, report: bool = True,
                 title: str = "WeightWatcher report", log_fn: Optional[Callable[[str], Any]] = None,
                 strict: bool = False) -> None:
        self.output_dir = os.fspath(output_dir)
        self.plot = plot
        self.report = report
        self.title = title
        self.log_fn = log_fn or logger.info
        self.strict = strict
        self._no_matplotlib = False

    @property
    def plot_path(self) -> str:
        return os.path.join(self.output_dir, self.PLOT)

    @property
    def report_path(self) -> str:
        return os.path.join(self.output_dir, self.REPORT)

    def log_analysis(self, *, step: int, epoch: int, rows: List[Dict[str, Any]],
                     summary: Dict[str, float], result: Any, history: List[Dict[str, Any]]) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
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
        if self.report:
            write_bytes(self.report_path, self.render_html(history, png).encode("utf-8"))

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
        groups = _by_step(history)
        steps = list(groups)
        layers: "OrderedDict[str, Dict[int, float]]" = OrderedDict()
        for step, rows in groups.items():
            for row in rows:
                alpha = finite_float(row.get("alpha"))
                if alpha is not None:
                    layers.setdefault(str(row["name"]), {})[step] = alpha
        fig = Figure(figsize=(9, 5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.axhspan(0, 2, color="#d62728", alpha=0.07, lw=0)
        ax.axhline(2, color="#d62728", lw=0.8, ls="--")
        ax.axhline(6, color="#ff7f0e", lw=0.8, ls="--")
        many = len(layers) > 15
        for name, points in layers.items():
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="" if many else "o", ms=3,
                    lw=0.8 if many else 1.2, alpha=0.5 if many else 0.9, label=None if many else name)
        means = [(s, _mean_alpha(rows)) for s, rows in groups.items()]
        means = [(s, m) for s, m in means if math.isfinite(m)]
        if means:
            ax.plot([s for s, _ in means], [m for _, m in means], color="black", lw=2.5, marker="s",
                    ms=4, label="mean")
        all_alpha = [a for pts in layers.values() for a in pts.values()]
        top = max([8.0] + [min(a, 20.0) for a in all_alpha]) + 0.5
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

    @staticmethod
    def _svg_mean(history: Sequence[Dict[str, Any]]) -> str:
        """A tiny inline SVG of the mean alpha per analysis (used when matplotlib is missing)."""
        points = [(s, _mean_alpha(rows)) for s, rows in _by_step(history).items()]
        points = [(s, m) for s, m in points if math.isfinite(m)]
        if not points:
            return "<p>No finite alpha yet.</p>"
        w, h, pad = 640, 240, 30
        s0, s1 = points[0][0], points[-1][0]
        top = max(8.0, max(m for _, m in points)) + 0.5
        def sx(s: float) -> float:
            return pad + (w - 2 * pad) * ((s - s0) / (s1 - s0) if s1 > s0 else 0.5)

        def sy(a: float) -> float:
            return h - pad - (h - 2 * pad) * min(a, top) / top

        def hline(a: float, color: str) -> str:
            return (f'<line x1="{pad}" x2="{w - pad}" y1="{sy(a):.1f}" y2="{sy(a):.1f}" '
                    f'stroke="{color}" stroke-dasharray="4"/>')

        poly = " ".join(f"{sx(s):.1f},{sy(m):.1f}" for s, m in points)
        dots = "".join(f'<circle cx="{sx(s):.1f}" cy="{sy(m):.1f}" r="3"/>' for s, m in points)
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
                f'viewBox="0 0 {w} {h}"><rect width="{w}" height="{h}" fill="white"/>'
                f'{hline(2, "#d62728")}{hline(6, "#ff7f0e")}'
                f'<polyline fill="none" stroke="black" stroke-width="2" points="{poly}"/>{dots}'
                f'<text x="{pad}" y="16" font-size="12">mean alpha, steps {s0}-{s1}</text></svg>')

    # ------------------------------------------------------------------ report
    def render_html(self, history: Sequence[Dict[str, Any]], png: Optional[bytes] = None) -> str:
        """The self-contained report for ``history`` (rows of all analyses)."""
        esc = html.escape
        groups = _by_step(history)
        parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(self.title)}</title>"
                 f"<style>{_CSS}</style></head><body><h1>{esc(self.title)}</h1>"]
        now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        parts.append(f"<p class='meta'>Updated {now} &middot; {len(groups)} analyses &middot; "
                     f"data: <a href='history.csv'>history.csv</a>, "
                     f"<a href='history.jsonl'>history.jsonl</a></p>")
        if not groups:
            parts.append("<p>No analysis yet.</p></body></html>")
            return "".join(parts)

        parts.append("<h2>Alpha over time</h2>")
        if png is not None:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<img alt='alpha over time' src='data:image/png;base64,{data}'>")
        else:
            parts.append(self._svg_mean(history))

        last_step = next(reversed(groups))
        latest = groups[last_step]
        steps = list(groups)
        previous = {str(r["name"]): r.get("alpha") for r in groups[steps[-2]]} if len(steps) > 1 else {}
        epoch = latest[0].get("epoch", "")
        flagged = [r for r in latest if _flags_of(r)]
        parts.append(f"<h2>Latest analysis: step {esc(str(last_step))}, epoch {esc(str(epoch))}</h2>")
        parts.append(f"<p>mean alpha {_fmt(_mean_alpha(latest))} over {len(latest)} layers; "
                     f"{len(flagged)} flagged"
                     + (": " + esc(", ".join(f"{r['name']} ({_flags_of(r)})" for r in flagged[:20]))
                        if flagged else "") + "</p>")
        parts.append("<table><tr>" + "".join(
            f"<th class='{'l' if c in ('name', 'type', 'warning', 'flags') else ''}'>"
            f"{'&Delta; alpha' if c == 'd_alpha' else esc(c)}</th>" for c in TABLE_COLUMNS) + "</tr>")
        for row in latest:
            flags = _flags_of(row)
            cells = []
            for col in TABLE_COLUMNS:
                if col == "d_alpha":
                    prev = finite_float(previous.get(str(row["name"])))
                    cur = finite_float(row.get("alpha"))
                    value = cur - prev if prev is not None and cur is not None else None
                    text = f"{value:+.3f}" if value is not None else ""
                elif col == "flags":
                    text = flags
                else:
                    text = _fmt(row.get(col))
                cls = "l" if col in ("name", "type", "warning") else ("l flags" if col == "flags" else "")
                cells.append(f"<td class='{cls}'>{esc(text)}</td>")
            parts.append(f"<tr class='{'flag' if flags else ''}'>" + "".join(cells) + "</tr>")
        parts.append("</table>")

        parts.append("<h2>Summary per analysis</h2><table><tr><th>step</th><th>epoch</th>"
                     "<th>time</th><th>layers</th><th>mean alpha</th><th>mean log_norm</th>"
                     "<th>flagged</th><th class='l'>flagged layers</th></tr>")
        for step, rows in reversed(groups.items()):
            flagged = [f"{r['name']} ({_flags_of(r)})" for r in rows if _flags_of(r)]
            log_norms = [v for v in (finite_float(r.get("log_norm")) for r in rows) if v is not None]
            stamp = finite_float(rows[0].get("time"))
            stamp = _dt.datetime.fromtimestamp(stamp).strftime("%H:%M:%S") if stamp is not None else ""
            shown = ", ".join(flagged[:8]) + (f", +{len(flagged) - 8} more" if len(flagged) > 8 else "")
            parts.append(
                f"<tr class='{'flag' if flagged else ''}'><td>{step}</td>"
                f"<td>{esc(str(rows[0].get('epoch', '')))}</td><td>{stamp}</td><td>{len(rows)}</td>"
                f"<td>{_fmt(_mean_alpha(rows))}</td>"
                f"<td>{_fmt(sum(log_norms) / len(log_norms)) if log_norms else ''}</td>"
                f"<td>{len(flagged)}</td><td class='l flags'>{esc(shown)}</td></tr>")
        parts.append("</table></body></html>")
        return "".join(parts)

