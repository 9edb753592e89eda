"""Which layers an analysis covers: all of them, or ``k`` at a time in a deterministic rotation.

With ``layers_per_analysis=k`` (a keyword of the controller and of every callback) each analysis
covers at most ``k`` layers of the ``n`` it could cover (plus those an action asks for). The
layers are visited in **cycles**: a cycle lists every layer once and is covered by the next
``ceil(n / k)`` analyses, ``k`` layers each, so analyses ``1..m``, ``m+1..2m``, ... (``m =
ceil(n / k)``) each visit every layer and no layer waits more than ``2m - 1`` analyses. The first
cycle is the **baseline**: trainable layers first, then frozen ones (analysed there once with
``analyze_frozen="once"``). Each later cycle puts first the layers whose alpha **changed** most
between their last two visits, then the others in model order; layers added since (a new
adapter) come first of all. Layers an action needs now (:meth:`LayerRotation.take` ``extra``:
e.g. auto-freeze watching its candidates) are analysed in addition and count as visited.

The controller asks, per analysis, for the exact names to analyse (:meth:`LayerRotation.take`)
and gives them to ``ww_core.analyze(layers=...)`` as one anchored regex
(:func:`exact_names_regex`). Partial analyses are recorded like full ones: each row carries its
step, and a layer's latest row is its latest value.

Example:
    >>> rot = LayerRotation(2)
    >>> names = [("a", True), ("b", True), ("c", False)]     # (name, trainable), model order
    >>> rot.take(names), rot.take(names), rot.cycle
    (['a', 'b'], ['c'], 1)
    >>> rot.take(names), rot.cycle                          # cycle 2 starts
    (['a', 'b'], 2)
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["LayerRotation", "check_layers_per_analysis", "early_freeze_layers", "exact_names_regex",
           "plan_analysis",
           "requested_layers"]


def check_layers_per_analysis(value: Any) -> Optional[int]:
    """A ``layers_per_analysis=`` value: ``None`` (every layer each time) or a positive integer.

    Raises:
        ValueError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"layers_per_analysis must be a positive integer or None, got {value!r}")
    return int(value)


def exact_names_regex(names: Iterable[str]) -> str:
    """One regex matching exactly ``names`` (a ``layers=`` value for :func:`ww_core.analyze`).

    Example:
        >>> import re
        >>> rx = exact_names_regex(["fc.1", "fc"])
        >>> [n for n in ("fc", "fc.1", "fc.10", "xfc") if re.search(rx, n)]
        ['fc', 'fc.1']
    """
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def requested_layers(sources: Iterable[Any], names: Sequence[str]) -> List[str]:
    """The union, in model order, of the layers that ``sources`` need in the next analysis.

    Each source with a ``layers_to_watch(names)`` method (an action or its policy, e.g.
    :meth:`ww_callbacks.actions.FreezePolicy.layers_to_watch`) gets the names an analysis could
    cover now, in model order, and returns the names it needs (``[]``: none), or ``None``: every
    one of them. Sources without the method need nothing; unknown names are ignored.
    """
    wanted: set = set()
    for source in sources:
        fn = getattr(source, "layers_to_watch", None)
        if not callable(fn):
            continue
        got = fn(list(names))
        if got is None:
            return list(names)
        wanted.update(got)
    return [n for n in names if n in wanted]


def plan_analysis(rotation: "LayerRotation", executor: Any, model: Any, analyze_frozen: str, first: bool,
                  sources: Iterable[Any] = ()) -> Tuple[List[Dict[str, Any]], Optional[List[str]]]:
    """The executor's plan of the next analysis and the exact layers it covers.

    Args:
        rotation: the run's :class:`LayerRotation`.
        executor: its :class:`~ww_callbacks.executor.AnalysisExecutor` (``plan``, ``candidates``).
        model: the training model.
        analyze_frozen: the controller's ``analyze_frozen``.
        first: whether no analysis was recorded yet.
        sources: objects that may need layers now (:func:`requested_layers`).

    Returns:
        ``(plan, names)``; ``names`` is ``None`` (every selected layer) when the rotation is off.
    """
    if not rotation.enabled:
        return executor.plan(model, analyze_frozen, first=first), None
    plan = executor.plan(model, analyze_frozen, first=rotation.in_baseline)
    if rotation.candidates is None or rotation.cycle_done:   # listed once per cycle: O(n)
        rotation.candidates = executor.candidates(model, plan)
    candidates = rotation.candidates
    extra = requested_layers(sources, [n for n, _ in candidates])
    return plan, rotation.take(candidates, extra)


def early_freeze_layers(policy: Any, executor: Any, model: Any, plan: List[Dict[str, Any]],
                        names: Optional[List[str]]) -> Optional[List[str]]:
    """The layers of an analysis that only auto-freeze asked for (before the observation
    schedule starts): ``policy.layers_to_watch`` over the trainable layers the plan covers
    (``None``: every layer; ``[]``: none), or the rotation's ``names`` when it is on."""
    if names is not None:
        return names
    trainable = [n for n, is_trainable in executor.candidates(model, plan) if is_trainable]
    return policy.layers_to_watch(trainable)


