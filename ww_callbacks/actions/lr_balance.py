"""Per-layer learning rates from alpha: TempBalance's ``tb_linear_map`` (framework-free policy).

TempBalance (Zhou et al., NeurIPS 2023; code ``YefanZhou/TempBalance``, ``get_layer_temps``)
gives each tuned layer the factor

    f_l = np.interp(alpha_l, [alpha_min, alpha_max], [s1, s2])

of the scheduled LR, with alpha_min/alpha_max taken over the tuned layers at this analysis.
A **higher** alpha (lighter tail, less trained) gets a **larger** LR. The mean factor is not
renormalised (TB does not either). Tuned layers, as in TB: every analysed layer except the first
and the last (the classifier) and those with fewer than ``min_layer_evals`` (50) eigenvalues; all other
parameters keep factor 1 (TB's "untuned" group at the global LR).

TB ranks with its median Hill estimator, our ``LayerResult.alpha_hill`` (``metric="alpha_hill"``,
the default); only the ranking and spacing matter, so the Hill scale is fine here.

Applying the factors is the adapter's job (:func:`ww_callbacks.torch_utils.apply_lr_factors`,
:class:`ww_callbacks.keras_utils.LayerLRScaler`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np

from ww_callbacks.actions._common import (
    Patterns,
    check_metric,
    compile_patterns,
    finite,
    matches,
    normalise_mode,
)

__all__ = ["tempbalance_factors", "LRBalancePolicy", "LRDecision"]

_MODES = {"off": "off", False: "off", None: "off", "suggest": "suggest", "apply": "apply",
          True: "apply"}
_STATE_VERSION = 1


def _check_bounds(s1: Any, s2: Any) -> None:
    if not (finite(s1) and finite(s2)) or s1 <= 0 or s2 < s1:
        raise ValueError(f"need finite factors 0 < s1 <= s2, got s1={s1!r}, s2={s2!r}")


def tempbalance_factors(alphas: Mapping[str, float], s1: float = 0.5,
                        s2: float = 1.5) -> Dict[str, float]:
    """TempBalance's linear map from alpha to an LR factor in ``[s1, s2]``.

    Args:
        alphas: ``{layer name: alpha}`` of the tuned layers. Non-finite values get no factor.
        s1: factor of the layer with the smallest alpha (TB ``lr_min_ratio``, default 0.5).
        s2: factor of the layer with the largest alpha (TB ``lr_max_ratio``, default 1.5).

    Returns:
        ``{name: factor}``, exactly ``np.interp(alpha, [min, max], [s1, s2])``. When all alphas
        are equal (or there is one layer) every factor is ``(s1 + s2) / 2``; ``np.interp`` with
        equal end points would return ``s2``, an artefact rather than a decision.

    Raises:
        ValueError: ``s1``/``s2`` not ``0 < s1 <= s2``.

    Example:
        >>> tempbalance_factors({"a": 2.0, "b": 3.0, "c": 4.0})
        {'a': 0.5, 'b': 1.0, 'c': 1.5}
    """
    _check_bounds(s1, s2)
    good = {str(k): float(v) for k, v in alphas.items() if finite(v)}
    if not good:
        return {}
    lo, hi = min(good.values()), max(good.values())
    if hi == lo:
        return {k: (s1 + s2) / 2.0 for k in good}
    return {k: float(np.interp(v, [lo, hi], [s1, s2])) for k, v in good.items()}


@dataclass
class LRDecision:
    """Factors from one analysis: ``factors`` for the tuned layers (others keep 1.0)."""

    factors: Dict[str, float] = field(default_factory=dict)
    untuned: Dict[str, str] = field(default_factory=dict)
    mode: str = "off"
    step: Optional[int] = None
    epoch: Optional[int] = None

    def __bool__(self) -> bool:
        return bool(self.factors)

    def factor(self, name: str) -> float:
        """The factor for ``name`` (1.0 for an untuned or unknown layer)."""
        return self.factors.get(name, 1.0)

    def to_dict(self) -> Dict[str, Any]:
        return {"mode": self.mode, "step": self.step, "epoch": self.epoch,
                "factors": dict(self.factors), "untuned": dict(self.untuned)}


class LRBalancePolicy:
    """Computes per-layer LR factors (TempBalance) at each analysis and keeps the latest.

    Args:
        mode: ``False``/``"off"`` (default), ``"suggest"`` (factors are computed and logged,
            nothing is applied) or ``True``/``"apply"``.
        s1, s2: factor bounds (TB defaults 0.5 / 1.5; TB uses 0.6 / 1.4 with other regularisers).
        metric: ``"alpha_hill"`` (TB's estimator, default) or ``"alpha"``.
        min_layer_evals: layers with fewer eigenvalues are untuned (TB ``eigs_thresh=50``).
        exclude_first: leave the first analysed layer untuned (TB ``remove_first_layer``).
        exclude_last: leave the last analysed layer (the head) untuned (TB ``remove_last_layer``).
        exclude: regex or list of regexes of further layers to leave untuned.
        keep_log: how many past decisions :attr:`log` keeps (bounded so checkpoints stay small).

    "First" and "last" are the first and last *analysed* layers in model order; TB counts all
    Conv2d/Linear modules, which differs only when the engine skipped the first or last one.

    Example:
        >>> from types import SimpleNamespace as L
        >>> layers = [L(name=n, alpha_hill=a, num_evals=64) for n, a in
        ...           [("stem", 5.0), ("b1", 2.0), ("b2", 3.0), ("head", 4.0)]]
        >>> LRBalancePolicy(True).compute(layers).factors
        {'b1': 0.5, 'b2': 1.5}
    """

    def __init__(self, mode: Union[str, bool, None] = False, s1: float = 0.5, s2: float = 1.5,
                 metric: str = "alpha_hill", min_layer_evals: int = 50, exclude_first: bool = True,
                 exclude_last: bool = True, exclude: Patterns = None, keep_log: int = 1000) -> None:
        self.mode = normalise_mode("balance_lr", mode, _MODES)
        _check_bounds(s1, s2)
        if isinstance(min_layer_evals, bool) or not isinstance(min_layer_evals, int) or min_layer_evals < 0:
            raise ValueError(f"min_layer_evals must be an int >= 0, got {min_layer_evals!r}")
        if isinstance(keep_log, bool) or not isinstance(keep_log, int) or keep_log < 0:
            raise ValueError(f"keep_log must be an int >= 0, got {keep_log!r}")
        self.s1, self.s2 = float(s1), float(s2)
        self.metric = check_metric(metric)
        self.min_layer_evals = min_layer_evals
        self.exclude_first = bool(exclude_first)
        self.exclude_last = bool(exclude_last)
        self.exclude = list(exclude) if isinstance(exclude, (list, tuple)) else exclude
        self._exclude = compile_patterns("exclude", exclude)
        self.keep_log = keep_log
        #: Factors of the latest analysis (``{name: factor}``, tuned layers only).
        self.factors: Dict[str, float] = {}
        #: Past decisions, oldest first, at most ``keep_log``.
        self.log: List[Dict[str, Any]] = []

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def compute(self, latest_result: Any, step: Optional[int] = None,
                epoch: Optional[int] = None) -> LRDecision:
        """Factors for this analysis; updates :attr:`factors` and :attr:`log` (not in "off" mode).

        Args:
            latest_result: an ``AnalysisResult`` or an iterable of ``LayerResult`` (model order).
            step, epoch: recorded with the decision.
        """
        decision = LRDecision(mode=self.mode, step=step, epoch=epoch)
        if self.mode == "off":
            return decision
        layers = list(getattr(latest_result, "layers", latest_result))
        alphas: Dict[str, float] = {}
        for i, layer in enumerate(layers):
            name = layer.name
            value = getattr(layer, self.metric, math.nan)
            if self.exclude_first and i == 0:
                decision.untuned[name] = "first layer"
            elif self.exclude_last and i == len(layers) - 1:
                decision.untuned[name] = "last layer (head)"
            elif int(getattr(layer, "num_evals", 0) or 0) < self.min_layer_evals:
                decision.untuned[name] = f"fewer than {self.min_layer_evals} eigenvalues"
            elif matches(self._exclude, name):
                decision.untuned[name] = "excluded"
            elif not finite(value):
                decision.untuned[name] = f"{self.metric} not finite"
            else:
                alphas[name] = float(value)
        decision.factors = tempbalance_factors(alphas, self.s1, self.s2)
        self.factors = dict(decision.factors)
        if self.keep_log:
            self.log.append(decision.to_dict())
            del self.log[:-self.keep_log]
        return decision

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state: the latest factors and the latest log entry (bounded, so
        checkpoints stay small; every decision is also in the run folder's ``decisions.jsonl``)."""
        return {"version": _STATE_VERSION, "mode": self.mode, "factors": dict(self.factors),
                "log": [dict(d) for d in self.log[-1:]]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Torch optimizers/schedulers carry the applied LRs in their
        own state; Keras needs the factors re-installed (:class:`LayerLRScaler`)."""
        if not state:
            return
        if int(state.get("version", _STATE_VERSION)) > _STATE_VERSION:
            raise ValueError(f"lr_balance state version {state.get('version')} is newer than "
                             f"supported ({_STATE_VERSION})")
        self.factors = {str(k): float(v) for k, v in state.get("factors", {}).items()}
        self.log = [dict(d) for d in state.get("log", [])]

    def __repr__(self) -> str:
        return (f"LRBalancePolicy(mode={self.mode!r}, s1={self.s1}, s2={self.s2}, "
                f"metric={self.metric!r}, min_layer_evals={self.min_layer_evals})")
