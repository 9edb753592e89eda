"""Rank detection and rank-0 broadcasts: the one place ``ww_callbacks`` asks about processes.

torch is consulted only when it is already imported (a process group cannot exist otherwise),
so Keras on JAX/TensorFlow and plain numpy users never import it.

Example:
    >>> rank_info()
    (True, 1)
    >>> broadcast_object({"freeze": ["fc1"]})
    {'freeze': ['fc1']}
"""

from __future__ import annotations

import os
import sys
from typing import Any, Tuple

__all__ = ["rank_info", "broadcast_object"]


def _torch_group() -> Any:
    """``torch.distributed`` when torch is imported and a default group is up, else ``None``."""
    if "torch" not in sys.modules:
        return None
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def rank_info() -> Tuple[bool, int]:
    """``(is_global_zero, world_size)`` of this process.

    From the initialised ``torch.distributed`` group when there is one, else from the
    ``RANK`` / ``WORLD_SIZE`` environment variables that launchers (torchrun, accelerate,
    Lightning, DeepSpeed) set, else a single process.
    """
    dist = _torch_group()
    if dist is not None:
        return dist.get_rank() == 0, dist.get_world_size()
    rank = int(os.environ.get("RANK", "0") or 0)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return rank == 0, max(world, 1)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank under an initialised process group, else ``obj``.

    The controller uses it so that every rank takes rank 0's action decisions (all ranks must
    freeze the same parameters and stop at the same step). It is a collective: every rank must
    call it at the same point.
    """
    dist = _torch_group()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
