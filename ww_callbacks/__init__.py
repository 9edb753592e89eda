"""Spectral (HT-SR) monitoring of training runs, on top of :mod:`ww_core`.

``WeightWatcherController`` is the framework-free engine (schedule, history, trackers, actions);
the framework adapters live in their own modules and are imported lazily, so importing this
package imports no training framework and no tracker library:

* ``ww_callbacks.lightning.WeightWatcherCallback`` (Lightning, both import names)
* ``ww_callbacks.huggingface`` (HF ``Trainer``) and ``ww_callbacks.keras`` (Keras 3)

The actions' settings are :class:`Freeze`, :class:`BalanceLR` and :class:`EarlyStop`
(:mod:`ww_callbacks.settings`); ``output_dir=MEMORY_ONLY`` keeps the history in memory only.

Misconfiguration is warned with :class:`WeightWatcherWarning` (:mod:`ww_callbacks.warnings`).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

__all__ = ["WeightWatcherController", "Schedule", "History", "WeightWatcherWarning", "Freeze",
           "BalanceLR", "EarlyStop", "MEMORY_ONLY", "wandb_workspace", "__version__"]

_LAZY = {
    "WeightWatcherController": "ww_callbacks.controller",
    "Schedule": "ww_callbacks.schedule",
    "History": "ww_callbacks.history",
    "WeightWatcherWarning": "ww_callbacks.warnings",
    "Freeze": "ww_callbacks.settings",
    "BalanceLR": "ww_callbacks.settings",
    "EarlyStop": "ww_callbacks.settings",
    "MEMORY_ONLY": "ww_callbacks.run_dir",
    "wandb_workspace": "ww_callbacks.trackers.wandb_workspace",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
