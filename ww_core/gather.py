"""A CPU snapshot of a model whose weights are spread over the ranks: :func:`gather_snapshot`.

:func:`gather_snapshot` turns a training model into what the engine should read: the model
itself (wrappers removed, :func:`ww_core.unwrap_model`), or, when each rank holds only a shard of
the weights, a CPU :class:`~ww_core.Snapshot` of the full weights, named with the user's module
paths and gathered piece by piece:

* FSDP1 (``FullyShardedDataParallel``): one unit at a time (``summon_full_params``);
* FSDP2 (``fully_shard``, ``DTensor`` parameters) and DeepSpeed ZeRO-3: one layer at a time
  (:func:`ww_core.partitioned.gather_full`: ``full_tensor()`` /
  ``deepspeed.zero.GatheredParameters``).

``torch.distributed.fsdp`` is never imported here unless it already is (FSDP cannot be in use
otherwise), so plain runs do not pay for it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, List, Sequence, Tuple, Union

from .errors import in_layer
from .layer_matrices import LayerMatrices
from .partitioned import partition_kind
from .selection import LayerSelector
from .sources import Snapshot, find_layers
from .wrappers import clean_name, unwrap_model

__all__ = ["fsdp_units", "gather_snapshot", "has_partitioned"]


def fsdp_units(model: Any) -> List[Tuple[str, Any]]:
    """``(path, module)`` of every FSDP1 unit in ``model`` (model order), ``[]`` without FSDP.

    Looks only when ``torch.distributed.fsdp`` is already imported, so plain runs never import it.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FullyShardedDataParallel", None)
    if cls is None or not hasattr(model, "named_modules"):
        return []
    return [(path, mod) for path, mod in model.named_modules() if isinstance(mod, cls)]


def has_partitioned(model: Any) -> bool:
    """Whether a torch module (or state dict) holds FSDP2 ``DTensor`` / ZeRO-3 parameters."""
    if hasattr(model, "parameters") and callable(model.parameters):
        values: Iterable[Any] = model.parameters()
    elif isinstance(model, dict):
        values = model.values()
    else:
        return False
    return any(partition_kind(v) is not None for v in values)


def _frozen(data: Any) -> Callable[[], Any]:
    """A loader returning a CPU copy of ``data`` (a torch tensor or a numpy array)."""
    data = data.detach().to("cpu", copy=True) if hasattr(data, "detach") else data.copy()

    def load() -> Any:
        return data
    return load


def gather_snapshot(model: Any, layers: Union[None, str, Sequence[str]] = None,
                    layer_types: Union[None, str, Iterable[str]] = None, conv2d_norm: bool = True,
                    split_qkv: bool = True) -> Any:
    """What the engine should analyse for a (possibly wrapped or sharded) training model.

    Call it on every rank, at the same point: gathering is a collective.

    * FSDP1: the units are gathered one at a time (``summon_full_params(unit, recurse=False,
      writeback=False)``) and the selected layers each unit owns are copied to the CPU. Peak
      extra device memory: one unit unsharded.
    * FSDP2 ``DTensor`` / DeepSpeed ZeRO-3 parameters: each selected layer is gathered alone
      (``full_tensor()`` / ``GatheredParameters([p], modifier_rank=None)``), copied to the CPU
      and freed before the next, in model order. Peak extra device memory: one layer. A sharded
      weight that cannot be gathered (no process group, an unknown placement, DeepSpeed not
      imported) stays a skipped layer with the reason; it is never analysed as its local shard.

    Args:
        model: any model source; DDP / DataParallel / DeepSpeedEngine / ``torch.compile``
            wrappers are removed.
        layers, layer_types: which layers to copy (see :class:`ww_core.LayerSelector`); used only
            when gathering, the unwrapped model is returned whole.
        conv2d_norm, split_qkv: as in :func:`ww_core.analyze`; fixed in the snapshot.

    Returns:
        A CPU :class:`~ww_core.Snapshot` in model order (a private copy), with FSDP1's
        ``_fsdp_wrapped_module`` segments removed from the names, when ``model`` holds FSDP1
        units or sharded parameters; otherwise the unwrapped model itself. An exception raised
        while a layer is copied carries its name (:func:`ww_core.errors.failing_layer`).

    Raises:
        ValueError: invalid ``layers`` or ``layer_types``.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(16, 8)
        >>> gather_snapshot(torch.nn.DataParallel(net)) is net        # no FSDP: the model itself
        True
    """
    selector = LayerSelector(layers, layer_types)
    model = unwrap_model(model)
    units = fsdp_units(model)
    if not units:
        if has_partitioned(model):
            return _gather_layers(model, selector, conv2d_norm, split_qkv)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # model order of the layers (units are visited outer first, not in model order)
    order = {clean_name(path): i for i, (path, _) in enumerate(model.named_modules())}

    def position(name: str) -> int:
        while name not in order and "." in name:
            name = name.rsplit(".", 1)[0]
        return order.get(name, len(order))

    kept: List[LayerMatrices] = []
    for path, unit in units:
        nested = [p for p, m in unit.named_modules() if m is not unit and isinstance(m, FSDP)]
        with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=False):
            for lm in find_layers(unit, conv_norm=conv2d_norm, split_qkv=split_qkv):
                if any(lm.name == p or lm.name.startswith(p + ".") for p in nested):
                    continue                   # owned (and gathered) by a nested unit
                name = clean_name(f"{path}.{lm.name}" if path else lm.name)
                if not selector.matches(name, lm.type):
                    continue
                load = lm.load
                if lm.unusable is None:
                    with in_layer(name):
                        load = _frozen(lm.load())
                kept.append(LayerMatrices(name=name, type=lm.type, rf=lm.rf, rows=lm.rows,
                                          cols=lm.cols, load=load, scale=lm.scale,
                                          unusable=lm.unusable, dtype=lm.dtype))
    kept.sort(key=lambda lm: position(lm.name))
    return Snapshot(kept, conv2d_norm=conv2d_norm, split_qkv=split_qkv)


def _gather_layers(model: Any, selector: LayerSelector, conv2d_norm: bool,
                   split_qkv: bool) -> Snapshot:
    """FSDP2 / ZeRO-3: every selected layer gathered alone (a collective), copied to the CPU."""
    kept: List[LayerMatrices] = []
    for lm in selector.select(find_layers(model, conv_norm=conv2d_norm, split_qkv=split_qkv)):
        if lm.collective or lm.unusable is None:
            with in_layer(lm.name):
                load = _frozen(lm.load())   # a gathered weight lives only inside this call
            lm = LayerMatrices(name=lm.name, type=lm.type, rf=lm.rf, rows=lm.rows, cols=lm.cols,
                               load=load, scale=lm.scale, dtype=lm.dtype)
        kept.append(lm)
    return Snapshot(kept, conv2d_norm=conv2d_norm, split_qkv=split_qkv)
