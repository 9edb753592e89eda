"""Helpers shared by the action policies (no framework imports)."""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

#: Metrics a policy may read from a ``LayerResult`` / history row.
METRICS = ("alpha", "alpha_hill")

Patterns = Union[None, str, Sequence[str]]


def finite(value: Any) -> bool:
    """True for a real, finite number (not bool, not None, not nan/inf)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def compile_patterns(name: str, patterns: Patterns) -> List["re.Pattern[str]"]:
    """Compile a regex or a list of regexes, with a clear error naming the argument."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{name} must be a regex or a list of regexes, got {p!r}")
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise ValueError(f"{name}: invalid regex {p!r}: {exc}") from None
    return out


def matches(patterns: Sequence["re.Pattern[str]"], name: str) -> bool:
    return any(p.search(name) for p in patterns)


def series_from_rows(rows: Iterable[Mapping[str, Any]], metric: str = "alpha") -> Dict[str, List[float]]:
    """Per-layer series of ``metric`` from history rows, in step order (one value per analysis).

    Args:
        rows: ``controller.history.rows`` (dicts with ``step``, ``name`` and the metric).
        metric: ``"alpha"`` or ``"alpha_hill"``.

    Example:
        >>> series_from_rows([{"step": 1, "name": "fc", "alpha": 3.0},
        ...                   {"step": 2, "name": "fc", "alpha": 2.9}])
        {'fc': [3.0, 2.9]}
    """
    check_metric(metric)
    by_step: Dict[str, Dict[int, float]] = {}
    for row in rows:
        value = row.get(metric)
        by_step.setdefault(str(row["name"]), {})[int(row.get("step", 0))] = (
            float(value) if finite(value) else math.nan)
    return {name: [v for _, v in sorted(steps.items())] for name, steps in by_step.items()}


def mean_metric(result: Any, metric: str = "alpha", names: Optional[Iterable[str]] = None) -> float:
    """Mean of the finite ``metric`` values over the layers of an ``AnalysisResult`` (nan if none)."""
    check_metric(metric)
    wanted = set(names) if names is not None else None
    values = [float(getattr(l, metric)) for l in getattr(result, "layers", result)
              if (wanted is None or l.name in wanted) and finite(getattr(l, metric, None))]
    return sum(values) / len(values) if values else math.nan


def normalise_mode(name: str, mode: Any, aliases: Mapping[Any, str]) -> str:
    """Map user spellings (``False``/``"off"``, ``"suggest"``, ``True``/``"apply"``) to one word."""
    for key, value in aliases.items():
        if mode is key or (not isinstance(mode, bool) and not isinstance(key, bool) and mode == key):
            return value
    allowed = ", ".join(repr(k) for k in aliases)
    raise ValueError(f"{name} must be one of {allowed}; got {mode!r}")
