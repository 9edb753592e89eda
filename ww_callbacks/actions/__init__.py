"""Acting on the diagnosis: early freezing, per-layer learning rates, early stopping.

Everything here is framework-free (numpy only):

* policies that decide: :class:`FreezePolicy`, :class:`LRBalancePolicy` (TempBalance,
  :func:`tempbalance_factors`), :class:`EarlyStopPolicy`;
* controller actions (``on_analysis`` hook) that run a policy, report the decision and call the
  adapter's framework function: :class:`FreezeAction`, :class:`LRBalanceAction`,
  :class:`EarlyStopAction`.

The framework side lives in :mod:`ww_callbacks.torch_utils` and :mod:`ww_callbacks.keras_utils`.
"""

from __future__ import annotations

from ww_callbacks.actions._common import mean_metric, series_from_rows
from ww_callbacks.actions.early_stop import EarlyStopPolicy, StopDecision
from ww_callbacks.actions.freeze import (
                                         DEFAULT_EXCLUDE_FLAGS,
                                         PRESETS,
                                         FreezeDecision,
                                         FreezePolicy,
                                         is_adapter,
                                         relative_range,
)
from ww_callbacks.actions.lr_balance import LRBalancePolicy, LRDecision, tempbalance_factors
from ww_callbacks.actions.runner import EarlyStopAction, FreezeAction, LRBalanceAction, mean_series_from_rows

__all__ = [
    "FreezePolicy", "FreezeDecision", "PRESETS", "DEFAULT_EXCLUDE_FLAGS", "relative_range",
    "is_adapter",
    "LRBalancePolicy", "LRDecision", "tempbalance_factors",
    "EarlyStopPolicy", "StopDecision",
    "FreezeAction", "LRBalanceAction", "EarlyStopAction",
    "series_from_rows", "mean_series_from_rows", "mean_metric",
]

from ww_callbacks.actions.build import ActionSet  # noqa: E402

__all__ += ["ActionSet"]
