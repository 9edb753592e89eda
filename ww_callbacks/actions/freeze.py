"""Early freezing: which layers have a settled alpha (framework-free policy).

A layer is a freeze **candidate** at an analysis when all of these hold:

1. its alpha has **settled**: the last ``window`` values (this analysis included) span a relative
   range ``(max - min) / |mean|`` of at most ``tol``;
2. with a ``band`` (off by default), the latest alpha lies in it: e.g. ``"weightwatcher"`` ``(2, 6)``,
   WeightWatcher's over-/under-trained thresholds; presets in :data:`PRESETS`;
3. the fit succeeded and the layer carries none of ``exclude_flags`` (correlation trap,
   rank collapse, failed/non-finite fit, too few eigenvalues);
4. it is not **protected**: by a ``protect`` regex, or as the output head (by default the last
   analysed layer, in model order);
5. the **share** cap allows it: at most ``floor(max_share * number of analysed layers)`` layers are
   frozen at once. Candidates are taken in model order (front first);
6. with ``order="prefix"`` (the default), every layer before it (among those still analysed) is
   frozen or freezes now; a layer too small to judge (only flag ``too-few-evals``) does not end
   the prefix. The frozen layers always form a prefix of the model, and the torch adapters then
   freeze the whole prefix (its norms and biases too), so that neither the weight nor the input
   gradients nor an autograd graph are computed through it. ``order="any"`` takes any candidate.

The defaults (``order="prefix"``, no band) are what our freeze study on two pretrained
fine-tunes supported best; it found no configuration that saves 30% of the training time at
no accuracy cost, and no alpha rule that beats freezing a fixed prefix from the start
(``docs/actions.md``).

With ``unfreeze=True`` a frozen layer whose alpha leaves the band by more than
``unfreeze_margin``, or that picks up an excluded flag, is released. Note that a layer whose weights
are really frozen keeps its alpha (the analysis is deterministic), so in ``"apply"`` mode this only
fires for weights that are shared with a training layer or changed by something else; in
``"suggest"`` mode the layer keeps training and a suggestion is withdrawn when it drifts.

**Experimental**: no published work validates alpha-based freezing, and freezing may overload
the layers that keep training; our own measurements are in ``docs/actions.md``. ``"suggest"`` is
the safe way to try it.

The band and the thresholds refer to WeightWatcher's CSN ``alpha`` (``metric="alpha"``). The Hill
estimator (``alpha_hill``) reads on a different scale (about 2.1 on noise), so a band must be
chosen for it explicitly.

The policy only *decides* and keeps the bookkeeping; applying a decision is the adapter's job
(:func:`ww_callbacks.torch_utils.freeze_layers`, :func:`ww_callbacks.keras_utils.freeze_layers`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ww_callbacks.actions._common import (
    Patterns,
    check_metric,
    compile_patterns,
    finite,
    matches,
    normalise_mode,
)

__all__ = ["FreezePolicy", "FreezeDecision", "PRESETS", "DEFAULT_EXCLUDE_FLAGS", "relative_range"]

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

_MODES = {"off": "off", False: "off", None: "off", "suggest": "suggest", "apply": "apply",
          True: "apply"}
#: ``order`` values: any candidate, or front to back only.
ORDERS = ("any", "prefix")
_STATE_VERSION = 1
#: Decisions kept in :meth:`FreezePolicy.state_dict` (the most recent ones).
STATE_DECISIONS = 32


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


class FreezePolicy:
    """Decides which layers to freeze (or unfreeze) from the alpha history.

    Args:
        mode: ``"off"`` (default; never decides anything), ``"suggest"`` (decides and records,
            the adapter only logs) or ``"apply"`` (the adapter freezes). ``False``/``True`` are
            accepted for ``"off"``/``"apply"``.
        tol: largest relative range ``(max - min)/|mean|`` of the last ``window`` alphas for a
            layer to count as settled.
        window: number of analyses (this one included) the settle test looks at; ``>= 2``.
        band: ``(lo, hi)`` well-trained band, a preset name from :data:`PRESETS`, or ``None``
            (default: no band test, a settled layer is a candidate whatever its alpha;
            pretrained embeddings and stems often sit outside 2-6).
        metric: ``"alpha"`` (CSN, default; the band's scale) or ``"alpha_hill"``.
        max_share: most layers frozen at once, as a share of the analysed layers, in ``[0, 1]``.
        protect: regex or list of regexes (``re.search`` on the layer name) never frozen.
        protect_head: never freeze the output head, taken as the last analysed layer.
        unfreeze: release frozen layers whose alpha leaves the band or that get an excluded flag.
        unfreeze_margin: hysteresis; a frozen layer is released only beyond
            ``[lo - margin, hi + margin]``.
        exclude_flags: ``LayerResult.flags`` that disqualify a layer.
        order: ``"prefix"`` (front to back only, see rule 6; the default) or ``"any"`` (any
            candidate, front first; the default with ``unfreeze=True``, which ``"prefix"``
            does not allow).

    Example:
        >>> from types import SimpleNamespace as L
        >>> layers = [L(name=n, alpha=3.0, flags=(), status="success") for n in ("a", "b", "head")]
        >>> policy = FreezePolicy("suggest", window=3, max_share=1.0)
        >>> history = {"a": [3.05, 3.0, 3.0], "b": [4.0, 3.0, 3.0], "head": [3.0, 3.0, 3.0]}
        >>> d = policy.decide(history, layers, step=30)
        >>> d.freeze                       # b has not settled, the head is protected
        ['a']
    """

    PRESETS = PRESETS

    def __init__(self, mode: Union[str, bool, None] = "off", tol: float = 0.05, window: int = 3,
                 band: Union[str, Tuple[float, float], None] = None, metric: str = "alpha",
                 max_share: float = 0.5, protect: Patterns = None, protect_head: bool = True,
                 unfreeze: bool = False, unfreeze_margin: float = 0.0,
                 exclude_flags: Sequence[str] = DEFAULT_EXCLUDE_FLAGS,
                 order: Optional[str] = None) -> None:
        self.mode = normalise_mode("freeze mode", mode, _MODES)
        if not finite(tol) or tol < 0:
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2 (analyses compared), got {window!r}")
        if isinstance(band, str):
            if band not in PRESETS:
                raise ValueError(f"unknown band preset {band!r}; presets: {sorted(PRESETS)}")
            band = PRESETS[band]
        if band is None:  # no band test: the settle test alone decides
            lo, hi = -math.inf, math.inf
        else:
            try:
                lo, hi = (float(b) for b in band)
            except (TypeError, ValueError):
                raise ValueError(f"band must be (lo, hi), a preset name or None, got {band!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"band must satisfy lo < hi (finite), got {band!r}")
        if not finite(max_share) or not 0.0 <= max_share <= 1.0:
            raise ValueError(f"max_share must be in [0, 1], got {max_share!r}")
        if not finite(unfreeze_margin) or unfreeze_margin < 0:
            raise ValueError(f"unfreeze_margin must be >= 0, got {unfreeze_margin!r}")
        if isinstance(exclude_flags, str):
            raise ValueError("exclude_flags must be a sequence of flag names, not one string")
        if order is None:  # the study's choice, where it can apply (see docs/actions.md)
            order = "any" if unfreeze else "prefix"
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if order == "prefix" and unfreeze:
            raise ValueError("order='prefix' freezes whole prefixes and cannot be combined with "
                             "unfreeze=True")
        self.order = order
        self.tol = float(tol)
        self.window = window
        self.band = (lo, hi)
        self.metric = check_metric(metric)
        self.max_share = float(max_share)
        self.protect = list(protect) if isinstance(protect, (list, tuple)) else protect
        self._protect = compile_patterns("protect", protect)
        self.protect_head = bool(protect_head)
        self.unfreeze = bool(unfreeze)
        self.unfreeze_margin = float(unfreeze_margin)
        self.exclude_flags = tuple(exclude_flags)
        #: Names currently frozen ("apply") or currently recommended ("suggest"), in model order.
        self.frozen: List[str] = []
        #: Non-empty decisions, oldest first (``FreezeDecision.to_dict()`` form).
        self.decisions: List[Dict[str, Any]] = []
        #: The output head seen at the last decision (protected when ``protect_head``).
        self.head: Optional[str] = None
        #: Model position of every layer seen (first analysis first), for :attr:`frozen`'s order.
        self._order: Dict[str, int] = {}
        #: Why no layer was a candidate, gathered at every decision (:meth:`why_nothing_froze`).
        self._why: Dict[str, Any] = {"analyses": 0, "decided": 0}

    # ------------------------------------------------------------------ decisions
    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def whole_prefix(self) -> bool:
        """Whether applying a decision freezes the whole prefix (``order="prefix"``): the value
        for :func:`ww_callbacks.torch_utils.freeze_layers`'s ``whole_prefix``."""
        return self.order == "prefix"

    def is_protected(self, name: str) -> bool:
        """True when ``name`` matches ``protect`` or is the output head (with ``protect_head``)."""
        return matches(self._protect, name) or (self.protect_head and name == self.head)

    def protect_names(self, names: Sequence[str]) -> None:
        """Never freeze these exact layer names (adapters use it for an output head tied to an
        input embedding, which the "last analysed layer" rule does not catch)."""
        import re

        for name in names:
            pat = re.compile("^" + re.escape(str(name)) + "$")
            if all(p.pattern != pat.pattern for p in self._protect):
                self._protect.append(pat)

    def _excluded_flags(self, layer: Any) -> List[str]:
        return [f for f in getattr(layer, "flags", ()) if f in self.exclude_flags]

    def _excluded_flag(self, layer: Any) -> Optional[str]:
        bad = self._excluded_flags(layer)
        return bad[0] if bad else None

    def decide(self, history_by_layer: Mapping[str, Sequence[float]], latest_result: Any,
               step: Optional[int] = None, epoch: Optional[int] = None) -> FreezeDecision:
        """Decide at one analysis and update :attr:`frozen` and :attr:`decisions`.

        Args:
            history_by_layer: per-layer metric series, oldest first, **including** this analysis
                (e.g. :func:`ww_callbacks.actions.series_from_rows` of ``controller.history.rows``).
            latest_result: this analysis: an ``AnalysisResult`` or an iterable of ``LayerResult``
                (model order; the last one is the output head).
            step, epoch: recorded with the decision.

        Returns:
            A :class:`FreezeDecision` (empty in ``"off"`` mode).
        """
        decision = FreezeDecision(mode=self.mode, step=step, epoch=epoch)
        if self.mode == "off":
            return decision
        layers = list(getattr(latest_result, "layers", latest_result))
        if not layers:
            return decision
        names = [l.name for l in layers]
        self.head = names[-1]
        lo, hi = self.band
        frozen = set(self.frozen)

        if self.unfreeze:
            m = self.unfreeze_margin
            for layer in layers:
                if layer.name not in frozen:
                    continue
                value = getattr(layer, self.metric, math.nan)
                flag = self._excluded_flag(layer)
                if flag:
                    reason = f"flag {flag}"
                elif not finite(value):
                    reason = f"{self.metric} not finite"
                elif value < lo - m or value > hi + m:
                    reason = f"{self.metric} {value:.3f} left band [{lo:g}, {hi:g}]"
                    reason += f" (margin {m:g})" if m else ""
                else:
                    continue
                decision.unfreeze.append(layer.name)
                decision.reasons[layer.name] = reason
            frozen -= set(decision.unfreeze)

        # over every layer known, analysed now or frozen earlier (frozen layers may not be
        # re-analysed: the callbacks analyse frozen weights once)
        cap = math.floor(self.max_share * len(set(names) | frozen) + 1e-9)
        for layer in layers:
            if len(frozen) >= cap:
                break
            name = layer.name
            if name in frozen:
                continue
            spread = self._candidate_spread(layer, history_by_layer, decision.unfreeze)
            if spread is None:
                if self.order == "prefix" and not self._passenger(layer):
                    break  # the first layer that stays keeps everything after it training
                continue
            frozen.add(name)
            decision.freeze.append(name)
            value = getattr(layer, self.metric)
            where = f" in [{lo:g}, {hi:g}]" if math.isfinite(lo) else ""
            decision.reasons[name] = (f"{self.metric} {value:.3f}{where}, settled: "
                                      f"relative range {spread:.4f} <= {self.tol:g} over "
                                      f"{self.window} analyses")

        self._diagnose(layers, history_by_layer, frozen, cap)
        for n in names:  # frozen layers drop out of later analyses: remember where they were
            self._order.setdefault(n, len(self._order))
        self.frozen = sorted(frozen, key=lambda n: (self._order.get(n, len(self._order)), n))
        if decision:
            self.decisions.append(decision.to_dict())
        return decision

    def _passenger(self, layer: Any) -> bool:
        """A layer too small to judge (only flag: too-few-evals, e.g. a depthwise conv): it does
        not end a prefix, and freezes with the prefix around it (``whole_prefix``)."""
        return self._excluded_flags(layer) == ["too-few-evals"] and not self.is_protected(layer.name)

    def _candidate_spread(self, layer: Any, history_by_layer: Mapping[str, Sequence[float]],
                          released: Sequence[str]) -> Optional[float]:
        """The settle spread of a layer that may freeze now (rules 1-4), else ``None``."""
        name = layer.name
        if name in released or self.is_protected(name):
            return None
        if getattr(layer, "status", "success") != "success" or self._excluded_flag(layer):
            return None
        value = getattr(layer, self.metric, math.nan)
        lo, hi = self.band
        if not finite(value) or not lo <= value <= hi:
            return None
        series = list(history_by_layer.get(name, ()))[-self.window:]
        if len(series) < self.window:
            return None
        spread = relative_range(series)
        return None if spread > self.tol else spread

    # ------------------------------------------------------------------ nothing froze: why
    def _diagnose(self, layers: Sequence[Any], history_by_layer: Mapping[str, Sequence[float]],
                  frozen: set, cap: int) -> None:
        """Record, at one decision, why layers were not candidates (rules 1-6)."""
        why = self._why
        why["decided"] += 1
        why["analyses"] = max([why["analyses"]] + [len(history_by_layer.get(l.name, ()))
                                                   for l in layers])
        why["cap"], why["num_layers"] = cap, len(layers)
        protected, excluded, eligible = [], Counter(), 0
        lo, hi = self.band
        blocker: Optional[str] = None
        for layer in layers:
            name = layer.name
            if name in frozen:
                continue
            flag = self._excluded_flag(layer)
            value = getattr(layer, self.metric, math.nan)
            ok = False
            if self.is_protected(name):
                protected.append(name)
            elif flag or getattr(layer, "status", "success") != "success" or not finite(value):
                excluded[flag or "fit-failed"] += 1
            else:
                eligible += 1
                series = list(history_by_layer.get(name, ()))[-self.window:]
                spread = relative_range(series) if len(series) >= self.window else None
                if spread is not None and spread > self.tol:
                    best = why.get("best_spread")
                    if best is None or spread < best[0]:
                        why["best_spread"] = (spread, name)
                elif spread is not None and not lo <= value <= hi:
                    why.setdefault("out_of_band", (name, value))
                elif spread is not None:
                    ok = True
                    if blocker is not None:
                        why.setdefault("blocked", (name, blocker))
            if not ok and blocker is None and self.order == "prefix" and not self._passenger(layer):
                blocker = name
        why["protected"], why["excluded"], why["eligible"] = protected, excluded, eligible

    def why_nothing_froze(self) -> Optional[str]:
        """Why this policy froze (``"apply"``) or suggested (``"suggest"``) no layer so far, with
        what to change; ``None`` when it is off or some layer froze.

        The reasons, first match: no decision was made (no analysis reached the policy); every
        analysed layer was protected or carried an excluded flag (e.g. a LoRA run, whose adapter
        updates have too few eigenvalues); ``max_share`` allows no layer; fewer analyses than
        ``window``; with ``order="prefix"``, a layer that never settled kept the ones behind it
        training; no layer settled within ``tol`` (or, with a ``band``, in the band).

        Example:
            >>> from types import SimpleNamespace as L
            >>> policy = FreezePolicy("suggest", window=3)
            >>> layers = [L(name=n, alpha=3.0, flags=(), status="success") for n in ("a", "head")]
            >>> _ = policy.decide({"a": [3.0, 3.0], "head": [3.0, 3.0]}, layers)
            >>> print(policy.why_nothing_froze())  # doctest: +ELLIPSIS
            freeze='suggest' suggested no layer: only 2 analyses ran, and the settle test needs window=3; ...
        """
        if self.mode == "off" or self.frozen or any(d.get("freeze") for d in self.decisions):
            return None
        why = self._why
        head = f"freeze={self.mode!r} {'froze' if self.mode == 'apply' else 'suggested'} no layer: "
        n, window = why["analyses"], self.window
        if not why["decided"]:
            return head + ("no analysis reached the freeze policy; make the schedule analyse at "
                           f"least window={window} times (e.g. an earlier start_fraction or a "
                           "shorter interval)")
        protected, excluded = why["protected"], why["excluded"]
        if not why["eligible"] and (protected or excluded):
            parts = [f"{c} flagged {f}" for f, c in excluded.most_common()]
            if protected:
                parts.append(f"{len(protected)} protected ({', '.join(protected[:3])}"
                             f"{', ...' if len(protected) > 3 else ''})")
            fix = []
            if excluded:
                fix.append(f"drop {', '.join(repr(f) for f in excluded)} from exclude_flags "
                           f"(now {list(self.exclude_flags)}) to let such layers freeze on their "
                           f"{self.metric}")
            if "too-few-evals" in excluded:
                fix[-1] += (" (too-few-evals: fits on fewer than 20 eigenvalues, e.g. every "
                            "LoRA adapter update B·A of rank r; or analyse the base layers "
                            "instead)")
            if protected:
                fix.append("narrow protect / set protect_head=False")
            return head + (f"every analysed layer was protected or excluded ({'; '.join(parts)}); "
                           + " or ".join(fix))
        if why.get("cap", 1) < 1:
            return head + (f"max_share={self.max_share:g} of {why['num_layers']} analysed layers "
                           "allows none to freeze; raise max_share")
        if n < window:
            return head + (f"only {n} analyses ran, and the settle test needs window={window}; "
                           f"analyse more often (a shorter interval or an earlier start_fraction) "
                           f"or lower window")
        if "blocked" in why:
            name, blocker = why["blocked"]
            return head + (f"with order='prefix', {blocker} never met the criterion, so {name} "
                           "and the layers after it kept training; use order='any', or protect "
                           f"nothing before {name} that has to stay")
        if "best_spread" in why and "out_of_band" not in why:
            spread, name = why["best_spread"]
            return head + (f"no layer's {self.metric} settled: the smallest relative range over "
                           f"{window} analyses was {spread:.4f} ({name}), above tol={self.tol:g}; "
                           "raise tol, or train (and analyse) longer")
        if "out_of_band" in why:
            name, value = why["out_of_band"]
            lo, hi = self.band
            return head + (f"the layers that settled have {self.metric} outside band "
                           f"[{lo:g}, {hi:g}] (e.g. {name}: {value:.3f}); widen band or set "
                           "band=None")
        return head + "no layer met the criterion (see docs/actions.md for the rules)"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state: the frozen (or suggested) set, the head and the last
        :data:`STATE_DECISIONS` decisions (bounded, so checkpoints stay small; every decision is
        also in the run folder's ``decisions.jsonl``)."""
        return {"version": _STATE_VERSION, "mode": self.mode, "frozen": list(self.frozen),
                "head": self.head, "decisions": [dict(d) for d in self.decisions[-STATE_DECISIONS:]]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. The adapter must then re-apply :attr:`frozen` to the model
        (``requires_grad``/``trainable`` are not part of framework checkpoints)."""
        if not state:
            return
        if int(state.get("version", _STATE_VERSION)) > _STATE_VERSION:
            raise ValueError(f"freeze state version {state.get('version')} is newer than "
                             f"supported ({_STATE_VERSION})")
        self.frozen = [str(n) for n in state.get("frozen", [])]
        self._order = {n: i for i, n in enumerate(self.frozen)}
        self.head = state.get("head")
        self.decisions = [dict(d) for d in state.get("decisions", [])]

    def __repr__(self) -> str:
        return (f"FreezePolicy(mode={self.mode!r}, tol={self.tol}, window={self.window}, "
                f"band={self.band}, metric={self.metric!r}, max_share={self.max_share}, "
                f"order={self.order!r}, unfreeze={self.unfreeze}, frozen={len(self.frozen)})")
