"""The controller's action API: binding the framework functions, starting a fit, the results.

:class:`ActionBinding` is owned by :class:`~ww_callbacks.controller.WeightWatcherController`
(``controller.binding``) and given what it uses; the policies and their option parsing are in
:mod:`ww_callbacks.actions.build`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

from ww_callbacks.distributed import broadcast_object

__all__ = ["ActionBinding"]


class ActionBinding:
    """``bind`` / ``start`` of the actions, the actions called after each analysis, their results.

    Args:
        action_set: the built-in policies (:class:`~ww_callbacks.actions.ActionSet`).
        extra: further objects with ``on_analysis(controller, result, step, epoch)``.
        guard: the error policy's ``guard(what, fn, *args)``.

    Raises:
        ValueError: an ``extra`` action without ``on_analysis``.
    """

    def __init__(self, action_set: Any, extra: Optional[Sequence[Any]], guard: Callable[..., Any]) -> None:
        self.action_set, self.extra, self.guard = action_set, list(extra or ()), guard
        for action in self.extra:
            if not callable(getattr(action, "on_analysis", None)):
                raise ValueError(f"action {action!r} has no on_analysis(controller, result, step, epoch)")
        self.bound = False
        #: Why early stopping asked to stop (``None`` while it has not).
        self.stop_reason: Optional[str] = None

    @property
    def actions(self) -> List[Any]:
        """The actions called after each analysis: built-in (freeze, LR, stop), then ``extra``."""
        return self.action_set.actions() + self.extra

    def bind(self, freeze_fn: Optional[Callable[[List[str], List[str]], Any]] = None,
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
        self.bound = True

    def start(self, protect: Sequence[str] = ()) -> None:
        """At the start of a fit: never freeze ``protect`` (e.g. a tied output head) and
        re-freeze what a restored state froze (``requires_grad``/``trainable`` are not saved)."""
        if self.action_set.freeze_policy.protect_head and protect:
            self.action_set.freeze_policy.protect_names(list(protect))
        if not self.bound:
            self.bind()
        self.guard("re-applying frozen layers", self.action_set.reapply)

    @property
    def frozen_layers(self) -> List[str]:
        """Layers frozen (``freeze="apply"``) or suggested (``"suggest"``) so far."""
        return list(self.action_set.freeze_policy.frozen)

    @property
    def lr_factors(self) -> Dict[str, float]:
        """The latest TempBalance factors (``balance_lr`` on)."""
        return dict(self.action_set.lr_policy.factors)
