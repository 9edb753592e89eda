"""Tracker backends, by name, imported lazily.

=============== ================================== ========================================
name            class                              needs
=============== ================================== ========================================
``local``       :class:`LocalTracker`              nothing (matplotlib for the PNG plot)
``wandb``       ``WandbTracker``                   ``wandb``
``mlflow``      ``MLflowTracker``                  ``mlflow`` (or ``mlflow-skinny``)
``tensorboard`` ``TensorBoardTracker``             ``tensorboard`` (and torch's SummaryWriter)
=============== ================================== ========================================

Importing this package imports no backend library; :func:`get_tracker_class` imports the one
module asked for. ``from ww_callbacks.trackers import WandbTracker`` works too (PEP 562).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Dict, List, Tuple, Type

from ww_callbacks.trackers.base import Tracker

__all__ = ["Tracker", "TRACKERS", "get_tracker_class", "available_trackers", "make_tracker",
           "LocalTracker", "WandbTracker", "MLflowTracker", "TensorBoardTracker"]

#: name -> (module, class name). Modules are imported only when the tracker is asked for.
TRACKERS: Dict[str, Tuple[str, str]] = {
    "local": ("ww_callbacks.trackers.local", "LocalTracker"),
    "wandb": ("ww_callbacks.trackers.wandb", "WandbTracker"),
    "mlflow": ("ww_callbacks.trackers.mlflow", "MLflowTracker"),
    "tensorboard": ("ww_callbacks.trackers.tensorboard", "TensorBoardTracker"),
}

_BY_CLASS = {cls: name for name, (_, cls) in TRACKERS.items()}


def get_tracker_class(name: str) -> Type[Tracker]:
    """The tracker class registered under ``name``.

    Raises:
        ValueError: for an unknown name.
        ImportError: when its module (or the library it needs) cannot be imported.
    """
    key = name.lower()
    if key not in TRACKERS:
        raise ValueError(f"unknown tracker {name!r}; known: {sorted(TRACKERS)}")
    module_name, class_name = TRACKERS[key]
    module = importlib.import_module(module_name)
    try:
        return getattr(module, class_name)
    except AttributeError as exc:
        raise ImportError(f"{module_name} does not define {class_name}") from exc


def make_tracker(name: str, **kwargs: Any) -> Tracker:
    """Instantiate the tracker registered under ``name`` with ``kwargs``."""
    return get_tracker_class(name)(**kwargs)


def available_trackers() -> List[str]:
    """Registered names whose module exists (does not import the backends)."""
    out = []
    for name, (module_name, _) in TRACKERS.items():
        try:
            if importlib.util.find_spec(module_name) is not None:
                out.append(name)
        except (ImportError, ValueError):
            pass
    return out


def __getattr__(attr: str) -> Any:
    if attr in _BY_CLASS:
        return get_tracker_class(_BY_CLASS[attr])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
