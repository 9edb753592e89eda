"""The interface every tracker backend implements."""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional

from ww_callbacks.values import finite_float, plain_value  # noqa: F401  (shared by the trackers)


class Tracker:
    """Receives each finished analysis. Subclasses override what they support.

    The controller calls trackers only on global rank 0, catches every exception a tracker raises
    (a failing tracker is disabled after reporting once, the local record keeps going) and calls
    :meth:`close` once at the end of training.

    Args of :meth:`log_analysis`:
        step: the trainer's global step the analysed weights belong to.
        epoch: the epoch (0-based) at that step.
        rows: one dict per analysed layer: ``ww_core.COLUMNS`` plus ``step`` and ``epoch``.
        summary: ``AnalysisResult.summary()`` of this analysis.
        result: the :class:`ww_core.AnalysisResult` itself (eigenvalues available when the
            controller kept them, for ESD images of flagged layers).
        history: every row logged so far (all analyses, oldest first), for curve charts.
    """

    name = "tracker"

    def log_analysis(self, *, step: int, epoch: int, rows: List[Dict[str, Any]],
                     summary: Dict[str, float], result: Any, history: List[Dict[str, Any]]) -> None:
        raise NotImplementedError

    def log_event(self, *, step: int, kind: str, payload: Dict[str, Any]) -> None:
        """An action or recommendation (freeze, learning-rate factors, stop). Optional."""

    def close(self) -> None:
        """Flush and release; never closes a run the trainer owns."""


# -- helpers shared by the backends: metric keys and plain values ------------------------------
#: Per-layer columns logged as scalars (when finite) by the scalar trackers.
LAYER_METRICS = (
    "alpha", "alpha_hill", "alpha_weighted", "log_alpha_norm", "D", "log_norm", "log_spectral_norm",
    "spectral_norm", "stable_rank", "entropy", "num_pl_spikes", "rand_distance", "num_traps",
    "mp_softrank",
)


def metric_key(prefix: str, layer: str, metric: str) -> str:
    """``<prefix>/<layer>/<metric>``."""
    return f"{prefix}/{layer}/{metric}"


def flat_metrics(rows: Iterable[Dict[str, Any]], summary: Dict[str, Any], prefix: str = "ww",
                 metrics: Iterable[str] = LAYER_METRICS) -> Dict[str, float]:
    """Scalars of one analysis: ``<prefix>/<layer>/<metric>`` and ``<prefix>/summary/<metric>``.

    Non-finite values (``alpha`` of a failed fit is ``nan``) and non-numeric columns are left out,
    so every backend receives the same plottable set.
    """
    out: Dict[str, float] = {}
    metrics = tuple(metrics)
    for row in rows:
        name = str(row.get("name"))
        for metric in metrics:
            value = finite_float(row.get(metric))
            if value is not None:
                out[metric_key(prefix, name, metric)] = value
    for metric, value in (summary or {}).items():
        value = finite_float(value)
        if value is not None:
            out[f"{prefix}/summary/{metric}"] = value
    return out


# -- flags: what counts as flagged in the summaries, the report and the alerts ----------------
#: A layer whose flags are all among these could not be judged (e.g. a rank-8 LoRA update fitted
#: on 8 eigenvalues): it is shown with its flag but not counted or coloured as flagged.
UNJUDGED_FLAGS = ("too-few-evals",)


