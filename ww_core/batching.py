"""Eigenvalues of many layers in few solver calls (:func:`ww_core.analyze`'s ``batch_elements``).

In-memory layers whose Gram matrices have the same size are solved together, with their shuffled
replicas when ``randomize`` is on (:func:`shuffled_replicas`); a layer read from a file is always
alone, so one streamed layer is in memory at a time.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import in_layer
from .layer_matrices import LayerMatrices
from .spectrum import SOLVE_ERRORS, eigenvalues, is_torch_tensor, parallel_map

__all__ = ["group_layers", "shuffled_replicas", "with_eigenvalues"]


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
        size = lm.rf * lm.rows * lm.cols
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


def with_eigenvalues(todo: List[LayerMatrices], precision: str, solver: str, max_elements: int,
                      rng_for: Optional[Callable[[LayerMatrices], Any]] = None):
    """Yield ``(layer, batch, raw_evals, rand_raw)`` in model order, solving groups together.

    Each group (see :func:`group_layers`) is solved when its first layer comes up, in one eigensolver
    call in ``precision`` (which splits it over the cores), with each layer's shuffled replicas
    when ``rng_for`` is given (``randomize``). ``raw_evals`` is ``None`` when the layer is alone
    with nothing to batch, or when its group's solve failed (NaN weights in one layer, say):
    :func:`ww_core.analyze_layer` then solves (and flags) that layer on its own.
    """
    groups = group_layers(todo, max_elements)
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    ready: Dict[int, Tuple[Any, Optional[np.ndarray], Optional[np.ndarray]]] = {}
    for i, lm in enumerate(todo):
        if i not in ready:
            members = groups[group_of[i]]
            with in_layer(lm.name):       # (a member's own load/shuffle error names that member)
                ready.update(zip(members, _solve_group([todo[j] for j in members], precision,
                                                       solver, rng_for)))
        batch, raw, rand_raw = ready.pop(i)
        yield lm, batch, raw, rand_raw


def _solve_group(group: List[LayerMatrices], precision: str, solver: str,
                 rng_for: Optional[Callable[[LayerMatrices], Any]]):
    batches = [_load(lm) for lm in group]
    rands: List[Any] = [None] * len(group)
    if rng_for is not None:
        rngs = [rng_for(lm) for lm in group]          # drawn in model order, on this thread
        on_cpu = all(not is_torch_tensor(b) or b.device.type == "cpu" for b in batches)
        jobs = list(zip(group, batches, rngs))
        rands = (parallel_map(_shuffle, jobs) if on_cpu else [_shuffle(job) for job in jobs])
    parts = [p for b, r in zip(batches, rands) for p in (b, r) if p is not None]
    if len(parts) == 1:
        return [(batches[0], None, None)]
    try:
        evals = eigenvalues(parts, precision, solver)
    except SOLVE_ERRORS:
        return [(b, None, None) for b in batches]  # analyze_layer retries each layer alone
    pieces = iter(np.split(evals, np.cumsum([p.shape[0] for p in parts])[:-1]))
    return [(b, next(pieces), next(pieces) if r is not None else None) for b, r in zip(batches, rands)]


def _load(lm: LayerMatrices) -> Any:
    with in_layer(lm.name):
        return lm.load()


def _shuffle(job: Tuple[LayerMatrices, Any, Any]) -> Any:
    with in_layer(job[0].name):
        return shuffled_replicas(*job)
