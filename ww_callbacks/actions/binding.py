"""The controller's action API: binding the framework functions, starting a fit, the results.

A mixin of :class:`~ww_callbacks.controller.WeightWatcherController`; the policies and their
option parsing are in :mod:`ww_callbacks.actions.build`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from ww_callbacks.distributed import broadcast_object

__all__ = ["ControllerActions"]


class ControllerActions:
    """``bind_actions`` / ``start_actions`` and the actions' results, for the controller."""

    def bind_actions(self, freeze_fn: Optional[Callable[[List[str], List[str]], Any]] = None,
                     lr_fn: Optional[Callable[[Dict[str, float]], Any]] = None,
                     stop_fn: Optional[Callable[[str], Any]] = None,
                     sync_fn: Optional[Callable[[Any], Any]] = broadcast_object) -> None:
        """Give the actions their framework functions (may be called again, e.g. by a new adapter).

        Args:
            freeze_fn: ``freeze_fn(freeze, unfreeze)`` with layer names; needed for
                ``freeze="apply"``.
            lr_fn: ``lr_fn({layer: factor})``; needed for ``balance_lr=True``.
            stop_fn: ``stop_fn(reason)`` asks the trainer to stop (``stop_reason`` is set
                either way).
            sync_fn: returns rank 0's object on every rank (default: a ``torch.distributed``
                broadcast when a process group is up).

        Raises:
            ValueError: an ``apply`` mode without its function.
        """
        def stop(reason: str) -> None:
            self.stop_reason = reason
            if stop_fn is not None:
                stop_fn(reason)

        self.action_set.bind(freeze_fn=freeze_fn, lr_fn=lr_fn, stop_fn=stop, sync_fn=sync_fn)
        self._bound = True

    def start_actions(self, protect: Sequence[str] = ()) -> None:
        """At the start of a fit: never freeze ``protect`` (e.g. a tied output head) and
        re-freeze what a restored state froze (``requires_grad``/``trainable`` are not saved)."""
        if self.action_set.freeze_policy.protect_head and protect:
            self.action_set.freeze_policy.protect_names(list(protect))
        if not self._bound:
            self.bind_actions()
        self.guard("re-applying frozen layers", self.action_set.reapply)

    @property
    def frozen_layers(self) -> List[str]:
        """Layers frozen (``freeze="apply"``) or suggested (``"suggest"``) so far."""
        return list(self.action_set.freeze_policy.frozen)

    @property
    def lr_factors(self) -> Dict[str, float]:
        """The latest TempBalance factors (``balance_lr`` on)."""
        return dict(self.action_set.lr_policy.factors)
