"""Rank several models by model-level spectral metrics (WeightWatcher's ``get_summary`` style).

Lower is better for each metric here: a smaller weighted alpha (``alpha_weighted``), alpha-norm
(``log_alpha_norm``) or mean alpha means heavier-tailed, better-correlated layers, and fewer
flagged layers fewer suspect ones. A ranking is meaningful only among models of one architecture
family (same layer names and shapes, e.g. checkpoints or fine-tunes of one base model): across
architectures the metrics average different numbers of layers of different sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from .model_source import result_of
from .result import AnalysisResult

__all__ = ["RANK_METRICS", "Ranking", "rank_models"]

#: Metrics a ranking can be by; for each, lower is better.
RANK_METRICS = ("alpha_weighted", "log_alpha_norm", "alpha", "num_flagged")


@dataclass
class Ranking:
    """Models ranked by one metric: ``rows`` best first (``rank`` 1), each a dict with ``model``,
    ``rank``, the :data:`RANK_METRICS`, ``num_layers`` and ``identity``."""

    by: str
    rows: List[Dict[str, Any]]
    results: List[AnalysisResult]

    @property
    def same_architecture(self) -> bool:
        """True when every model has the same layer names and shapes."""
        return len({r["identity"] for r in self.rows}) <= 1

    def notes(self) -> List[str]:
        if self.same_architecture:
            return []
        return ["the models differ in their layer names or shapes: a ranking is meaningful only "
                "within one architecture family"]

    def to_dict(self) -> Dict[str, Any]:
        def num(x: Any) -> Any:
            return None if isinstance(x, float) and not math.isfinite(x) else x

        return {"by": self.by, "lower_is_better": True, "same_architecture": self.same_architecture,
                "notes": self.notes(), "models": [{k: num(v) for k, v in r.items()} for r in self.rows]}

    def to_text(self, markdown: bool = False) -> str:
        """An aligned table (or a Markdown one) best first, with notes."""
        header = ["rank", "model", "alpha_weighted", "log_alpha_norm", "alpha (mean)", "flagged",
                  "layers"]
        cells = [[str(r["rank"]), str(r["model"]), _f(r["alpha_weighted"]), _f(r["log_alpha_norm"]),
                  _f(r["alpha"]), str(r["num_flagged"]), str(r["num_layers"])] for r in self.rows]
        title = f"ranked by {self.by} (lower is better)"
        if markdown:
            out = [f"### Models {title}", "", "| " + " | ".join(header) + " |",
                   "|" + "---|" * len(header)]
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
            out += [""] + [f"- note: {n}" for n in self.notes()] if self.notes() else []
            return "\n".join(out)
        widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(header)]
        lines = [f"models {title}:", ""]
        for row in [header, ["-" * w for w in widths]] + cells:
            lines.append("  ".join(c.ljust(w) if i == 1 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        lines += [""] + [f"note: {n}" for n in self.notes()] if self.notes() else []
        return "\n".join(lines)


def _f(x: float) -> str:
    return f"{x:.4f}" if isinstance(x, float) and math.isfinite(x) else "nan"


def rank_results(results: Sequence[AnalysisResult], by: str = "alpha_weighted",
                 labels: Optional[Sequence[str]] = None) -> Ranking:
    """Rank analyses already made (see :func:`rank_models`)."""
    if by not in RANK_METRICS:
        raise ValueError(f"by must be one of {', '.join(RANK_METRICS)}, got {by!r}")
    rows = []
    for i, res in enumerate(results):
        s = res.summary()
        label = labels[i] if labels else (res.meta.get("source") or f"model {i + 1}")
        rows.append({"model": label, "alpha_weighted": s["alpha_weighted"],
                     "log_alpha_norm": s["log_alpha_norm"], "alpha": s["alpha"],
                     "num_flagged": s["num_flagged"], "num_layers": s["num_layers"],
                     "identity": res.identity})

    def key(row: Dict[str, Any]) -> Any:
        value = float(row[by])
        return (not math.isfinite(value), value if math.isfinite(value) else 0.0)

    order = sorted(range(len(rows)), key=lambda i: key(rows[i]))
    ranked = []
    for place, i in enumerate(order, start=1):
        ranked.append({"rank": place, **rows[i]})
    return Ranking(by, ranked, [results[i] for i in order])


def rank_models(models: Sequence[Any], by: str = "alpha_weighted",
                labels: Optional[Sequence[str]] = None, **analyze_options: Any) -> Ranking:
    """Analyse several models and rank them by a model-level metric, best (lowest) first.

    Args:
        models: each a model, a path, a cached Hugging Face id or a saved analysis (as
            :func:`ww_core.compare`'s sides).
        by: one of :data:`RANK_METRICS`.
        labels: a name per model (default: the path or class name).
        **analyze_options: keywords of :func:`ww_core.analyze`.

    Raises:
        ValueError: fewer than two models, an unknown ``by`` or an invalid option.
        FileNotFoundError, ww_core.SourceError: a model that cannot be read.

    Example:
        >>> import numpy as np, ww_core
        >>> rng = np.random.default_rng(0)
        >>> a = {"fc.weight": rng.standard_normal((300, 100))}
        >>> b = {"fc.weight": rng.standard_normal((300, 100)) @ np.diag(np.arange(1, 101.0) ** -1)}
        >>> [row["model"] for row in ww_core.rank_models([a, b], labels=["a", "b"]).rows]
        ['b', 'a']
    """
    if len(models) < 2:
        raise ValueError(f"ranking needs at least two models, got {len(models)}")
    if by not in RANK_METRICS:
        raise ValueError(f"by must be one of {', '.join(RANK_METRICS)}, got {by!r}")
    results = [result_of(m, analyze_options, labels[i] if labels else None)
               for i, m in enumerate(models)]
    return rank_results(results, by, labels)
