"""``analyze_distributed()``: the layers of one model sharded across the ranks of a process group.

Every rank enumerates the layers identically (same source, same options), the analysable ones are
assigned to ranks greedily by estimated cost, each rank analyses its share with
:func:`ww_core.analyze`, and the per-layer results are exchanged with
``torch.distributed.all_gather_object``. Every rank returns the same full
:class:`~ww_core.result.AnalysisResult`, in model order, so decisions taken from it agree on all
ranks. Without an initialised process group (or with one rank) it is plain :func:`ww_core.analyze`.

Under ``torchrun`` with the gloo backend this needs nothing more; with NCCL the caller must have
selected the rank's GPU (``torch.cuda.set_device``) as ``all_gather_object`` requires.

``randomize=True`` with a ``seed``: the engine seeds each layer's shuffles from
``(seed, layer name)`` (:func:`layer_seed`), so the randomised metrics do not depend on the world
size, nor on which rank analysed the layer, and equal a single-process ``ww_core.analyze``.
"""

from __future__ import annotations

import heapq
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .analyze import (
    DEFAULT_MAX_EVALS,
    DEFAULT_MAX_N,
    DEFAULT_MIN_EVALS,
    analysis_layers,
    analyze,
    check_options,
    layer_seed,  # noqa: F401  (re-exported)
    skip_reason,
)
from .errors import SourceError, failing_layer
from .layer_matrices import LayerMatrices
from .result import AnalysisResult, LayerResult, SkippedLayer
from .selection import LayerSelector

__all__ = ["analyze_distributed", "assign_layers", "layer_cost", "layer_seed", "dist_info"]


def dist_info(group: Any = None) -> Tuple[int, int]:
    """``(rank, world_size)`` of ``group`` (default group), or ``(0, 1)`` when not distributed."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def layer_cost(lm: LayerMatrices) -> float:
    """Estimated eigensolve cost of a layer: ``num_evals · N · M`` (= rf · M² · N)."""
    return float(lm.num_evals) * float(lm.N) * float(lm.M)


def assign_layers(names: Sequence[str], costs: Sequence[float], world_size: int) -> List[List[int]]:
    """Greedy longest-processing-time assignment of layers to ranks.

    Layers sharing a name are kept together (one unit, their costs summed) because a rank selects
    its layers by exact name. Units are taken in decreasing cost (model order on ties) and each
    goes to the least-loaded rank (lowest rank on ties), so the plan is a pure function of
    ``(names, costs, world_size)``: every rank computes the same one.

    Returns:
        For each rank, the ascending indices (into ``names``) of its layers.
    """
    units: Dict[str, List[int]] = {}
    for i, name in enumerate(names):
        units.setdefault(name, []).append(i)
    order = sorted(units.values(), key=lambda idx: (-sum(costs[i] for i in idx), idx[0]))
    heap = [(0.0, r) for r in range(world_size)]
    shares: List[List[int]] = [[] for _ in range(world_size)]
    for idx in order:
        load, rank = heapq.heappop(heap)
        shares[rank].extend(idx)
        heapq.heappush(heap, (load + sum(costs[i] for i in idx), rank))
    return [sorted(s) for s in shares]


def _exact(names: Sequence[str]) -> List[str]:
    return ["^" + re.escape(n) + "$" for n in dict.fromkeys(names)]


def _plan(source: Any, options: Dict[str, Any]) -> Tuple[List[LayerMatrices], List[SkippedLayer]]:
    """The layers ``analyze(source, **options)`` would analyse and skip, in model order."""
    min_evals = options.get("min_evals", DEFAULT_MIN_EVALS)
    max_evals = options.get("max_evals", DEFAULT_MAX_EVALS)
    max_N = options.get("max_N", DEFAULT_MAX_N)
    check_options(min_evals, max_evals, max_N, options.get("fix_fingers"),
                  options.get("precision", "auto"), options.get("solver", "gram"))
    selector = LayerSelector(options.get("layers"), options.get("layer_types"))
    todo: List[LayerMatrices] = []
    skipped: List[SkippedLayer] = []
    for lm in selector.select(analysis_layers(
            source, options.get("conv2d_norm", True), options.get("split_qkv", True),
            options.get("peft", False), options.get("base_model"), options.get("trainable"))):
        reason = skip_reason(lm, min_evals, max_evals, max_N)
        if reason:
            skipped.append(SkippedLayer(lm.name, lm.type, lm.N, lm.M, reason))
        else:
            todo.append(lm)
    return todo, skipped


def _analyze_share(source: Any, names: List[str], options: Dict[str, Any]) -> List[LayerResult]:
    """This rank's layers (``names``, model order, duplicates allowed), analysed."""
    if not names:
        return []        # (analyze(layers=[]) would mean "no filter": every layer)
    opts = dict(options)
    opts.pop("layers", None)
    return analyze(source, layers=_exact(names), **opts).layers


