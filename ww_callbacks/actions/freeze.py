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
   frozen at once, every layer that freezes counted (those riding along in a prefix too).
   Candidates are taken in model order (front first);
6. with ``order="prefix"`` (the default), every layer before it (among those still analysed) is
   frozen or freezes now; a layer too small to judge (only flag ``too-few-evals``, e.g. a
   depthwise convolution) does not end the prefix and freezes with it. The frozen layers always
   form a prefix of the model, and the torch adapters then freeze the whole prefix (its norms and
   biases too), so that neither the weight nor the input gradients nor an autograd graph are
   computed through it. ``order="any"`` takes any candidate.

A **LoRA adapter** update ``B·A`` (``<module>.lora_BA.<adapter>``, what the callbacks analyse on a
PEFT model) has only ``r`` eigenvalues: its alpha is not a sound signal (flag ``too-few-evals``).
Rules 1-3 then read its **size** instead: the adapter has settled when the Frobenius norm of
``B·A`` changed by a relative range of at most ``adapter_tol`` between the last two analyses
(two, whatever ``window``: the norm grows smoothly, and the alpha test's third point only delays
the freeze, see ``docs/actions.md``); flags and the band do not apply. Frozen front to back,
adapters stop the backward pass at the first adapter still training (the base weights are frozen
anyway).

No layer freezes at the final analysis (``final=True``): it would save nothing.

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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ww_callbacks.actions._common import (
    Patterns,
    check_metric,
    compile_patterns,
    finite,
    matches,
    normalise_mode,
)
from ww_callbacks.actions.freeze_rules import (
    DEFAULT_ADAPTER_TOL,
    DEFAULT_EXCLUDE_FLAGS,
    PRESETS,
    FreezeDecision,
    explain,
    is_adapter,
    judge,
    new_why,
    relative_range,
    released,
    update_size,
)

__all__ = ["FreezePolicy", "FreezeDecision", "PRESETS", "DEFAULT_EXCLUDE_FLAGS",
           "DEFAULT_ADAPTER_TOL", "relative_range", "is_adapter"]

_MODES = {"off": "off", False: "off", None: "off", "suggest": "suggest", "apply": "apply",
          True: "apply"}
