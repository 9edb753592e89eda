"""Eigenvalues of many layers in few solver calls (:func:`ww_core.analyze`'s ``batch_elements``).

In-memory layers whose Gram matrices have the same size are solved together, with their shuffled
replicas when ``randomize`` is on (:func:`shuffled_replicas`); a layer read from a file is always
alone, so one streamed layer is in memory at a time. Within a group, the layers planned for float64
(:func:`ww_core.precision.first_precision`) share one float64 call, the others (and every shuffled
replica) one call in the group's precision.

Without ``randomize``, where the solver pool is used (:func:`~ww_core.spectrum.pool_solves`,
CPU weights), in-memory groups of matrices small enough for it are also started *ahead*
(:func:`~ww_core.spectrum.eigenvalues_later`), up to ``max_elements`` weight entries besides
the group being handed out, so that their eigensolves run on the pool's threads while the
caller fits the layers before them. A model whose solve time sits in one large layer
(EfficientNet-Lite0's classifier: 56 of its 72 ms, on one thread) then keeps both cores busy.
The eigenvalues are the same to the bit (the route of a solve depends only on the matrix size).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import in_layer
from .layer_matrices import LayerMatrices
from .spectrum import (
    SOLVE_ERRORS,
    Later,
    eigenvalues_later,
    is_torch_tensor,
    parallel_map,
    pool_solves,
)

__all__ = ["group_layers", "shuffled_replicas", "with_eigenvalues"]

#: Groups past the current one looked at for starting ahead.
AHEAD_SCAN = 64


def shuffled_replicas(lm: LayerMatrices, batch: Any, rng: np.random.Generator) -> Any:
    """The layer's randomised copies (WeightWatcher's replica count), stacked along axis 0."""
    from . import rmt  # (scipy.optimize: imported when randomize is first used)

    replicas = rmt.num_replicas(lm.num_evals)
    stacked = batch if replicas == 1 else (
        batch.repeat(replicas, 1, 1) if is_torch_tensor(batch) else np.tile(batch, (replicas, 1, 1)))
    return rmt.shuffle_slices(stacked, rng)


def group_layers(todo: List[LayerMatrices], max_elements: int) -> List[List[int]]:
    """Indices of ``todo`` solved together: in-memory layers whose Gram matrices have the same
    size (``(rows, cols)`` or ``(cols, rows)``), anywhere in the model, up to ``max_elements``
    weight entries per group; a streamed layer is always alone."""
    groups: List[List[int]] = []
    sizes: List[int] = []
    open_group: Dict[Any, int] = {}
    for i, lm in enumerate(todo):
        size = lm.size
        key = (min(lm.rows, lm.cols), max(lm.rows, lm.cols))
        g = open_group.get(key)
        alone = lm.streamed or lm.num_components is not None    # (a LoRA product loads r x r)
        if alone or max_elements <= 0 or g is None or sizes[g] + size > max_elements:
            if not alone and max_elements > 0:
                open_group[key] = len(groups)
            groups.append([i])
            sizes.append(size)
        else:
            groups[g].append(i)
            sizes[g] += size
    return groups


Plan = Tuple[str, str]


def with_eigenvalues(todo: List[LayerMatrices], precision: str, solver: str, max_elements: int,
                     rng_for: Optional[Callable[[LayerMatrices], Any]] = None,
                     plan_for: Optional[Callable[[LayerMatrices, Any], Plan]] = None):
    """Yield ``(layer, batch, raw_evals, rand_raw, plan)`` in model order, solving groups together.

    Each group (see :func:`group_layers`) is solved in one eigensolver call per precision (which
    splits it over the cores), with each layer's shuffled replicas when ``rng_for`` is given
    (``randomize``). A group is loaded and started when its first layer comes up, or earlier
    (see the module docstring: in-memory groups, no ``rng_for``, within ``max_elements``).
    ``raw_evals`` is ``None`` for a streamed layer without ``rng_for`` (read and solved by the
    caller, one at a time) and when its group's solve failed (NaN weights in one layer, say):
    :func:`ww_core.analyze_layer` then solves (and flags) that layer on its own. ``plan`` is
    ``plan_for(layer, batch)`` (the precision ``raw_evals`` was solved in, and why), or
    ``(precision, "")`` without ``plan_for``. An error loading a layer is raised when that layer
    comes up, in model order, even when its group was to be started ahead.
    """
    groups = group_layers(todo, max_elements)
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    sizes = [sum(todo[j].size for j in members) for members in groups]
    solve_cost = [sum(todo[j].rf * todo[j].M ** 3 for j in members) for members in groups]
    ready: Dict[int, Tuple[Any, Optional[np.ndarray], Optional[np.ndarray], Plan]] = {}
    started: Dict[int, _Started] = {}
    threads = pool_solves(solver) if rng_for is None else 0   # (0: nothing runs beside us)

    def start(g: int) -> "_Started":
        return _start_group([todo[j] for j in groups[g]], precision, solver, rng_for, plan_for)

    def window(current: int) -> List[int]:
        """The groups after ``current``, not started yet, that may be started now: up to
        ``max_elements`` weight entries besides ``current``, at most :data:`AHEAD_SCAN` groups
        on, up to the first streamed or large one."""
        out: List[int] = []
        room = max_elements - sum(sizes[k] for k in started if k != current)
        for h in range(current + 1, min(len(groups), current + 1 + AHEAD_SCAN)):
            if h in started:
                continue
            if sizes[h] > room or any(todo[j].streamed or not pool_solves(solver, todo[j].M)
                                      for j in groups[h]):
                break             # (streamed: one at a time; large: solved where started)
            out.append(h)
            room -= sizes[h]
        return out

    try:
        for i, lm in enumerate(todo):
            if i not in ready:
                g = group_of[i]
                with in_layer(lm.name):   # (a member's own load/shuffle error names that member)
                    current = started.get(g) or started.setdefault(g, start(g))
                    if not current.on_cpu:
                        threads = 0       # (a GPU solves where it is started)
                    # longest first, while fewer solves are queued than the pool has threads
                    for h in sorted(window(g) if threads else [], key=lambda h: -solve_cost[h]):
                        if sum(s.running for s in started.values()) >= threads:
                            break
                        try:
                            started[h] = start(h)
                        except Exception:  # (raised again, in model order, when it comes up)
                            break
                    ready.update(zip(groups[g], current()))
                    del started[g]
            yield (lm, *ready.pop(i))
    finally:
        for pending in started.values():      # (abandoned: drop the solves not yet begun)
            pending.cancel()


class _Started:
    """A group whose eigensolves were started: call it for each member's
    ``(batch, raw_evals, rand_raw, plan)``; :meth:`cancel` drops the solves not yet begun."""

    def __init__(self, batches: List[Any], plans: List[Plan], rands: List[Any], on_cpu: bool) -> None:
        self.batches, self.plans, self.rands, self.on_cpu = batches, plans, rands, on_cpu
        self.calls: List[Tuple[List[Tuple[int, bool, Any]], Optional[Later]]] = []

    @property
    def running(self) -> int:
        """Its eigensolves queued or running on the solver pool."""
        return sum(later.running for _, later in self.calls if later is not None)

    def __call__(self) -> List[Tuple[Any, Optional[np.ndarray], Optional[np.ndarray], Plan]]:
        n = len(self.batches)
        raws: List[Any] = [None] * n
        rand_raws: List[Any] = [None] * n
        for parts, later in self.calls:
            if later is None:          # (the solve failed as it started)
                continue
            try:
                evals = later()
            except SOLVE_ERRORS:       # analyze_layer retries these layers alone
                continue
            pieces = np.split(evals, np.cumsum([p.shape[0] for _, _, p in parts])[:-1])
            for (k, is_rand, _), piece in zip(parts, pieces):
                (rand_raws if is_rand else raws)[k] = piece
        for k in range(n):
            if self.rands[k] is not None and rand_raws[k] is None:
                raws[k] = None         # (alone, its shuffles are redrawn from the same seed)
        return [(b, raws[k], rand_raws[k] if raws[k] is not None else None, self.plans[k])
                for k, b in enumerate(self.batches)]

    def cancel(self) -> None:
        for _, later in self.calls:
            if later is not None:
                later.cancel()


def _start_group(group: List[LayerMatrices], precision: str, solver: str,
                 rng_for: Optional[Callable[[LayerMatrices], Any]],
                 plan_for: Optional[Callable[[LayerMatrices, Any], Plan]] = None) -> _Started:
    batches = [_load(lm) for lm in group]
    plans = [_plan(plan_for, lm, b) for lm, b in zip(group, batches)] if plan_for else (
        [(precision, "")] * len(group))
    on_cpu = all(not is_torch_tensor(b) or b.device.type == "cpu" for b in batches)
    rands: List[Any] = [None] * len(group)
    if rng_for is not None:
        rngs = [rng_for(lm) for lm in group]          # drawn in model order, on this thread
        jobs = list(zip(group, batches, rngs))
        rands = (parallel_map(_shuffle, jobs) if on_cpu else [_shuffle(job) for job in jobs])
    started = _Started(batches, plans, rands, on_cpu)
    if len(group) == 1 and group[0].streamed and rands[0] is None:
        return started                 # (the caller solves it)
    try:
        # one call per precision; the shuffled replicas go with the group's own precision
        for wanted in sorted({p for p, _ in plans} | ({precision} if rng_for else set())):
            idx = [k for k in range(len(group)) if plans[k][0] == wanted]
            parts = [(k, False, batches[k]) for k in idx]
            if wanted == precision:
                parts += [(k, True, rands[k]) for k in range(len(group)) if rands[k] is not None]
            if not parts:
                continue
            try:
                later: Optional[Later] = eigenvalues_later([p for _, _, p in parts], wanted, solver)
            except SOLVE_ERRORS:       # analyze_layer retries these layers alone
                later = None
            started.calls.append((parts, later))
    except BaseException:
        started.cancel()
        raise
    return started


def _plan(plan_for: Callable[[LayerMatrices, Any], Plan], lm: LayerMatrices, batch: Any) -> Plan:
    with in_layer(lm.name):
        return plan_for(lm, batch)


def _load(lm: LayerMatrices) -> Any:
    with in_layer(lm.name):
        return lm.load()


def _shuffle(job: Tuple[LayerMatrices, Any, Any]) -> Any:
    with in_layer(job[0].name):
        return shuffled_replicas(*job)