def flag_names(value: Any) -> List[str]:
    """A row's ``flags`` (tuple, list or ``"a,b"`` string) as a list of names.

    Example:
        >>> flag_names("too-few-evals,fit-failed"), flag_names(("over-trained",)), flag_names(None)
        (['too-few-evals', 'fit-failed'], ['over-trained'], [])
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [f for f in (p.strip() for p in value.split(",")) if f]
    try:
        return [str(f) for f in value if f]
    except TypeError:
        return []


def is_flagged(flags: Any) -> bool:
    """True when ``flags`` hold a flag beyond :data:`UNJUDGED_FLAGS` (a layer to look at).

    Example:
        >>> is_flagged(("too-few-evals",)), is_flagged("too-few-evals,fit-failed"), is_flagged(())
        (False, True, False)
    """
    return any(f not in UNJUDGED_FLAGS for f in flag_names(flags))


def is_unjudged(flags: Any) -> bool:
    """True when ``flags`` are non-empty and all among :data:`UNJUDGED_FLAGS`."""
    names = flag_names(flags)
    return bool(names) and not is_flagged(names)


# -- keys that scale: one section per metric, layers in model order --------------------------
#: Summary keys the controller adds to ``AnalysisResult.summary()`` and that are passed through.
_PASSED = ("num_frozen", "analysis_seconds", "hook_seconds", "overhead", "drift_newly_flagged",
           "drift_regressions", "drift_max_abs_delta_alpha", "drift_max_spectrum_change",
           "drift_delta_alpha_weighted")
#: The summary section (``ww/<key>``): a few scalars per analysis (``drift_*`` with a reference).
SUMMARY_KEYS = ("alpha_mean", "alpha_median", "alpha_min", "alpha_max", "log_norm_mean",
                "num_layers", "num_flagged", "num_under_trained", "num_over_trained") + _PASSED

_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")


class LayerKeys:
    """Stable, sortable, W&B-safe key segments for layer names, in model order.

    ``encoder.layer.10.attention.self.query`` becomes ``07_encoder_layer_10_attention_self_query``:
    a zero-padded index (the layer's position in the first analysis that saw it, so
    alphabetical order is model order) and the name with every run of characters outside
    ``[A-Za-z0-9_]`` replaced by ``_``. The index width is fixed at the first analysis (at
    least 2 digits); layers first seen later get the next indices.

    Example:
        >>> keys = LayerKeys()
        >>> keys.update(["embed", "encoder.layer.0.attention.self.query", "lm-head"])
        >>> keys["encoder.layer.0.attention.self.query"], keys["lm-head"]
        ('01_encoder_layer_0_attention_self_query', '02_lm_head')
        >>> metric_section("alpha"), metric_section("log_norm")
        ('ww_alpha', 'ww_log_norm')
    """

    def __init__(self) -> None:
        self._keys: Dict[str, str] = {}
        self._width = 0

    def update(self, names: Iterable[str]) -> None:
        """Register ``names`` (model order) not seen before."""
        names = [str(n) for n in names]
        if not self._width:
            self._width = max(2, len(str(max(len(names) - 1, 0))))
        for name in names:
            if name not in self._keys:
                slug = _UNSAFE.sub("_", name).strip("_") or "layer"
                self._keys[name] = f"{len(self._keys):0{self._width}d}_{slug}"

    def __getitem__(self, name: str) -> str:
        if name not in self._keys:
            self.update([name])
        return self._keys[name]

    def __len__(self) -> int:
        return len(self._keys)

    def items(self) -> List[tuple]:
        """``(layer name, key)`` pairs in index order."""
        return list(self._keys.items())


def metric_section(metric: str, prefix: str = "ww") -> str:
    """The section of a per-layer metric: ``ww_alpha``, ``ww_stable_rank``, ..."""
    return f"{prefix}_{metric}"


def summary_scalars(rows: Iterable[Dict[str, Any]], summary: Dict[str, Any]) -> Dict[str, float]:
    """The :data:`SUMMARY_KEYS` of one analysis (only those with a finite value).

    ``summary`` is ``AnalysisResult.summary()`` plus what the controller adds (``hook_seconds``,
    ``analysis_seconds``, ``num_frozen``); the alpha statistics are computed from ``rows``, and so
    are the counts of flags: ``num_flagged`` leaves out layers that could not be judged (only
    ``too-few-evals``, see :func:`is_flagged`), ``num_over_trained``/``num_under_trained`` count the
    ``flags`` (so a fit on too few eigenvalues is neither, whatever its ``warning`` column says).

    Example:
        >>> rows = [{"alpha": 3.0, "flags": ()}, {"alpha": 7.0, "flags": ("under-trained",)},
        ...         {"alpha": float("nan"), "flags": ()}]
        >>> out = summary_scalars(rows, {"num_layers": 3, "num_flagged": 1, "log_norm": 1.5})
        >>> out["alpha_mean"], out["alpha_median"], out["num_under_trained"], out["log_norm_mean"]
        (5.0, 5.0, 1.0, 1.5)
    """
    rows = list(rows)
    alphas = sorted(v for v in (finite_float(r.get("alpha")) for r in rows) if v is not None)
    out: Dict[str, Any] = {}
    if alphas:
        mid = len(alphas) // 2
        out.update(alpha_mean=sum(alphas) / len(alphas), alpha_min=alphas[0], alpha_max=alphas[-1],
                   alpha_median=alphas[mid] if len(alphas) % 2 else (alphas[mid - 1] + alphas[mid]) / 2)
    summary = dict(summary or {})
    out["log_norm_mean"] = summary.get("log_norm")
    out["num_layers"] = summary.get("num_layers", len(rows))
    if rows and all("flags" in r for r in rows):
        out["num_flagged"] = sum(1 for r in rows if is_flagged(r.get("flags")))
    else:
        out["num_flagged"] = summary.get("num_flagged")
    out["num_under_trained"] = sum(1 for r in rows if "under-trained" in flag_names(r.get("flags")))
    out["num_over_trained"] = sum(1 for r in rows if "over-trained" in flag_names(r.get("flags")))
    for key in _PASSED:
        out[key] = summary.get(key)
    return {k: f for k in SUMMARY_KEYS if (f := finite_float(out.get(k))) is not None}


# -- decisions: one table format for every tracker --------------------------------------------
#: Columns of the decisions table.
DECISION_COLUMNS = ("step", "layer", "action", "reason", "alpha", "factor")


def decision_rows(step: int, kind: str, payload: Dict[str, Any],
                  alphas: Optional[Dict[str, float]] = None) -> List[Dict[str, Any]]:
    """An action event (``controller.log_event``) as rows of the decisions table.

    Args:
        step: the step of the decision.
        kind: ``freeze``, ``freeze-suggestion``, ``lr-factors``, ``lr-factors-suggestion``,
            ``early-stop``, ``drift`` or another action's kind.
        payload: the event's payload.
        alphas: the latest alpha per layer (for the ``alpha`` column).

    Example:
        >>> decision_rows(40, "freeze", {"freeze": ["fc1"], "unfreeze": [],
        ...                              "reasons": {"fc1": "settled"}}, {"fc1": 3.1})
        [{'step': 40, 'layer': 'fc1', 'action': 'freeze', 'reason': 'settled', 'alpha': 3.1, 'factor': None}]
    """
    alphas = alphas or {}
    payload = dict(payload or {})
    reasons = payload.get("reasons") or {}

    def row(layer: Optional[str], action: str, reason: Any = "", factor: Any = None) -> Dict[str, Any]:
        return {"step": int(step), "layer": layer, "action": action, "reason": str(reason or ""),
                "alpha": finite_float(alphas.get(layer)) if layer else None,
                "factor": finite_float(factor)}

    out: List[Dict[str, Any]] = []
    if kind.startswith("freeze"):
        suffix = "" if kind == "freeze" else " (suggested)"
        out += [row(n, "freeze" + suffix, reasons.get(n)) for n in payload.get("freeze") or ()]
        out += [row(n, "unfreeze" + suffix, reasons.get(n)) for n in payload.get("unfreeze") or ()]
    elif kind.startswith("lr-factors"):
        action = "lr-factor" + ("" if kind == "lr-factors" else " (suggested)")
        out += [row(n, action, "TempBalance", f) for n, f in (payload.get("factors") or {}).items()]
    elif kind == "early-stop":
        out.append(row(None, "early-stop", payload.get("reason")))
    elif kind == "drift":
        regressed = payload.get("regressions") or []
        out += [row(n, "drift", "regression against the reference" if n in regressed
                    else "newly flagged against the reference")
                for n in dict.fromkeys([*regressed, *(payload.get("newly_flagged") or [])])]
    else:
        out.append(row(payload.get("layer"), kind, payload.get("reason", "")))
    return out


def scalars(rows: Iterable[Dict[str, Any]], summary: Dict[str, Any], keys: LayerKeys,
            metrics: Iterable[str] = ("alpha",), prefix: str = "ww") -> Dict[str, float]:
    """The scalars of one analysis under the scalable key scheme.

    ``<prefix>_<metric>/<layer key>`` for each finite per-layer ``metric`` (``keys`` assigns the
    layer keys, in model order) and ``<prefix>/<summary key>`` for :func:`summary_scalars`.

    Example:
        >>> keys = LayerKeys()
        >>> rows = [{"name": "fc.1", "alpha": 3.0, "stable_rank": 2.0}]
        >>> out = scalars(rows, {"num_layers": 1}, keys, metrics=("alpha", "stable_rank"))
        >>> sorted(out)[:3], out["ww/alpha_mean"]
        (['ww/alpha_max', 'ww/alpha_mean', 'ww/alpha_median'], 3.0)
        >>> out["ww_alpha/00_fc_1"], out["ww_stable_rank/00_fc_1"]
        (3.0, 2.0)
    """
    rows = list(rows)
    keys.update(str(r.get("name")) for r in rows)
    out: Dict[str, float] = {}
    for metric in metrics:
        section = metric_section(metric, prefix)
        for row in rows:
            value = finite_float(row.get(metric))
            if value is not None:
                out[f"{section}/{keys[str(row.get('name'))]}"] = value
    out.update({f"{prefix}/{k}": v for k, v in summary_scalars(rows, summary).items()})
    return out


def check_metrics(metrics: Iterable[str]) -> tuple:
    """``metrics`` (a tracker's ``log_metrics=``) as a tuple of per-layer columns, checked.

    Raises:
        ValueError: a name that is not a column of ``ww_core.COLUMNS``.
    """
    from ww_core import COLUMNS

    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in COLUMNS]
    if unknown:
        raise ValueError(f"log_metrics: unknown per-layer column(s) {unknown}; choose from {COLUMNS}")
    return metrics
