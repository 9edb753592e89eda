"""What the three training callbacks share: the controller, its properties, its state.

A callback either builds its :class:`~ww_callbacks.controller.WeightWatcherController` from the
keywords it was given (the controller's keywords: one list, documented there) or takes an
existing one (``controller=``), like DVCLive's ``live=``. The framework files keep only their
hooks, their three apply functions (freeze, LR factors, stop) and their tracker discovery.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional

from ww_callbacks.controller import WeightWatcherController
from ww_callbacks.history import History

__all__ = ["CallbackBase", "override", "callback_signature"]


def callback_signature() -> inspect.Signature:
    """The callbacks' signature: ``controller=None``, then the controller's keywords with its
    defaults (keyword-only; ``log_fn=None`` is the framework's own console there)."""
    ctl = inspect.signature(WeightWatcherController.__init__)
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("controller", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                annotation=Optional[WeightWatcherController])]
    for p in list(ctl.parameters.values())[1:]:
        kind = inspect.Parameter.VAR_KEYWORD if p.kind is p.VAR_KEYWORD else inspect.Parameter.KEYWORD_ONLY
        params.append(p.replace(kind=kind))
    return inspect.Signature(params)


class override:
    """Mark a framework hook; a method that overrides nothing fails when the class is made.

    A misspelt hook (``on_train_epoch_ends``) would otherwise never run, silently. Like
    :func:`typing.override` it sets ``__override__`` for type checkers; unlike it, it checks at
    run time.

    Raises:
        TypeError: (at class creation; wrapped in ``RuntimeError`` before Python 3.12) the
            method overrides no attribute of the class's bases.

    Example:
        >>> class Base:
        ...     def on_start(self): ...
        >>> class Hooks(Base):
        ...     @override
        ...     def on_start(self): return "started"
        >>> Hooks().on_start()
        'started'
    """

    def __init__(self, fn: Any) -> None:
        try:
            fn.__override__ = True
        except AttributeError:  # a property: nothing to mark
            pass
        self.fn = fn

    def __set_name__(self, owner: type, name: str) -> None:
        if not any(hasattr(base, name) for base in owner.__mro__[1:]):
            raise TypeError(f"{owner.__qualname__}.{name} is marked @override but no base class "
                            f"has a {name!r} hook (misspelt?)")
        setattr(owner, name, self.fn)


class CallbackBase:
    """Mixin of the framework callbacks (listed before the framework's own base class)."""

    controller: WeightWatcherController

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:   # inspect.signature(WeightWatcherCallback): the controller's keywords
            init.__signature__ = callback_signature()

    def _setup_controller(self, controller: Optional[WeightWatcherController],
                          kwargs: Dict[str, Any], **defaults: Any) -> None:
        """Use ``controller`` or build one from ``kwargs``; bind this adapter's apply functions.

        Raises:
            ValueError: both ``controller`` and keywords given, a non-controller, or an invalid
                keyword (from the controller).
        """
        if controller is not None:
            if not isinstance(controller, WeightWatcherController):
                raise ValueError(f"controller must be a WeightWatcherController, got {controller!r}")
            if kwargs:
                raise ValueError(f"pass either controller= or its keywords, not both (got "
                                 f"{sorted(kwargs)})")
        else:
            options = {**kwargs}
            for key, value in defaults.items():   # the framework's log_fn unless one is given
                if options.get(key) is None:
                    options[key] = value
            controller = WeightWatcherController(**options)
        self.controller = controller
        #: the keywords this callback was built with (HF rebuilds a restored callback from them)
        self.init_kwargs = dict(kwargs)
        controller.bind_actions(freeze_fn=self._freeze, lr_fn=self._set_lr_factors,
                                stop_fn=self._stop)

    # the framework side of the actions, implemented by each adapter
    def _freeze(self, freeze: List[str], unfreeze: List[str]) -> None:
        raise NotImplementedError

    def _set_lr_factors(self, factors: Dict[str, float]) -> None:
        raise NotImplementedError

    def _stop(self, reason: str) -> None:
        raise NotImplementedError

    @property
    def history(self) -> History:
        """:class:`ww_callbacks.history.History` of this run (one row per layer per analysis)."""
        return self.controller.history

    @property
    def frozen_layers(self) -> List[str]:
        """Layers frozen (``freeze="apply"``) or suggested (``"suggest"``) so far."""
        return self.controller.frozen_layers

    @property
    def lr_factors(self) -> Dict[str, float]:
        """The latest TempBalance factors (``balance_lr`` on)."""
        return self.controller.lr_factors

    @property
    def action_set(self) -> Any:
        """The controller's :class:`~ww_callbacks.actions.ActionSet` (policies and their state)."""
        return self.controller.action_set

    def state_dict(self) -> Dict[str, Any]:
        """The controller's JSON-serialisable state (history, last step, actions)."""
        return self.controller.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.controller.load_state_dict(state_dict)
