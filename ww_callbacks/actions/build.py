"""Shared option parsing for the adapters' ``freeze`` / ``balance_lr`` / ``early_stop`` keywords.

Framework-free: the controller builds one :class:`ActionSet` from the user's keywords in its
constructor (so bad options fail before training starts), binds the adapter's framework
functions (:meth:`ActionSet.bind`), calls :meth:`ActionSet.actions` after each analysis and keeps
:meth:`ActionSet.state_dict` in its own state.

Example:
    >>> from ww_callbacks.settings import Freeze
    >>> spec = ActionSet(freeze=Freeze.suggest(band="vision", window=2))
    >>> spec.freeze_policy.band, spec.lr_policy.enabled, spec.stop_policy
    ((2.0, 3.0), False, None)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

from ww_callbacks.actions.early_stop import EarlyStopPolicy
from ww_callbacks.actions.runner import EarlyStopAction, FreezeAction, LRBalanceAction

__all__ = ["ActionSet"]

_STATE_VERSION = 1


class ActionSet:
    """The policies behind one callback's ``freeze`` / ``balance_lr`` / ``early_stop`` keywords.

    Args:
        freeze: ``None``/``False``/``"off"`` (default), ``"suggest"``, ``True``/``"apply"`` or
            a :class:`~ww_callbacks.settings.Freeze`.
        balance_lr: the same values, or a :class:`~ww_callbacks.settings.BalanceLR`.
        early_stop: the same values, or an :class:`~ww_callbacks.settings.EarlyStop`.

    Raises:
        ValueError: an unknown mode or a settings object of the wrong class.
    """

    def __init__(self, freeze: Any = "off", balance_lr: Any = "off", early_stop: Any = "off") -> None:
        from ww_callbacks.settings import coerce_settings

        #: The settings of the three actions (:mod:`ww_callbacks.settings`).
        self.freeze = coerce_settings("freeze", freeze)
        self.balance_lr = coerce_settings("balance_lr", balance_lr)
        self.early_stop = coerce_settings("early_stop", early_stop)
        self.freeze_policy = self.freeze.make_policy()
        self.lr_policy = self.balance_lr.make_policy()
        self.stop_policy: Optional[EarlyStopPolicy] = (self.early_stop.make_policy()
                                                       if self.early_stop.enabled else None)
        self.freeze_action: Optional[FreezeAction] = None
        self.lr_action: Optional[LRBalanceAction] = None
        self.stop_action: Optional[EarlyStopAction] = None

    def settings(self) -> Dict[str, Any]:
        """The three settings in their JSON form (``{"freeze": {...}, ...}``)."""
        return {"freeze": self.freeze.to_dict(), "balance_lr": self.balance_lr.to_dict(),
                "early_stop": self.early_stop.to_dict()}

    # ------------------------------------------------------------------ modes
    @property
    def freeze_mode(self) -> str:
        return self.freeze_policy.mode

    @property
    def lr_mode(self) -> str:
        return self.lr_policy.mode

    @property
    def stop_mode(self) -> str:
        return self.early_stop.mode

    @property
    def enabled(self) -> bool:
        return self.freeze_policy.enabled or self.lr_policy.enabled or self.stop_policy is not None

    # ------------------------------------------------------------------ wiring
    def bind(self, freeze_fn: Optional[Callable[[List[str], List[str]], Any]] = None,
             lr_fn: Optional[Callable[[Dict[str, float]], Any]] = None,
             stop_fn: Optional[Callable[[str], Any]] = None,
             sync_fn: Optional[Callable[[Any], Any]] = None) -> "ActionSet":
        """(Re)create the actions around the same policies with these framework functions.

        ``freeze_fn(freeze, unfreeze)`` is needed for ``freeze="apply"``, ``lr_fn(factors)`` for
        ``balance_lr="apply"``, ``stop_fn(reason)`` for ``early_stop="apply"``. Binding again (a new
        adapter on the same controller) keeps the policies' state.

        Raises:
            ValueError: an ``apply`` mode without its function.
        """
        if self.freeze_mode == "apply" and freeze_fn is None:
            raise ValueError("freeze='apply' needs a freeze_fn: the function that freezes layers in "
                             "your framework (the adapters bind it; see bind_actions)")
        if self.lr_mode == "apply" and lr_fn is None:
            raise ValueError("balance_lr='apply' needs an lr_fn: the function that sets per-layer LR "
                             "factors in your framework (the adapters bind it; see bind_actions)")
        self.freeze_action = self.lr_action = self.stop_action = None
        if self.freeze_policy.enabled:
            self.freeze_action = FreezeAction(self.freeze_policy, freeze_fn if self.freeze_mode == "apply"
                                              else None, sync_fn)
        if self.lr_policy.enabled:
            self.lr_action = LRBalanceAction(self.lr_policy, lr_fn if self.lr_mode == "apply" else None,
                                             sync_fn)
        if self.stop_policy is not None:
            apply = self.stop_mode == "apply" and stop_fn is not None
            self.stop_action = EarlyStopAction(self.stop_policy, stop_fn if apply else (lambda reason: None),
                                               sync_fn, suggest=self.stop_mode == "suggest")
        return self

    def actions(self) -> List[Any]:
        """The bound actions, in the order freeze, LR, stop (what the controller should call)."""
        return [a for a in (self.freeze_action, self.lr_action, self.stop_action) if a is not None]

    def reapply(self) -> None:
        """After a resume: freeze :attr:`FreezePolicy.frozen` again (``apply`` mode)."""
        if self.freeze_action is not None:
            self.freeze_action.reapply()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state of the policies (frozen set, decisions, factors, stop)."""
        out: Dict[str, Any] = {"version": _STATE_VERSION, "settings": self.settings()}
        if self.freeze_policy.enabled:
            out["freeze"] = self.freeze_policy.state_dict()
        if self.lr_policy.enabled:
            out["lr"] = self.lr_policy.state_dict()
        if self.stop_policy is not None:
            out["early_stop"] = self.stop_policy.state_dict()
        return out

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        """Restore :meth:`state_dict`. A saved part whose mode differs from this run's is ignored
        (e.g. a run resumed with ``freeze="off"`` does not freeze what an earlier run froze)."""
        if not state:
            return
        if int(state.get("version", _STATE_VERSION)) > _STATE_VERSION:
            raise ValueError(f"actions state version {state.get('version')} is newer than "
                             f"supported ({_STATE_VERSION})")
        fs = state.get("freeze")
        if fs and self.freeze_policy.enabled and fs.get("mode", self.freeze_mode) == self.freeze_mode:
            self.freeze_policy.load_state_dict(fs)
        ls = state.get("lr")
        if ls and self.lr_policy.enabled and ls.get("mode", self.lr_mode) == self.lr_mode:
            self.lr_policy.load_state_dict(ls)
        ss = state.get("early_stop")
        if ss and self.stop_policy is not None:
            self.stop_policy.load_state_dict(ss)

    def __repr__(self) -> str:
        return (f"ActionSet(freeze={self.freeze!r}, balance_lr={self.balance_lr!r}, "
                f"early_stop={self.early_stop!r})")