#: ``order`` values: any candidate, or front to back only.
ORDERS = ("any", "prefix")
_STATE_VERSION = 1
#: Decisions kept in :meth:`FreezePolicy.state_dict` (the most recent ones).
STATE_DECISIONS = 32


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
        adapter_tol: largest relative range of a LoRA adapter update's Frobenius norm over the
            last two analyses for the adapter to count as settled.

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
                 order: Optional[str] = None, adapter_tol: float = DEFAULT_ADAPTER_TOL) -> None:
        self.mode = normalise_mode("freeze mode", mode, _MODES)
        for key, value in (("tol", tol), ("adapter_tol", adapter_tol)):
            if not finite(value) or value < 0:
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
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
        self.adapter_tol = float(adapter_tol)
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
        self._why: Dict[str, Any] = new_why()
        #: Per LoRA adapter, the Frobenius norms of ``B·A`` at the last two analyses.
        self.sizes: Dict[str, List[float]] = {}
        #: The layer names of the last :meth:`layers_to_watch` (the cap's layer count).
        self._universe: List[str] = []

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

    def decide(self, history_by_layer: Mapping[str, Sequence[float]], latest_result: Any,
               step: Optional[int] = None, epoch: Optional[int] = None,
               final: bool = False) -> FreezeDecision:
        """Decide at one analysis and update :attr:`frozen` and :attr:`decisions`.

        Args:
            history_by_layer: per-layer metric series, oldest first, **including** this analysis
                (e.g. :func:`ww_callbacks.actions.series_from_rows` of ``controller.history.rows``).
                LoRA adapters' sizes are read from ``latest_result`` and kept in :attr:`sizes`.
            latest_result: this analysis: an ``AnalysisResult`` or an iterable of ``LayerResult``
                (model order; the last one is the output head).
            step, epoch: recorded with the decision.
            final: the analysis at the end of training: nothing freezes (it would save nothing);
                a layer that would have is named by :meth:`why_nothing_froze`.

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
        # the output head: the last analysed layer, or, when only the layers_to_watch were
        # analysed, the last of all the layers named there
        self.head = self._universe[-1] if set(names) <= set(self._universe) else names[-1]
        frozen = set(self.frozen)
        for layer in layers:   # one size per analysis for every adapter analysed
            if is_adapter(layer.name) and layer.name not in frozen:
                sizes = self.sizes.setdefault(layer.name, [])
                sizes.append(update_size(layer))
                del sizes[:-2]
        if self.unfreeze:
            frozen -= set(released(self, layers, frozen, decision))
        # every layer known, analysed now or frozen earlier (frozen layers may not be
        # re-analysed: the callbacks analyse frozen weights once), or named by layers_to_watch
        cap = math.floor(self.max_share * len(set(names) | frozen | set(self._universe)) + 1e-9)
        why = self._why
        why["decided"] += 1
        why["analyses"] = max([why["analyses"]] + [len(history_by_layer.get(n, ())) for n in names])
        why.update(cap=cap, num_layers=len(layers), protected=[], eligible=0)
        skipped = [k for k in getattr(latest_result, "skipped", ()) if is_adapter(k.name)]
        if skipped:   # e.g. r below the analysis' min_evals: the adapters were never fitted
            why["skipped_adapters"] = (len(skipped), str(getattr(skipped[0], "reason", "")))
        why["excluded"].clear()
        riders: List[str] = []           # layers too small to judge, waiting for the next candidate
        blocker: Optional[str] = None    # with order="prefix": the first layer that stays
        room = True                      # the cap still allows a freeze
        for layer in layers:
            name = layer.name
            if name in frozen:
                continue
            verdict, detail = judge(self, layer, history_by_layer, decision.unfreeze)
            if verdict == "protected":
                why["protected"].append(name)
            elif verdict in ("excluded", "rider"):
                why["excluded"][detail] += 1
            else:
                why["eligible"] += 1
            if verdict == "rider" and self.order == "prefix":
                riders.append(name)
                continue
            if verdict != "ok":
                self._note(verdict, name, detail)
                if self.order == "prefix" and blocker is None:
                    blocker = name   # keeps everything after it training
                continue
            if blocker is not None:
                why.setdefault("blocked", (name, blocker))
                continue
            take = riders + [name]
            if not room or len(frozen) + len(take) > cap:
                room = False
                continue
            riders = []
            if final:   # it would freeze now, where freezing saves nothing
                why.setdefault("final", (step, []))[1].append(name)
                continue
            for n in take:
                frozen.add(n)
                decision.freeze.append(n)
                decision.reasons[n] = (detail if n == name else
                                       f"rides along in the frozen prefix (too small to judge: "
                                       f"too-few-evals), before {name}")
        for n in names:  # frozen layers drop out of later analyses: remember where they were
            self._order.setdefault(n, len(self._order))
        self.frozen = sorted(frozen, key=lambda n: (self._order.get(n, len(self._order)), n))
        if decision:
            self.decisions.append(decision.to_dict())
        return decision

    def _note(self, verdict: str, name: str, detail: Any) -> None:
        """Keep the closest miss of each kind for :meth:`why_nothing_froze`."""
        key = {"unsettled": "best_spread", "update": "best_update"}.get(verdict)
        if key is not None:
            best = self._why.get(key)
            if best is None or detail < best[0]:
                self._why[key] = (detail, name)
        elif verdict == "band":
            self._why.setdefault("out_of_band", (name, detail))

    # ------------------------------------------------------------------ analyse less
    def layers_to_watch(self, all_names: Sequence[str]) -> Optional[List[str]]:
        """The layers the next decision needs analysed, out of ``all_names``.

        Args:
            all_names: the layers an analysis of every layer would cover now, in model order
                (e.g. on a PEFT model after the first analysis: the adapters and the trained
                head). The cap (``max_share``) is counted over them from now on.

        Returns:
            ``None``: every layer (``order="any"`` or ``unfreeze=True``: any layer may change
            state); ``[]``: none (off, the cap is reached, or the prefix ends at a protected
            layer); else the next layers of the prefix, in ``all_names`` order: the first
            layers not frozen, as many as the cap still allows to freeze, stopping before a
            protected one. Frozen layers are never needed (their weights do not move).

        Example:
            >>> policy = FreezePolicy("apply", max_share=0.5)
            >>> policy.frozen = ["a"]
            >>> policy.layers_to_watch(["a", "b", "c", "d", "e", "head"])
            ['b', 'c']
        """
        names = [str(n) for n in all_names]
        if self.mode == "off":
            return []
        if self.order != "prefix" or self.unfreeze:
            return None
        self._universe = names
        frozen = set(self.frozen)
        cap = math.floor(self.max_share * len(set(names) | frozen) + 1e-9)
        room = cap - len(frozen)
        out: List[str] = []
        for i, name in enumerate(names):
            if len(out) >= room:
                break
            if name in frozen:
                continue
            if self.is_protected(name) or (self.protect_head and i == len(names) - 1):
                break
            out.append(name)
        return out

    # ------------------------------------------------------------------ nothing froze: why
    def why_nothing_froze(self) -> Optional[str]:
        """Why this policy froze (``"apply"``) or suggested (``"suggest"``) no layer so far, with
        what to change; ``None`` when it is off or some layer froze.

        The reasons, first match: no decision was made (no analysis reached the policy); layers
        met the criterion only at the final analysis; every analysed layer was protected or
        carried an excluded flag; ``max_share`` allows no layer; fewer analyses than
        ``window``; with ``order="prefix"``, a layer that never settled kept the ones behind it
        training; no LoRA adapter update settled within ``adapter_tol``; no layer settled within
        ``tol`` (or, with a ``band``, in the band).

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
        return explain(self, self._why)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state: the frozen (or suggested) set, the head and the last
        :data:`STATE_DECISIONS` decisions (bounded, so checkpoints stay small; every decision is
        also in the run folder's ``decisions.jsonl``)."""
        return {"version": _STATE_VERSION, "mode": self.mode, "frozen": list(self.frozen),
                "head": self.head, "decisions": [dict(d) for d in self.decisions[-STATE_DECISIONS:]],
                "sizes": {n: list(v) for n, v in self.sizes.items()}}

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
        self.sizes = {str(n): [float(x) for x in v] for n, v in (state.get("sizes") or {}).items()}

    def __repr__(self) -> str:
        return (f"FreezePolicy(mode={self.mode!r}, tol={self.tol}, window={self.window}, "
                f"band={self.band}, metric={self.metric!r}, max_share={self.max_share}, "
                f"order={self.order!r}, adapter_tol={self.adapter_tol}, unfreeze={self.unfreeze}, "
                f"frozen={len(self.frozen)})")
