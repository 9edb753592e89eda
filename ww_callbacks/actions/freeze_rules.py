"""The pieces of auto-freeze that hold no state: bands, the settle test, LoRA adapter updates,
the decision record and the "why nothing froze" message (framework-free).

:class:`~ww_callbacks.actions.FreezePolicy` (``freeze.py``) decides with them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ww_callbacks.actions._common import finite

__all__ = ["PRESETS", "DEFAULT_EXCLUDE_FLAGS", "DEFAULT_ADAPTER_TOL", "relative_range",
           "is_adapter", "update_size", "FreezeDecision", "judge", "released", "new_why", "explain"]

#: Well-trained alpha bands (CSN alpha) per domain. ``weightwatcher`` is its 2 / 6 rule;
#: ``vision`` follows "well-trained CNN layers sit near 2", ``nlp`` the 3–4 typical of trained
#: transformer layers. These are starting points, not validated thresholds.
PRESETS: Dict[str, Tuple[float, float]] = {
    "weightwatcher": (2.0, 6.0),
    "vision": (2.0, 3.0),
    "nlp": (3.0, 4.0),
}

#: Flags that disqualify a layer from freezing (and release it with ``unfreeze=True``).
DEFAULT_EXCLUDE_FLAGS: Tuple[str, ...] = (
    "correlation-trap", "rank-collapse", "non-finite", "fit-failed", "too-few-evals")

#: Default ``adapter_tol``: largest relative range of a LoRA update's Frobenius norm over the
#: last two analyses for the adapter to count as settled (``docs/actions.md`` has the run).
DEFAULT_ADAPTER_TOL = 0.15

#: The name ``ww_core`` gives a LoRA adapter's update ``B·A`` (``analyze(peft=True)``).
_ADAPTER = re.compile(r"\.lora_BA(\.[^.]+)?$")


def relative_range(values: Sequence[float]) -> float:
    """``(max - min) / |mean|`` of ``values``; ``inf`` when any value is not finite or the mean is 0.

    Example:
        >>> round(relative_range([3.0, 3.1, 2.95]), 4)
        0.0497
    """
    if not values or not all(finite(v) for v in values):
        return math.inf
    mean = sum(values) / len(values)
    if mean == 0:
        return math.inf
    return (max(values) - min(values)) / abs(mean)


def is_adapter(name: str) -> bool:
    """Whether ``name`` is a LoRA adapter's update ``B·A`` (``<module>.lora_BA.<adapter>``).

    Example:
        >>> is_adapter("encoder.layer.0.attention.self.query.lora_BA.default"), is_adapter("fc")
        (True, False)
    """
    return bool(_ADAPTER.search(str(name)))


def update_size(layer: Any) -> float:
    """The Frobenius norm of a layer's matrix, ``sqrt(sum of eigenvalues)``, from its
    ``log_norm`` (``log10`` of that sum, which for ``B·A`` holds all its ``r`` non-zero
    eigenvalues); ``nan`` when unknown.

    Example:
        >>> from types import SimpleNamespace as L
        >>> update_size(L(log_norm=2.0))
        10.0
    """
    value = getattr(layer, "log_norm", math.nan)
    return math.sqrt(10.0 ** float(value)) if finite(value) else math.nan


@dataclass
class FreezeDecision:
    """What one analysis decided. ``freeze``/``unfreeze`` are layer names in model order.

    In ``"suggest"`` mode the names are recommendations only; in ``"off"`` mode both are empty.
    ``reasons`` explains every name in ``freeze`` and ``unfreeze``.
    """

    freeze: List[str] = field(default_factory=list)
    unfreeze: List[str] = field(default_factory=list)
    reasons: Dict[str, str] = field(default_factory=dict)
    mode: str = "off"
    step: Optional[int] = None
    epoch: Optional[int] = None

    def __bool__(self) -> bool:
        return bool(self.freeze or self.unfreeze)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable form (the decisions log and tracker events use it)."""
        return {"mode": self.mode, "step": self.step, "epoch": self.epoch,
                "freeze": list(self.freeze), "unfreeze": list(self.unfreeze),
                "reasons": dict(self.reasons)}


def released(policy: Any, layers: Sequence[Any], frozen: set, decision: FreezeDecision) -> List[str]:
    """``unfreeze=True``: add to ``decision`` the frozen layers that left the band or got an
    excluded flag; returns ``decision.unfreeze``."""
    lo, hi = policy.band
    m = policy.unfreeze_margin
    for layer in layers:
        if layer.name not in frozen:
            continue
        value = getattr(layer, policy.metric, math.nan)
        flag = next((f for f in getattr(layer, "flags", ()) if f in policy.exclude_flags), None)
        if flag:
            reason = f"flag {flag}"
        elif not finite(value):
            reason = f"{policy.metric} not finite"
        elif value < lo - m or value > hi + m:
            reason = f"{policy.metric} {value:.3f} left band [{lo:g}, {hi:g}]"
            reason += f" (margin {m:g})" if m else ""
        else:
            continue
        decision.unfreeze.append(layer.name)
        decision.reasons[layer.name] = reason
    return decision.unfreeze