def analyze_distributed(source: Any, *, group: Any = None, **options: Any) -> AnalysisResult:
    """:func:`ww_core.analyze` with the layers sharded across the ranks of a process group.

    Args:
        source: as for :func:`ww_core.analyze`; every rank must pass the same model or file.
        group: a ``torch.distributed`` process group (default: the default group).
        **options: any option of :func:`ww_core.analyze`.

    Returns:
        The full result, identical on every rank, layers in model order. With one process (or no
        initialised process group) this is ``ww_core.analyze(source, **options)``. Layers are
        seeded one by one (:func:`ww_core.analyze.layer_seed`), so ``randomize=True`` with a
        ``seed`` gives the same result for every world size.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        SourceError: ``source`` cannot be read.
        ValueError: an invalid option.
        RuntimeError: any other failure of a rank, as ``"rank R: message"``.

    When any rank fails while analysing its share, every rank raises the failing rank's error
    (its one-line message; its failing layer, if any, on :func:`ww_core.errors.failing_layer`),
    so no rank is left waiting in a collective.

    Example:
        >>> import numpy as np, ww_core
        >>> sd = {"fc.weight": np.random.default_rng(0).standard_normal((64, 32))}
        >>> ww_core.analyze_distributed(sd).names        # no process group: ww_core.analyze
        ['fc']
    """
    rank, world = dist_info(group)
    if world <= 1:
        return analyze(source, **options)

    todo, skipped = _plan(source, options)            # identical on every rank
    shares = assign_layers([lm.name for lm in todo], [layer_cost(lm) for lm in todo], world)
    mine = shares[rank]
    opts = dict(options)
    if rank != 0:
        opts["progress"] = False

    payload: Tuple[str, Any]
    try:
        layers = _analyze_share(source, [todo[i].name for i in mine], opts)
        if len(layers) != len(mine):
            raise RuntimeError(f"rank {rank}: analysed {len(layers)} layers, expected {len(mine)}")
        payload = ("ok", layers)
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
        if world <= 1:
            raise
        kind = exc.__class__.__name__
        payload = ("error", (kind, " ".join(str(exc).split()) or kind, failing_layer(exc)))

    if world > 1:
        import torch.distributed as dist

        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, payload, group=group)
    else:
        gathered = [payload]

    for r, (status, body) in enumerate(gathered):
        if status != "ok":
            kind, msg, layer = body
            exc_type = {"SourceError": SourceError, "ValueError": ValueError,
                        "FileNotFoundError": FileNotFoundError}.get(kind, RuntimeError)
            err = exc_type(f"rank {r}: {msg}" if exc_type is RuntimeError else msg)
            if layer:
                err.ww_layer = layer          # (see ww_core.errors.failing_layer)
            raise err

    slots: List[Optional[LayerResult]] = [None] * len(todo)
    for r, (_, layers) in enumerate(gathered):
        for i, layer in zip(shares[r], layers):
            slots[i] = layer
    result_layers = [l for l in slots if l is not None]
    # The options record of a single-process run (the user's filters, not the shard's).
    reference = analyze({}, **{k: v for k, v in options.items() if k != "progress"})
    return AnalysisResult(layers=result_layers, skipped=skipped, options=reference.options)
