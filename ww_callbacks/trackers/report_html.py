"""The self-contained HTML report of the local tracker, made for hundreds of layers.

:func:`render_report` embeds the data once, as one JSON block; the local tracker's live page
(:mod:`ww_callbacks.trackers.report_live`) instead loads them from two files beside it. Either
way the small vanilla script ``report.js`` (read from this package, inlined with ``report.css``)
draws them: no network, no JavaScript library. It shows

* a layer x step heatmap of alpha (layers in model order, rows labelled; a diverging colour scale
  around the well-trained band 2-6; hover names the layer, step and alpha);
* alpha against the step, one line per layer (hover names and highlights a layer), the mean
  in bold, the action decisions as markers under the step axis;
* a sortable, filterable table of each layer's latest measurement (with its step);
* ESD histograms (log-log, fitted tail and xmin marked) of the worst flagged layers, when the
  eigenvalues were kept;
* the decisions table and one summary row per analysis.

Opening ``report.html#selfcheck`` (or ``#selfcheck:<filter text>``) makes the page exercise its
own chart, table filter and sort and write the results as JSON into ``<pre id="selfcheck">``,
which a headless browser's ``--dump-dom`` captures (see ``tests/test_local_report.py``).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence

from ww_callbacks.trackers.base import (
    DECISION_COLUMNS,
    UNJUDGED_FLAGS,
    LayerKeys,
    finite_float,
    is_flagged,
    is_unjudged,
    plain_value,
    summary_scalars,
)

__all__ = ["TABLE_COLUMNS", "SUMMARY_COLUMNS", "build_data", "by_step", "esd_data", "json_text",
           "latest_cells", "page", "render_report", "summary_row"]

#: Columns of the per-layer table (``step``: the analysis that measured the layer, earlier than the
#: latest one for a layer it skipped; ``d_alpha``: change since the layer's previous measurement).
TABLE_COLUMNS = ("name", "step", "type", "N", "M", "alpha", "d_alpha", "alpha_hill", "D", "stable_rank",
                 "log_norm", "num_evals", "warning", "flags")
#: Columns of the per-analysis summary table (the ``summary_scalars`` keys after the first three).
SUMMARY_COLUMNS = ("step", "epoch", "time", "num_layers", "alpha_mean", "alpha_median",
                   "alpha_min", "alpha_max", "log_norm_mean", "num_flagged", "num_under_trained",
                   "num_over_trained")
#: WeightWatcher's band: alpha < 2 over-trained, alpha > 6 under-trained.
ALPHA_LOW, ALPHA_HIGH = 2.0, 6.0
#: Eigenvalues at or below this are not fitted nor plotted (as ``ww_core.plots.EVALS_THRESH``).
EVALS_THRESH = 1e-5
_ASSETS = os.path.dirname(os.path.abspath(__file__))


@lru_cache(maxsize=None)
def _asset(name: str) -> str:
    with open(os.path.join(_ASSETS, name), encoding="utf-8") as fh:
        return fh.read()


def _num(value: Any, digits: int = 4) -> Optional[float]:
    """A finite value rounded to ``digits`` significant digits (a short JSON number), else None."""
    value = finite_float(value)
    if value is None:
        return None
    out = float(f"{value:.{digits}g}")
    return int(out) if out.is_integer() and abs(out) < 1e15 else out


def _cell(value: Any) -> Any:
    value = plain_value(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _num(value)
    return "" if value is None else str(value)


def flags_of(row: Dict[str, Any]) -> str:
    """The ``flags`` cell of a row as ``"a,b"`` (``""`` when none)."""
    flags = plain_value(row.get("flags", ""))
    return "" if flags is None else str(flags)


def by_step(history: Sequence[Dict[str, Any]]) -> "OrderedDict[int, List[Dict[str, Any]]]":
    """The rows of ``history`` grouped by step, steps ascending, rows in their logged order."""
    groups: "OrderedDict[int, List[Dict[str, Any]]]" = OrderedDict()
    for row in sorted(history, key=lambda r: r["step"]):
        groups.setdefault(int(row["step"]), []).append(row)
    return groups


def _thin(n: int, keep: int) -> List[int]:
    """At most ``keep`` indices of ``range(n)``, evenly spread, first and last included."""
    if n <= keep or keep < 2:
        return list(range(n))
    return sorted({round(i * (n - 1) / (keep - 1)) for i in range(keep)})


def _severity(layer: Any) -> float:
    alpha = finite_float(getattr(layer, "alpha", None))
    if alpha is None:
        return math.inf
    return max(ALPHA_LOW - alpha, alpha - ALPHA_HIGH, 0.0)


def esd_data(result: Any, limit: int = 12, bins: int = 40) -> List[Dict[str, Any]]:
    """Log-binned ESD histograms of the flagged layers of ``result`` that kept eigenvalues.

    Args:
        result: a :class:`ww_core.AnalysisResult` (``analyze(..., keep_evals=True)``) or None.
        limit: at most this many layers, the worst first (failed fit, then the farthest
            outside 2-6).
        bins: log-spaced bins per histogram.

    Returns:
        One dict per layer: ``name``, ``alpha``, ``xmin``, ``xmax``, ``D``, ``flags``, ``n``
        (eigenvalues drawn), ``tail`` (their share >= xmin), ``edges`` and ``density``.
    """
    import numpy as np

    layers = [lay for lay in getattr(result, "layers", None) or ()
              if getattr(lay, "flags", ()) and getattr(lay, "evals", None) is not None]
    # layers that could not be judged (only too-few-evals) after the others
    layers.sort(key=lambda lay: (is_unjudged(lay.flags), -_severity(lay), -len(lay.flags)))
    out = []
    for lay in layers[:max(int(limit), 0)]:
        ev = np.asarray(lay.evals, dtype=float).ravel()
        ev = ev[np.isfinite(ev) & (ev > EVALS_THRESH)]
        if ev.size == 0:
            continue
        lo, hi = float(ev.min()), float(ev.max())
        if hi <= lo:
            lo, hi = lo / 1.1, hi * 1.1
        edges = np.logspace(math.log10(lo), math.log10(hi), bins + 1)
        counts, _ = np.histogram(ev, bins=edges)
        density = counts / (ev.size * np.diff(edges))
        xmin = finite_float(lay.xmin)
        out.append({
            "name": str(lay.name), "alpha": _num(lay.alpha), "xmin": _num(xmin),
            "xmax": _num(lay.xmax), "D": _num(lay.D), "flags": ",".join(lay.flags),
            "n": int(ev.size),
            "tail": _num(np.count_nonzero(ev >= xmin) / ev.size) if xmin else None,
            "edges": [_num(e) for e in edges], "density": [_num(d) for d in density]})
    return out


def latest_cells(index: int, row: Dict[str, Any], before: Optional[float]) -> list:
    """One row of the latest table: the layer's index, then :data:`TABLE_COLUMNS` of ``row``
    (``d_alpha`` against ``before``, the layer's previous alpha)."""
    cur = finite_float(row.get("alpha"))
    cells: list = [index]
    for col in TABLE_COLUMNS:
        if col == "d_alpha":
            cells.append(_num(cur - before) if cur is not None and before is not None else None)
        elif col == "flags":
            cells.append(flags_of(row))
        else:
            cells.append(_cell(row.get(col)))
    return cells


def summary_row(step: int, rows: List[Dict[str, Any]], summary: Optional[Dict[str, Any]]) -> list:
    """The :data:`SUMMARY_COLUMNS` of one analysis (its rows and its stored summary, if any)."""
    return _summary_row(step, rows, summary)


def _summary_row(step: int, rows: List[Dict[str, Any]], summary: Optional[Dict[str, Any]]) -> list:
    flagged = sum(1 for r in rows if is_flagged(r.get("flags")))
    # as AnalysisResult.summary(): the mean over the successful fits only
    ok = [r for r in rows if r.get("status") == "success" and finite_float(r.get("alpha")) is not None]
    log_norms = [v for v in (finite_float(r.get("log_norm")) for r in ok) if v is not None]
    base = {"num_layers": len(rows), "num_flagged": flagged,
            "log_norm": sum(log_norms) / len(log_norms) if log_norms else None}
    scal = summary_scalars(rows, dict(base, **(summary or {})))
    return [step, rows[0].get("epoch"), _num(rows[0].get("time"), 12)] + \
        [_num(scal.get(k)) for k in SUMMARY_COLUMNS[3:]]


def build_data(history: Sequence[Dict[str, Any]], *, title: str = "WeightWatcher report",
               decisions: Sequence[Dict[str, Any]] = (), esd: Sequence[Dict[str, Any]] = (),
               esd_step: Optional[int] = None, esd_note: str = "",
               summaries: Optional[Dict[int, Dict[str, Any]]] = None,
               max_steps: int = 300, max_decisions: int = 1000) -> Dict[str, Any]:
    """The JSON the page draws (every list in model order / step order).

    Args:
        history: every row so far (``ww_core.COLUMNS`` plus ``step``, ``epoch``, ``time``).
        title: the page heading.
        decisions: rows of :func:`ww_callbacks.trackers.base.decision_rows`.
        esd: :func:`esd_data` of an analysis; ``esd_step`` its step; ``esd_note`` shown instead
            when there is none.
        summaries: ``AnalysisResult.summary()`` (plus the controller's timings) per step, when known.
        max_steps: the heatmap and chart show at most this many analyses (evenly thinned, the
            latest always kept); the tables are complete.
        max_decisions: the decisions table holds the newest this many (the step markers count
            them all).
    """
    groups = by_step(history)
    keys = LayerKeys()
    for rows in groups.values():
        keys.update(str(r.get("name")) for r in rows)
    names = [name for name, _ in keys.items()]
    index = {name: i for i, name in enumerate(names)}
    types = [""] * len(names)
    steps = list(groups)
    shown = [steps[i] for i in _thin(len(steps), max_steps)]
    alpha = [[None] * len(shown) for _ in names]
    unjudged: List[List[int]] = []      # [layer, column] of fits on too few eigenvalues
    for j, step in enumerate(shown):
        for row in groups[step]:
            i = index[str(row.get("name"))]
            alpha[i][j] = _num(row.get("alpha"))
            if is_unjudged(row.get("flags")):
                unjudged.append([i, j])
            types[i] = types[i] or str(row.get("type") or "")
    mean = []
    for j in range(len(shown)):
        vals = [a[j] for a in alpha if a[j] is not None]
        mean.append(_num(sum(vals) / len(vals)) if vals else None)

    last_step = steps[-1] if steps else None
    newest: Dict[str, Dict[str, Any]] = {}      # each layer's latest row and the alpha before it
    before: Dict[str, Optional[float]] = {}
    for rows in groups.values():
        for row in rows:
            name = str(row.get("name"))
            if name in newest:
                before[name] = finite_float(newest[name].get("alpha"))
            newest[name] = row
    latest = [latest_cells(index[name], row, before.get(name)) for name, row in newest.items()]
    latest.sort(key=lambda cells: cells[0])
    summaries = summaries or {}
    per_step: "OrderedDict[int, Dict[str, int]]" = OrderedDict()
    for d in decisions:
        kinds = per_step.setdefault(int(d["step"]), {})
        kinds[d["action"]] = kinds.get(d["action"], 0) + 1
    kept = list(decisions)[-max_decisions:] if max_decisions > 0 else []
    return {
        "title": title, "updated": _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "band": [ALPHA_LOW, ALPHA_HIGH], "layers": names, "types": types,
        "num_analyses": len(steps), "steps": shown, "alpha": alpha, "mean": mean,
        "unjudged": unjudged, "unjudged_flags": list(UNJUDGED_FLAGS),
        "latest_step": last_step,
        "latest_epoch": groups[last_step][0].get("epoch") if steps else None,
        "columns": ["#"] + list(TABLE_COLUMNS), "latest": latest,
        "summary_columns": list(SUMMARY_COLUMNS),
        "summary": [_summary_row(s, groups[s], summaries.get(s)) for s in steps],
        "decision_columns": list(DECISION_COLUMNS),
        "decisions": [[_cell(d.get(c)) for c in DECISION_COLUMNS] for d in kept],
        "num_decisions": len(decisions),
        "decision_steps": [[st, sum(k.values()), ", ".join(f"{a} x{n}" for a, n in k.items())]
                           for st, k in sorted(per_step.items())],
        "esd": list(esd), "esd_step": esd_step, "esd_note": esd_note,
    }


def json_text(data: Any) -> str:
    """Compact, strict JSON that is also safe inside an HTML ``<script>`` element."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def render_report(data: Dict[str, Any]) -> str:
    """The HTML page for :func:`build_data`'s ``data`` (static frame, data, inline CSS and JS)."""
    esc = html.escape
    step, epoch = data.get("latest_step"), data.get("latest_epoch")
    n_flag = sum(1 for r in data["latest"] if is_flagged(r[-1]))
    if step is None:
        head = "<p>No analysis yet.</p>"
    else:
        head = (f"<h2 id='latest-head'>Latest analysis: step {esc(str(step))}, epoch "
                f"{esc(str(epoch))}</h2><p class='meta'>{len(data['latest'])} layers, {n_flag} "
                f"flagged &middot; {data['num_analyses']} analyses &middot; "
                f"{data['num_decisions']} decisions</p>")
    scripts = f'<script type="application/json" id="ww-data">{json_text(data)}</script>'
    return page(str(data.get("title", "")), head, scripts, data["updated"])


def page(title: str, head: str, scripts: str, updated: str = "") -> str:
    """The report's static frame around ``head`` (HTML) and the ``scripts`` that bring its data."""
    esc = html.escape
    title = esc(title)
    updated = f"Updated {esc(updated)} &middot; " if updated else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{title}</title><style>{_asset("report.css")}</style></head>
<body><h1>{title}</h1>
<p class="meta">{updated}data:
<a href="history.csv">history.csv</a>, <a href="history.jsonl">history.jsonl</a>,
<a href="alpha_over_time.png">alpha_over_time.png</a></p>
{head}<div id="cards"></div>
<noscript><p>This report draws its charts and tables with JavaScript; the data are in
history.csv and alpha_over_time.png.</p></noscript>
<nav><a href="#s-heat">heatmap</a> <a href="#s-chart">alpha over time</a>
<a href="#s-table">layers</a> <a href="#s-esd">ESDs</a> <a href="#s-dec">decisions</a>
<a href="#s-sum">analyses</a></nav>
<section id="s-heat"><h2>Alpha per layer and step</h2>
<p class="hint">Layers in model order (top = first). Colour: red &lt; 2 (over-trained),
green 2&ndash;6 (well trained), blue &gt; 6 (under-trained), grey: no fit, light grey: not
analysed at that step (layer rotation), purple: too few
eigenvalues to judge (flag too-few-evals; e.g. a LoRA update of rank 8). Dots: decisions.
Hover for values, click a row to highlight the layer below.</p>
<div id="heat-legend"></div><div id="heat-wrap"><canvas id="heatmap"></canvas></div>
<p class="meta" id="heat-note"></p></section>
<section id="s-chart"><h2>Alpha over time</h2>
<p class="hint">One line per layer, the mean in black; hover a line to name it, click to keep it
highlighted. Triangles under the axis: decisions (hover for details).</p>
<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="100%" height="440"></svg>
<div id="chart-legend" class="meta"></div></section>
<section id="s-table"><h2>Layers at the latest analysis</h2>
<div class="tools"><input id="filter" type="search" placeholder="filter by name" size="40">
<label><input id="only-flagged" type="checkbox"> flagged only</label>
<span id="count" class="meta"></span></div>
<div class="scroll"><table id="layers" class="grid"><thead></thead><tbody></tbody></table></div>
</section>
<section id="s-esd"><h2>ESDs of flagged layers</h2><p class="meta" id="esd-note"></p>
<div id="esd"></div></section>
<section id="s-dec"><h2>Decisions</h2><p class="meta" id="dec-note"></p><div class="scroll">
<table id="decisions" class="grid"><thead></thead><tbody></tbody></table></div></section>
<section id="s-sum"><h2>Summary per analysis</h2><div class="scroll"><table id="summary" class="grid">
<thead></thead><tbody></tbody></table></div></section>
<div id="tip"></div><pre id="selfcheck" hidden></pre>
{scripts}
<script>{_asset("report.js")}</script>
</body></html>
"""
