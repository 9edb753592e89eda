"""Drift from a reference during training: each analysis compared with the pretrained model (or a
saved analysis), reduced to a few scalars a tracker can plot.

Framework-free: it takes analysis results and returns numbers. The reference is analysed once,
when the monitor is made, so a live model passed as the reference is measured *before* training
changes it. The comparison is :func:`ww_core.compare`'s: layers are matched by name (a task
model's ``bert.``-style prefix is aligned with the base model's names), layers an analysis left
out count as not analysed, and a layer is *newly flagged* when it carries a serious flag the
reference did not (``too-few-evals`` never counts).

Example:
    >>> import numpy as np, ww_core
    >>> from ww_callbacks.drift import DriftMonitor
    >>> rng = np.random.default_rng(0)
    >>> w = np.linalg.qr(rng.standard_normal((300, 300)))[0] @ np.diag(np.arange(1, 301.0) ** -1.5)
    >>> pretrained = {"fc.weight": w @ np.linalg.qr(rng.standard_normal((300, 150)))[0]}
    >>> monitor = DriftMonitor(pretrained)
    >>> report = monitor.measure(ww_core.analyze({"fc.weight": pretrained["fc.weight"] * 1.01}))
    >>> report.scalars()["drift_newly_flagged"], round(report.max_abs_delta_alpha, 6)
    (0, 0.0)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import ww_core
from ww_core import AnalysisResult, RegressionPolicy, load_result

__all__ = ["DriftMonitor", "DriftReport"]

#: Flags that make a layer "newly flagged" (every flag but ``too-few-evals``).
_IGNORED_FLAGS = ("too-few-evals",)


@dataclass
class DriftReport:
    """One analysis compared with the reference.

    Attributes:
        newly_flagged: layers carrying a flag the reference did not (``too-few-evals`` aside).
        max_abs_delta_alpha: the largest ``|Δalpha|`` over the compared layers (``nan``: none).
        max_delta_alpha_layer: the layer it was measured on (``None``: none).
        max_spectrum_change: the largest spectrum change (``ww_core.compare``'s measure).
        regressions: layers regressed under the monitor's policy, worst first.
        compared, not_analysed: counts of layers.
        delta_alpha_weighted: the model-level ``alpha_weighted`` minus the reference's.
    """

    newly_flagged: List[str] = field(default_factory=list)
    max_abs_delta_alpha: float = math.nan
    max_delta_alpha_layer: Optional[str] = None
    max_spectrum_change: float = math.nan
    regressions: List[str] = field(default_factory=list)
    compared: int = 0
    not_analysed: int = 0
    delta_alpha_weighted: float = math.nan

    def scalars(self, prefix: str = "drift_") -> Dict[str, float]:
        """The numbers a tracker plots: ``<prefix>newly_flagged``, ``max_abs_delta_alpha``,
        ``max_spectrum_change``, ``regressions``, ``compared``, ``delta_alpha_weighted`` (the
        default prefix fits the trackers' key scheme: letters, digits and ``_``)."""
        return {f"{prefix}newly_flagged": len(self.newly_flagged),
                f"{prefix}max_abs_delta_alpha": self.max_abs_delta_alpha,
                f"{prefix}max_spectrum_change": self.max_spectrum_change,
                f"{prefix}regressions": len(self.regressions),
                f"{prefix}compared": self.compared,
                f"{prefix}delta_alpha_weighted": self.delta_alpha_weighted}

    def to_dict(self) -> Dict[str, Any]:
        """Everything, JSON-ready (non-finite numbers as ``None``): for an event or a report."""
        def num(x: float) -> Optional[float]:
            return x if math.isfinite(x) else None

        return {"newly_flagged": list(self.newly_flagged),
                "max_abs_delta_alpha": num(self.max_abs_delta_alpha),
                "max_delta_alpha_layer": self.max_delta_alpha_layer,
                "max_spectrum_change": num(self.max_spectrum_change),
                "regressions": list(self.regressions), "compared": self.compared,
                "not_analysed": self.not_analysed,
                "delta_alpha_weighted": num(self.delta_alpha_weighted)}


class DriftMonitor:
    """Compares each analysis of a training run with a reference.

    Args:
        reference: the pretrained model (a torch or Keras model, a state dict, a weights path or
            a cached Hugging Face id), a saved analysis (``.json``) or an
            :class:`~ww_core.AnalysisResult`. A model is analysed here, once.
        policy: what :attr:`DriftReport.regressions` counts (default
            :class:`ww_core.RegressionPolicy`'s defaults).
        analyze_options: keywords of :func:`ww_core.analyze` for analysing a reference model;
            use the run's own (``layers``, ``min_evals``, ...) so both sides are measured alike.

    Raises:
        FileNotFoundError, ww_core.SourceError: an unreadable reference.
        ValueError: an invalid option.
    """

    def __init__(self, reference: Any, policy: Optional[RegressionPolicy] = None,
                 analyze_options: Optional[Mapping[str, Any]] = None):
        self.policy = policy or RegressionPolicy()
        options = dict(analyze_options or {})
        if isinstance(reference, AnalysisResult):
            self.reference = reference
        elif isinstance(reference, (str, os.PathLike)) and os.fspath(reference).lower().endswith(".json"):
            self.reference = load_result(reference)
        elif isinstance(reference, (str, os.PathLike)):
            # a weights path or a cached Hugging Face id: compare() resolves both (an empty
            # candidate costs nothing)
            self.reference = ww_core.compare(os.fspath(reference), AnalysisResult(), **options).baseline
        else:
            self.reference = ww_core.analyze(reference, **options)

    def measure(self, result: AnalysisResult) -> DriftReport:
        """Compare one analysis with the reference."""
        cmp = ww_core.compare(self.reference, result, policy=self.policy)
        compared = cmp.compared
        finite = [c for c in compared if math.isfinite(c.d_alpha)]
        top = max(finite, key=lambda c: abs(c.d_alpha), default=None)
        changes = [c.spectrum_change for c in compared if math.isfinite(c.spectrum_change)]
        summary = cmp.summary()
        return DriftReport(
            newly_flagged=[c.name for c in compared if set(c.flags_raised) - set(_IGNORED_FLAGS)],
            max_abs_delta_alpha=abs(top.d_alpha) if top else math.nan,
            max_delta_alpha_layer=top.name if top else None,
            max_spectrum_change=max(changes) if changes else math.nan,
            regressions=[r.layer for r in cmp.regressions()],
            compared=len(compared), not_analysed=len(cmp.not_analysed),
            delta_alpha_weighted=summary["delta_alpha_weighted"])
