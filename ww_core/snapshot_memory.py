"""How much memory a weight snapshot may take, and where each copy goes (:func:`ww_core.snapshot`).

A snapshot copies every analysed weight at one moment, so taken whole on the weights' device it
doubles their memory. With a budget ``B`` (bytes):

* copies go to the weights' device while they fit in ``B``;
* from a CUDA device, the rest go to host memory (pinned, so the copy is a fast DMA) while they
  fit in a host budget (``B`` too when given; by default the host's own default);
* when the copies would not fit even so, nothing is copied: :class:`SnapshotBudgetError` is raised
  before the first copy (the callbacks then analyse that step synchronously, layer by layer).

For weights in host memory (CPU, numpy, files) the device *is* the host: one budget ``B``.
Default budget of a device: the smaller of 2 GB and 10 % of its memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, List, Tuple, Union

__all__ = ["DEFAULT_CAP", "DEFAULT_SHARE", "SnapshotBudgetError", "check_budget", "copy_layers",
           "default_budget", "device_memory", "layer_nbytes"]

#: Default budget: ``min(DEFAULT_CAP, DEFAULT_SHARE × device memory)``.
DEFAULT_CAP = 2 * 1024 ** 3
DEFAULT_SHARE = 0.10
_ITEMSIZE = {"float64": 8, "double": 8, "float32": 4, "float": 4, "float16": 2, "half": 2,
             "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}

Budget = Union[None, int, float, str]


class SnapshotBudgetError(MemoryError):
    """:func:`ww_core.snapshot` would exceed its memory budget; raised before anything is copied.

    A ``MemoryError``: catch it to analyse the live weights instead (what the callbacks do).

    Example:
        >>> import numpy as np, ww_core
        >>> weights = {"fc.weight": np.zeros((1000, 500))}          # 4 MB in float64
        >>> try:
        ...     ww_core.snapshot(weights, budget=1_000_000)
        ... except ww_core.SnapshotBudgetError:
        ...     snap = None                                       # nothing was copied
        >>> snap is None, len(ww_core.snapshot(weights, budget=None))
        (True, 1)
    """


def device_memory(device: Any = "cpu") -> int:
    """Total memory of ``device`` in bytes (CUDA: the GPU's; otherwise the host's RAM)."""
    dev = str(device)
    if dev.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(dev)).total_memory)
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_budget(device: Any = "cpu") -> int:
    """``min(2 GB, 10 % of the memory of device)`` in bytes."""
    return int(min(DEFAULT_CAP, DEFAULT_SHARE * device_memory(device)))


def layer_nbytes(lm: Any) -> int:
    """Bytes of the copy of one layer's stack (from its shape and dtype name; unknown: 4/entry)."""
    return int(lm.rf) * int(lm.rows) * int(lm.cols) * _ITEMSIZE.get(str(lm.dtype), 4)


def _device_of(x: Any) -> str:
    dev = getattr(x, "device", None)
    return "cpu" if dev is None or not hasattr(x, "detach") else str(dev)


def check_budget(value: Budget) -> Budget:
    """``value`` if it is a ``budget=`` that :func:`ww_core.snapshot` accepts: bytes >= 0,
    ``"auto"`` or ``None``; checks a budget before the first snapshot is taken.

    Raises:
        ValueError: anything else.

    Example:
        >>> check_budget(2e9), check_budget("auto"), check_budget(None)
        (2000000000.0, 'auto', None)
        >>> check_budget(-1)
        Traceback (most recent call last):
        ...
        ValueError: snapshot budget must be a number of bytes >= 0, 'auto' or None, got -1
    """
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"snapshot budget must be a number of bytes >= 0, 'auto' or None, "
                         f"got {value!r}")
    return value


def _budget(value: Budget, device: str) -> float:
    value = check_budget(value)
    if value is None:
        return float("inf")
    if value == "auto":
        return float(default_budget(device))
    return float(value)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def copy_layers(layers: List[Any], budget: Budget = "auto",
                in_layer: Any = None) -> Tuple[List[Any], dict]:
    """Copies of the usable ``layers`` (``LayerMatrices``) within ``budget``; see the module doc.

    Args:
        layers: the selected layers; unusable ones are passed through uncopied.
        budget: bytes, ``"auto"`` (:func:`default_budget` of the weights' device) or ``None``
            (no limit: everything on the weights' device, the old behaviour).
        in_layer: context manager factory naming the layer an error happens in.

    Returns:
        ``(layers, placement)``: the copied layers, and ``{"device": bytes, "host": bytes,
        "budget": (device budget, host budget)}``.

    Raises:
        SnapshotBudgetError: the copies would not fit; nothing was copied.
    """
    usable = [lm for lm in layers if lm.unusable is None]
    device = "cpu"
    if usable and not usable[0].streamed:
        device = _device_of(usable[0].load())           # a view: nothing is copied yet
    on_host = not device.startswith("cuda")
    dev_budget = _budget(budget, device)
    host_budget = dev_budget if (on_host or budget != "auto") else _budget("auto", "cpu")
    total = sum(layer_nbytes(lm) for lm in usable)
    room = dev_budget if on_host else dev_budget + host_budget
    if total > room:
        raise SnapshotBudgetError(
            f"a snapshot of {len(usable)} layers needs {_mb(total)}, over its budget of "
            f"{_mb(dev_budget)} on {device}" + ("" if on_host else f" + {_mb(host_budget)} on the host")
            + "; nothing was copied (budget=None: no limit)")
    used = {"device": 0, "host": 0, "budget": (dev_budget, host_budget)}
    out: List[Any] = []
    for lm in layers:
        if lm.unusable is not None:
            out.append(lm)
            continue
        with (in_layer(lm.name) if in_layer else contextlib.nullcontext()):
            data = lm.load()
            nbytes = _nbytes(data, lm)
            where = "device" if (on_host or used["device"] + nbytes <= dev_budget) else "host"
            if where == "host" and used["host"] + nbytes > host_budget:
                raise SnapshotBudgetError(f"layer {lm.name!r} ({_mb(nbytes)}) does not fit the "
                                          f"snapshot budget (estimate was {_mb(total)})")
            data = _copy(data, to_host=where == "host" and not on_host)
        used[where] += nbytes
        out.append(dataclasses.replace(lm, load=(lambda data=data: data), streamed=False,
                                       collective=False))
    return out, used


def _nbytes(x: Any, lm: Any) -> int:
    if hasattr(x, "element_size"):
        return int(x.numel()) * int(x.element_size())
    return int(getattr(x, "nbytes", layer_nbytes(lm)))


def _copy(x: Any, to_host: bool) -> Any:
    """A private copy of ``x``: on its device, or in pinned host memory (``to_host``)."""
    if hasattr(x, "detach"):
        if to_host:
            import torch

            out = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
            return out.copy_(x.detach())
        return x.detach().clone()
    import numpy as np

    return np.array(x, copy=True)