class _AllVisited(set):
    """The visited set after a resume past the baseline: every layer counts as visited."""

    def __contains__(self, name: object) -> bool:
        return True


class LayerRotation:
    """A deterministic rotation of ``per_analysis`` layers per analysis over every layer.

    Args:
        per_analysis: ``k``, the layers per analysis (``None``: every layer each time).

    Raises:
        ValueError: ``per_analysis`` is not ``None`` or a positive integer.
    """

    def __init__(self, per_analysis: Optional[int] = None) -> None:
        self.per_analysis = check_layers_per_analysis(per_analysis)
        #: The cycle under way (1: the baseline; 0 before the first analysis).
        self.cycle = 0
        #: Analyses taken (calls of :meth:`take`).
        self.analyses = 0
        self._queue: List[str] = []              # what the current cycle still has to visit
        self._visited: set = set()               # every layer visited at least once
        self._alpha: Dict[str, float] = {}       # a layer's alpha at its last visit
        self._change: Dict[str, float] = {}      # |alpha change| between its last two visits
        #: The layers listed at the start of this cycle (:func:`plan_analysis`), else ``None``.
        self.candidates: Optional[List[Tuple[str, bool]]] = None

    @property
    def enabled(self) -> bool:
        """Whether analyses cover a part of the layers."""
        return self.per_analysis is not None

    @property
    def in_baseline(self) -> bool:
        """Whether the next analysis belongs to the first cycle (the baseline), which also covers
        frozen layers; false once every layer of the first cycle was visited."""
        return self.cycle == 0 or (self.cycle == 1 and bool(self._queue))

    @property
    def cycle_done(self) -> bool:
        """Whether the next analysis starts a new cycle."""
        return not self._queue

    def _order(self, candidates: Sequence[Tuple[str, bool]]) -> List[str]:
        """A new cycle's order: new layers (trainable before frozen), then by change, then model
        order."""
        def key(item: Tuple[int, Tuple[str, bool]]) -> Tuple[int, int, float, int]:
            index, (name, trainable) = item
            return (name in self._visited, not trainable, -self._change.get(name, 0.0), index)

        return [name for _, (name, _) in sorted(enumerate(candidates), key=key)]

    def take(self, candidates: Sequence[Tuple[str, bool]], extra: Sequence[str] = ()) -> List[str]:
        """The names the next analysis covers, in model order.

        Args:
            candidates: ``(name, trainable)`` of every layer the analysis could cover now, in
                model order (layers no longer listed leave the rotation).
            extra: names needed now whatever the rotation (e.g. by an action); analysed in
                addition, they count as visited.

        Returns:
            Every candidate when the rotation is off, else at most ``per_analysis`` of this
            cycle's layers plus ``extra``.
        """
        names = [n for n, _ in candidates]
        self.analyses += 1
        if not self.enabled:
            self.cycle = max(self.cycle, 1)
            return names
        present = set(names)
        self._queue = [n for n in self._queue if n in present]
        if not self._queue:
            self.cycle += 1
            self._queue = self._order(candidates)
        chosen = set(self._queue[:self.per_analysis]) | (set(extra) & present)
        self._queue = [n for n in self._queue if n not in chosen]
        self._visited |= chosen
        return [n for n in names if n in chosen]

    def observe(self, result: Any) -> None:
        """Note the alphas of an analysis (what orders the next cycle)."""
        for layer in getattr(result, "layers", ()):
            alpha = getattr(layer, "alpha", None)
            if not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
                continue
            before = self._alpha.get(layer.name)
            if before is not None:
                self._change[layer.name] = abs(float(alpha) - before)
            self._alpha[layer.name] = float(alpha)

    def state_dict(self) -> Dict[str, Any]:
        """The rotation's position, for a resume (JSON-serialisable; empty when off). The layers
        still due in this cycle are kept; the alphas are not (after a resume the next cycle is in
        model order until each layer was seen twice again)."""
        if not self.enabled:
            return {}
        state: Dict[str, Any] = {"cycle": self.cycle, "analyses": self.analyses,
                                 "queue": list(self._queue)}
        if self.cycle <= 1:
            state["visited"] = sorted(self._visited)
        return state

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        """Restore :meth:`state_dict` (a missing state changes nothing)."""
        if not state:
            return
        self.cycle, self.analyses = int(state.get("cycle", 0)), int(state.get("analyses", 0))
        self._queue = list(state.get("queue", []))
        # past the baseline every layer of the queue's cycle was visited at least once
        self._visited = set(state.get("visited", [])) if self.cycle <= 1 else _AllVisited()

    def __repr__(self) -> str:
        return f"LayerRotation(per_analysis={self.per_analysis!r}, cycle={self.cycle})"
