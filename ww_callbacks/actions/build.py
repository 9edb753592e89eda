"""Shared option parsing for the adapters' ``freeze`` / ``balance_lr`` / ``early_stop`` keywords.

Framework-free: the controller builds one :class:`ActionSet` from the user's keywords in its
constructor (so bad options fail before training starts), binds the adapter's framework
functions (:meth:`ActionSet.bind`), calls :meth:`ActionSet.actions` after each analysis and keeps
:meth:`ActionSet.state_dict` in its own state.

Example:
    >>> spec = ActionSet(freeze="suggest", freeze_options={"preset": "vision", "window": 2})
    >>> spec.freeze_policy.band, spec.lr_policy.enabled, spec.stop_policy
    ((2.0, 3.0), False, None)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional

from ww_callbacks.actions.early_stop import EarlyStopPolicy
from ww_callbacks.actions.freeze import FreezePolicy
from ww_callbacks.actions.lr_balance import LRBalancePolicy
from ww_callbacks.actions.runner import EarlyStopAction, FreezeAction, LRBalanceAction

__all__ = ["ActionSet", "FREEZE_OPTIONS", "LR_OPTIONS", "EARLY_STOP_OPTIONS"]

#: Keys accepted in ``freeze_options`` (``preset`` is an alias of ``band``).
FREEZE_OPTIONS = ("band", "preset", "tol", "window", "max_share", "protect", "protect_head",
                  "unfreeze", "unfreeze_margin", "metric", "exclude_flags", "order")
#: Keys accepted in ``lr_options``.
LR_OPTIONS = ("s1", "s2", "metric", "min_evals", "exclude_first", "exclude_last", "exclude")
#: Keys accepted in ``early_stop_options``.
EARLY_STOP_OPTIONS = ("patience", "min_delta", "lower_bound", "metric")

_STATE_VERSION = 1


def _options(name: str, options: Any, allowed: tuple) -> Dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{name} must be a dict or None, got {options!r}")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {name} key(s) {unknown}; accepted: {list(allowed)}")
    return dict(options)


class ActionSet:
    """The policies behind one callback's ``freeze`` / ``balance_lr`` / ``early_stop`` keywords.

    Args:
        freeze: ``"off"`` (default), ``"suggest"`` (record and log only) or ``"apply"``.
        freeze_options: :class:`FreezePolicy` keywords: ``band`` or ``preset`` (``"default"``
            (2, 6), ``"vision"`` (2, 3), ``"nlp"`` (3, 4) or a ``(lo, hi)`` pair), ``tol``,
            ``window``, ``max_share``, ``protect``, ``protect_head``, ``unfreeze``,
            ``unfreeze_margin``, ``metric``, ``exclude_flags``.
        balance_lr: ``False`` (default), ``"suggest"`` (log the factors only) or ``True``.
        lr_options: :class:`LRBalancePolicy` keywords: ``s1``, ``s2``, ``metric``,
            ``min_evals``, ``exclude_first``, ``exclude_last``, ``exclude``.
        early_stop: ``False`` (default) or ``True``.
        early_stop_options: :class:`EarlyStopPolicy` keywords: ``patience``, ``min_delta``,
            ``lower_bound``, ``metric``.

    Raises:
        ValueError: an unknown mode, an unknown option key or a bad option value.
    """

    def __init__(self, freeze: Any = "off", freeze_options: Optional[Mapping[str, Any]] = None,
                 balance_lr: Any = False, lr_options: Optional[Mapping[str, Any]] = None,
                 early_stop: Any = False,
                 early_stop_options: Optional[Mapping[str, Any]] = None) -> None:
        fo = _options("freeze_options", freeze_options, FREEZE_OPTIONS)
        if "preset" in fo:
            if "band" in fo:
                raise ValueError("freeze_options: give band or preset, not both")
            fo["band"] = fo.pop("preset")
        if freeze is None or freeze is False:
            freeze = "off"
        if freeze is True or freeze not in ("off", "suggest", "apply"):
            raise ValueError(f"freeze must be 'off', 'suggest' or 'apply', got {freeze!r}")
        self.freeze_policy = FreezePolicy(freeze, **fo)
        lo = _options("lr_options", lr_options, LR_OPTIONS)
        if not (balance_lr is None or isinstance(balance_lr, bool)
                or (isinstance(balance_lr, str) and balance_lr in ("off", "suggest", "apply"))):
            raise ValueError(f"balance_lr must be False, 'suggest' or True, got {balance_lr!r}")
        self.lr_policy = LRBalancePolicy(balance_lr, **lo)
        eo = _options("early_stop_options", early_stop_options, EARLY_STOP_OPTIONS)
        if not isinstance(early_stop, bool):
            raise ValueError(f"early_stop must be True or False, got {early_stop!r}")
        if eo and not early_stop:
            raise ValueError("early_stop_options given but early_stop=False")
        self.stop_policy: Optional[EarlyStopPolicy] = EarlyStopPolicy(**eo) if early_stop else None
        self.freeze_action: Optional[FreezeAction] = None
        self.lr_action: Optional[LRBalanceAction] = None
        self.stop_action: Optional[EarlyStopAction] = None

    # ------------------------------------------------------------------ modes
    @property
    def freeze_mode(self) -> str:
        return self.freeze_policy.mode

    @property
    def lr_mode(self) -> str:
        return self.lr_policy.mode

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
        ``balance_lr=True``, ``stop_fn(reason)`` for ``early_stop=True``. Binding again (a new
        adapter on the same controller) keeps the policies' state.

        Raises:
            ValueError: an ``apply`` mode without its function.
        """
        if self.freeze_mode == "apply" and freeze_fn is None:
            raise ValueError("freeze='apply' needs a freeze_fn: the function that freezes layers in "
                             "your framework (the adapters bind it; see bind_actions)")
        if self.lr_mode == "apply" and lr_fn is None:
            raise ValueError("balance_lr=True needs an lr_fn: the function that sets per-layer LR "
                             "factors in your framework (the adapters bind it; see bind_actions)")
        self.freeze_action = self.lr_action = self.stop_action = None
        if self.freeze_policy.enabled:
            self.freeze_action = FreezeAction(self.freeze_policy, freeze_fn if self.freeze_mode == "apply"
                                              else None, sync_fn)
        if self.lr_policy.enabled:
            self.lr_action = LRBalanceAction(self.lr_policy, lr_fn if self.lr_mode == "apply" else None,
                                             sync_fn)
        if self.stop_policy is not None:
            self.stop_action = EarlyStopAction(self.stop_policy, stop_fn or (lambda reason: None),
                                               sync_fn)
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
        out: Dict[str, Any] = {"version": _STATE_VERSION}
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
        stop = "on" if self.stop_policy is not None else "off"
        return f"ActionSet(freeze={self.freeze_mode!r}, balance_lr={self.lr_mode!r}, early_stop={stop})"
