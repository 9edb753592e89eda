"""Controller actions: glue between the pure policies and a framework's "apply" functions.

Each action implements the controller hook ``on_analysis(controller, result, step, epoch)``
(called on every rank after the history is written), asks its policy, reports the decision with
``controller.log_event`` (log line + trackers, rank 0 only) and, in ``"apply"`` mode, calls the
framework function the adapter gave it. The policies stay framework-free; the adapters pass
closures over :mod:`ww_callbacks.torch_utils` or :mod:`ww_callbacks.keras_utils`.

Example:
    >>> from ww_callbacks.actions import FreezePolicy, FreezeAction
    >>> action = FreezeAction(FreezePolicy("suggest"))      # suggest: no apply_fn needed
    >>> # WeightWatcherController(..., actions=[action])
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from ww_callbacks.actions._common import finite, series_from_rows
from ww_callbacks.actions.early_stop import EarlyStopPolicy, StopDecision
from ww_callbacks.actions.freeze import FreezeDecision, FreezePolicy
from ww_callbacks.actions.lr_balance import LRBalancePolicy, LRDecision

__all__ = ["FreezeAction", "LRBalanceAction", "EarlyStopAction", "mean_series_from_rows"]

#: ``sync_fn(obj) -> obj``: returns rank 0's ``obj`` on every rank (e.g.
#: :func:`ww_callbacks.torch_utils.broadcast_object`); identity when not distributed.
SyncFn = Callable[[Any], Any]


def mean_series_from_rows(rows: Sequence[Mapping[str, Any]], metric: str = "alpha") -> List[float]:
    """Mean of the finite ``metric`` values per analysed step, in step order (nan if none).

    Example:
        >>> mean_series_from_rows([{"step": 1, "alpha": 3.0}, {"step": 1, "alpha": 5.0},
        ...                        {"step": 2, "alpha": 2.0}])
        [4.0, 2.0]
    """
    by_step: Dict[int, List[float]] = {}
    for row in rows:
        values = by_step.setdefault(int(row.get("step", 0)), [])
        if finite(row.get(metric)):
            values.append(float(row[metric]))
    return [sum(v) / len(v) if v else math.nan for _, v in sorted(by_step.items())]


def _rows(controller: Any) -> List[Mapping[str, Any]]:
    history = getattr(controller, "history", None)
    return list(getattr(history, "rows", None) or [])


def _series(controller: Any, metric: str, window: int) -> Dict[str, List[float]]:
    """Per-layer series of ``metric``: the history's bounded recent window (no re-reading of the
    written rows) when it covers ``window`` analyses, else rebuilt from every row."""
    history = getattr(controller, "history", None)
    if hasattr(history, "series") and window <= getattr(getattr(history, "index", None), "window", 0):
        return history.series(metric)
    return series_from_rows(_rows(controller), metric)


def _mean_series(controller: Any, metric: str) -> List[float]:
    history = getattr(controller, "history", None)
    if hasattr(history, "mean_series"):
        return history.mean_series(metric)
    return mean_series_from_rows(_rows(controller), metric)


def _event(controller: Any, step: int, kind: str, payload: Dict[str, Any]) -> None:
    log_event = getattr(controller, "log_event", None)
    if log_event is not None:
        log_event(step, kind, payload)


class FreezeAction:
    """Runs a :class:`FreezePolicy` at every analysis.

    Args:
        policy: the policy (its ``mode`` decides whether ``apply_fn`` is called).
        apply_fn: ``apply_fn(freeze: list[str], unfreeze: list[str])``, called in ``"apply"``
            mode with the layer names to change, e.g.
            ``lambda f, u: (torch_utils.freeze_layers(model, f, optimizers),
            torch_utils.unfreeze_layers(model, u))``.
        sync_fn: makes every rank use rank 0's decision (DDP), see :data:`SyncFn`.

    Events: ``"freeze"`` (apply) or ``"freeze-suggestion"`` (suggest), payload
    ``FreezeDecision.to_dict()``.
    """

    def __init__(self, policy: FreezePolicy,
                 apply_fn: Optional[Callable[[List[str], List[str]], Any]] = None,
                 sync_fn: Optional[SyncFn] = None) -> None:
        if not isinstance(policy, FreezePolicy):
            raise ValueError(f"policy must be a FreezePolicy, got {type(policy).__name__}")
        if policy.mode == "apply" and apply_fn is None:
            raise ValueError("freeze mode 'apply' needs an apply_fn (the adapter's freezer)")
        self.policy, self.apply_fn, self.sync_fn = policy, apply_fn, sync_fn
        self.last: Optional[FreezeDecision] = None

    def on_analysis(self, controller: Any, result: Any, step: int, epoch: int) -> None:
        if not self.policy.enabled:
            return
        # the analysis at the end of training: a freeze there would save nothing
        total = getattr(getattr(controller, "schedule", None), "total_steps", None)
        decision = self.policy.decide(_series(controller, self.policy.metric, self.policy.window),
                                      result, step=step, epoch=epoch,
                                      final=total is not None and step >= total)
        if self.sync_fn is not None:
            # rank 0's decision and bookkeeping win, so every rank freezes the same parameters
            state, payload = self.sync_fn((self.policy.state_dict(), decision.to_dict()))
            self.policy.load_state_dict(state)
            decision = FreezeDecision(**payload)
        self.last = decision
        if not decision:
            return
        kind = "freeze" if self.policy.mode == "apply" else "freeze-suggestion"
        _event(controller, step, kind, decision.to_dict())
        if self.policy.mode == "apply":
            self.apply_fn(list(decision.freeze), list(decision.unfreeze))

    def reapply(self) -> None:
        """After a resume: freeze :attr:`FreezePolicy.frozen` again (``apply`` mode only)."""
        if self.policy.mode == "apply" and self.policy.frozen:
            self.apply_fn(list(self.policy.frozen), [])

    def state_dict(self) -> Dict[str, Any]:
        return self.policy.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.policy.load_state_dict(state)


class LRBalanceAction:
    """Runs an :class:`LRBalancePolicy` at every analysis.

    Args:
        policy: the policy.
        apply_fn: ``apply_fn(factors: dict[layer name, float])``, called in ``"apply"`` mode;
            layers missing from ``factors`` must go back to factor 1 (both
            :func:`ww_callbacks.torch_utils.apply_lr_factors` and the Keras scaler do).
        sync_fn: makes every rank use rank 0's factors (DDP).

    Events: ``"lr-factors"`` (apply) or ``"lr-factors-suggestion"`` (suggest), payload
    ``{"factors": {...}, "untuned": {...}}``.
    """

    def __init__(self, policy: LRBalancePolicy,
                 apply_fn: Optional[Callable[[Dict[str, float]], Any]] = None,
                 sync_fn: Optional[SyncFn] = None) -> None:
        if not isinstance(policy, LRBalancePolicy):
            raise ValueError(f"policy must be an LRBalancePolicy, got {type(policy).__name__}")
        if policy.mode == "apply" and apply_fn is None:
            raise ValueError("balance_lr=True needs an apply_fn (the adapter's LR setter)")
        self.policy, self.apply_fn, self.sync_fn = policy, apply_fn, sync_fn
        self.last: Optional[LRDecision] = None

    def on_analysis(self, controller: Any, result: Any, step: int, epoch: int) -> None:
        if not self.policy.enabled:
            return
        decision = self.policy.compute(result, step=step, epoch=epoch)
        if self.sync_fn is not None:
            decision = LRDecision(**self.sync_fn(decision.to_dict()))
            self.policy.factors = dict(decision.factors)
        self.last = decision
        kind = "lr-factors" if self.policy.mode == "apply" else "lr-factors-suggestion"
        _event(controller, step, kind, {"factors": decision.factors, "untuned": decision.untuned})
        if self.policy.mode == "apply":
            self.apply_fn(dict(decision.factors))

    def state_dict(self) -> Dict[str, Any]:
        return self.policy.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.policy.load_state_dict(state)


class EarlyStopAction:
    """Runs an :class:`EarlyStopPolicy` on the per-analysis mean alpha of the history.

    Args:
        policy: the policy.
        stop_fn: ``stop_fn(reason: str)``: ask the trainer to stop (Lightning
            ``trainer.should_stop = True``; HF: set a flag that ``on_step_end`` copies into
            ``control.should_training_stop``; Keras ``model.stop_training = True``).
        sync_fn: makes every rank follow rank 0's decision (DDP: all ranks must stop together).
        suggest: only log the decision (once), never call ``stop_fn``.

    Event: ``"early-stop"`` (``"early-stop-suggestion"`` with ``suggest``) with
    ``{"reason": ..., "mean_alpha": ...}``.
    """

    def __init__(self, policy: EarlyStopPolicy, stop_fn: Callable[[str], Any],
                 sync_fn: Optional[SyncFn] = None, suggest: bool = False) -> None:
        if not isinstance(policy, EarlyStopPolicy):
            raise ValueError(f"policy must be an EarlyStopPolicy, got {type(policy).__name__}")
        if not callable(stop_fn):
            raise ValueError("stop_fn must be callable")
        self.policy, self.stop_fn, self.sync_fn = policy, stop_fn, sync_fn
        self.suggest = bool(suggest)
        self.last: Optional[StopDecision] = None

    def on_analysis(self, controller: Any, result: Any, step: int, epoch: int) -> None:
        series = _mean_series(controller, self.policy.metric)
        decision = self.policy.should_stop(series)
        if self.sync_fn is not None:
            decision = StopDecision(**self.sync_fn(decision.to_dict()))
        self.last = decision
        if not decision.stop or (self.suggest and self.policy.stopped is not None):
            return
        self.policy.record(decision, step=step, epoch=epoch)
        _event(controller, step, "early-stop-suggestion" if self.suggest else "early-stop",
               {"reason": decision.reason, "mean_alpha": series[-1] if series else None})
        if not self.suggest:
            self.stop_fn(decision.reason)

    def state_dict(self) -> Dict[str, Any]:
        return self.policy.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.policy.load_state_dict(state)