def judge(policy: Any, layer: Any, history_by_layer: Mapping[str, Sequence[float]],
          releasing: Sequence[str]) -> Tuple[str, Any]:
    """``(verdict, detail)`` of a layer not frozen, for ``policy`` (rules 1-4 of ``freeze.py``):
    ``"ok"`` (detail: the reason it freezes), ``"protected"``, ``"excluded"`` (detail: the
    flag), ``"rider"`` (too small to judge), ``"short"`` (too few analyses), ``"unsettled"`` /
    ``"update"`` (detail: the spread) or ``"band"`` (detail: the value)."""
    name = layer.name
    if name in releasing or policy.is_protected(name):
        return "protected", None
    if is_adapter(name):   # judged on the size of B·A, not on an r-eigenvalue fit
        series = policy.sizes.get(name, [])[-2:]
        if not series or not finite(series[-1]):
            return "excluded", "non-finite"
        if len(series) < 2:
            return "short", None
        spread = relative_range(series)
        if spread > policy.adapter_tol:
            return "update", spread
        return "ok", (f"LoRA update norm {series[-1]:.4g}, settled: relative range "
                      f"{spread:.4f} <= adapter_tol {policy.adapter_tol:g} over the last 2 "
                      f"analyses")
    flags = [f for f in getattr(layer, "flags", ()) if f in policy.exclude_flags]
    if flags:
        return ("rider" if flags == ["too-few-evals"] else "excluded"), flags[0]
    value = getattr(layer, policy.metric, math.nan)
    if getattr(layer, "status", "success") != "success" or not finite(value):
        return "excluded", "fit-failed"
    series = list(history_by_layer.get(name, ()))[-policy.window:]
    if len(series) < policy.window:
        return "short", None
    spread = relative_range(series)
    if spread > policy.tol:
        return "unsettled", spread
    lo, hi = policy.band
    if not lo <= value <= hi:
        return "band", value
    where = f" in [{lo:g}, {hi:g}]" if math.isfinite(lo) else ""
    return "ok", (f"{policy.metric} {value:.3f}{where}, settled: relative range {spread:.4f} "
                  f"<= {policy.tol:g} over {policy.window} analyses")


def new_why() -> Dict[str, Any]:
    """An empty record of why layers were not candidates, filled at every decision."""
    return {"analyses": 0, "decided": 0, "cap": 1, "num_layers": 0, "protected": [],
            "excluded": Counter(), "eligible": 0}


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def explain(policy: Any, why: Dict[str, Any]) -> str:
    """The reason (and what to change) for a policy that froze nothing; ``why`` is the record
    its decisions filled (see :meth:`FreezePolicy.why_nothing_froze` for the order of tests)."""
    head = f"freeze={policy.mode!r} {'froze' if policy.mode == 'apply' else 'suggested'} no layer: "
    n, window = why["analyses"], policy.window
    if not why["decided"]:
        return head + ("no analysis reached the freeze policy; make the schedule analyse at "
                       f"least window={window} times (e.g. an earlier start_fraction or a "
                       "shorter interval)")
    if "final" in why:
        step, names = why["final"]
        return head + (f"{_names(names)} first met the criterion at the final analysis (step "
                       f"{step}), where freezing saves nothing; analyse more often (a shorter "
                       "interval or an earlier start_fraction) or lower window")
    protected, excluded = why["protected"], why["excluded"]
    if not why["eligible"] and "skipped_adapters" in why:
        count, reason = why["skipped_adapters"]
        return head + (f"{count} LoRA adapter updates were not analysed ({reason}); set the "
                       "callback's min_evals to at most the LoRA rank r")
    if not why["eligible"] and (protected or excluded):
        parts = [f"{c} flagged {f}" for f, c in excluded.most_common()]
        if protected:
            parts.append(f"{len(protected)} protected ({_names(protected)})")
        fix = []
        if excluded:
            fix.append(f"drop {', '.join(repr(f) for f in excluded)} from exclude_flags "
                       f"(now {list(policy.exclude_flags)}) to let such layers freeze on their "
                       f"{policy.metric}")
        if "too-few-evals" in excluded:
            fix[-1] += (" (too-few-evals: fits on fewer than 20 eigenvalues; LoRA adapter "
                        "updates B·A are judged on their size instead and never counted here)")
        if protected:
            fix.append("narrow protect / set protect_head=False")
        return head + (f"every analysed layer was protected or excluded ({'; '.join(parts)}); "
                       + " or ".join(fix))
    if why["cap"] < 1:
        return head + (f"max_share={policy.max_share:g} of {why['num_layers']} analysed layers "
                       "allows none to freeze; raise max_share")
    if n < window:
        return head + (f"only {n} analyses ran, and the settle test needs window={window}; "
                       "analyse more often (a shorter interval or an earlier start_fraction) "
                       "or lower window")
    if "blocked" in why:
        name, blocker = why["blocked"]
        return head + (f"with order='prefix', {blocker} never met the criterion, so {name} "
                       "and the layers after it kept training; use order='any', or protect "
                       f"nothing before {name} that has to stay")
    if "best_update" in why and "best_spread" not in why:
        spread, name = why["best_update"]
        return head + (f"no LoRA adapter update settled: the smallest relative range of an "
                       f"update's norm over 2 analyses was {spread:.4f} ({name}), above "
                       f"adapter_tol={policy.adapter_tol:g}; raise adapter_tol, or train (and "
                       "analyse) longer")
    if "best_spread" in why and "out_of_band" not in why:
        spread, name = why["best_spread"]
        return head + (f"no layer's {policy.metric} settled: the smallest relative range over "
                       f"{window} analyses was {spread:.4f} ({name}), above tol={policy.tol:g}; "
                       "raise tol, or train (and analyse) longer")
    if "out_of_band" in why:
        name, value = why["out_of_band"]
        lo, hi = policy.band
        return head + (f"the layers that settled have {policy.metric} outside band "
                       f"[{lo:g}, {hi:g}] (e.g. {name}: {value:.3f}); widen band or set "
                       "band=None")
    return head + "no layer met the criterion (see docs/actions.md for the rules)"
