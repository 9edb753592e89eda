"""Parameters that hold only a shard of their weight: FSDP2 ``DTensor`` s and DeepSpeed ZeRO-3.

Such a parameter must never be analysed as it is: its local data is a slice of the weight (FSDP2)
or empty (ZeRO-3, shape ``(0,)``), so its spectrum would be silently wrong. :func:`sharded_reason`
is the skip reason :func:`ww_core.find_layers` gives it; :func:`gather_full` is the collective
that :func:`ww_core.gather_snapshot` calls, one weight at a time, on every rank in the same order.

``torch.distributed.tensor`` and ``deepspeed`` are looked up in ``sys.modules`` only: neither can
be in use unless it was imported, so plain runs never import them.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Tuple

__all__ = ["full_shape", "gather_full", "gather_problem", "partition_kind", "sharded_reason"]

_KIND_LABEL = {"dtensor": "DTensor (FSDP2 / tensor parallel)", "zero3": "DeepSpeed ZeRO-3 partition"}


def _dtensor_class() -> Any:
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def partition_kind(p: Any) -> Optional[str]:
    """``"dtensor"``, ``"zero3"`` (a DeepSpeed ZeRO-3 parameter: it has ``ds_id``) or ``None``."""
    cls = _dtensor_class()
    if cls is not None and isinstance(p, cls):
        return "dtensor"
    if hasattr(p, "ds_id") and hasattr(p, "ds_shape"):
        return "zero3"
    return None


def full_shape(p: Any) -> Tuple[int, ...]:
    """The shape of the whole weight (a DTensor's ``shape`` is global; ZeRO-3: ``ds_shape``)."""
    if partition_kind(p) == "zero3":
        return tuple(int(s) for s in p.ds_shape)
    return tuple(int(s) for s in p.shape)


def gather_problem(p: Any) -> Optional[str]:
    """Why the sharded ``p`` cannot be gathered here (``None``: :func:`gather_full` can)."""
    kind = partition_kind(p)
    if kind is None:
        return None
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return "no initialised torch.distributed process group"
    if kind == "dtensor":
        from torch.distributed.tensor import Partial, Replicate, Shard

        odd = [pl for pl in p.placements if not isinstance(pl, (Shard, Replicate, Partial))]
        if odd:
            return f"unknown placement {odd[0]!r}"
        return None
    if "deepspeed" not in sys.modules or not hasattr(p, "ds_status"):
        return "deepspeed is not imported or the parameter has no ds_status"
    return None


def sharded_reason(p: Any) -> Optional[str]:
    """The skip reason of a sharded parameter for :func:`ww_core.analyze` (``None`` if not sharded).

    ``ww_core.analyze`` never gathers: gathering is a collective that every rank must enter in the
    same order, and a lone rank calling it (say rank 0 analysing alone) would hang.
    """
    kind = partition_kind(p)
    if kind is None:
        return None
    label = _KIND_LABEL[kind]
    if kind == "dtensor":
        label += f" {tuple(p.placements)!r}"
    problem = gather_problem(p)
    if problem:
        return f"sharded weight ({label}) cannot be gathered: {problem}"
    return (f"sharded weight ({label}) cannot be gathered by ww_core.analyze (a collective): call "
            f"ww_core.gather_snapshot(model) on every rank, or use the ww_callbacks callbacks")


def gather_full(p: Any) -> Any:
    """The whole weight of a sharded parameter (a plain tensor; CPU copy for ZeRO-3).

    A collective: every rank of the parameter's process group must call it for the same
    parameters in the same order. Peak extra memory is this one weight unsharded.
    """
    import torch

    kind = partition_kind(p)
    with torch.no_grad():
        if kind == "dtensor":
            return p.detach().full_tensor()
        if kind == "zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                return p.detach().to("cpu", copy=True)      # p.data is freed on exit
    return p.detach()
