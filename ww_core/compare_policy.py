"""When a candidate model *regresses* against a baseline: :class:`RegressionPolicy`.

By default a layer regresses when (a) it newly carries a serious flag, (b) its alpha moved by more
than 1, or (c) its spectrum moved by more than 0.25 (:func:`spectrum_change`); (a) for the
alpha-based flags and (b) also need a material spectrum change (> 0.1), and (b) and (c) do not
apply to a layer the baseline already flagged ``under-trained`` (near-random: its alpha is
unreliable and it has no learned structure to lose). A power-law fit of a spectrum without a
clear heavy tail can jump between two ``xmin`` choices after a tiny weight update; the spectrum
measures separate such jumps from a layer whose weights really changed.
``benchmarks/gate_thresholds.py`` measures both on MiniLM-L6 (results in
``benchmarks/results/gate_thresholds.json`` and docs/model-gating.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["ALPHA_FLAGS", "SERIOUS_FLAGS", "Regression", "RegressionPolicy", "spectrum_change"]

#: Flags whose newly appearing on a layer is a regression under the default policy.
SERIOUS_FLAGS: Tuple[str, ...] = ("non-finite", "rank-collapse", "correlation-trap", "fit-failed",
                                  "under-trained", "over-trained")
#: Flags decided by the alpha of the fit alone (they need a material spectrum change too).
ALPHA_FLAGS: Tuple[str, ...] = ("under-trained", "over-trained")
#: Severity order of the reasons, worst first.
_ORDER = ("non-finite", "fit-failed", "rank-collapse", "correlation-trap", "under-trained",
          "over-trained", "delta-alpha", "spectrum-change", "removed", "added")


def spectrum_change(baseline: Any, candidate: Any) -> float:
    """How much a layer's spectrum moved, independently of the power-law fit: the largest of
    ``|Δlog10 stable_rank|``, ``|Δlog_spectral_norm|`` (decades) and ``|Δentropy|`` (the spectral
    entropy, 0..1). ``inf`` when either side has no finite value (e.g. a failed fit)."""
    values = []
    for a, b, log in ((baseline.stable_rank, candidate.stable_rank, True),
                      (baseline.log_spectral_norm, candidate.log_spectral_norm, False),
                      (baseline.entropy, candidate.entropy, False)):
        if not (math.isfinite(a) and math.isfinite(b)) or (log and (a <= 0 or b <= 0)):
            continue
        values.append(abs(math.log10(b / a)) if log else abs(b - a))
    return max(values) if values else math.inf


@dataclass(frozen=True)
class Regression:
    """One regressed layer, with why (``reasons``, worst first) and its alpha change."""

    layer: str
    reasons: Tuple[str, ...]
    d_alpha: float = math.nan

    @property
    def rank(self) -> Tuple[int, float]:
        """Sort key, worst first: the worst reason, then the larger ``|Δalpha|``."""
        worst = min(_ORDER.index(r.split(" ")[0]) if r.split(" ")[0] in _ORDER else len(_ORDER)
                    for r in self.reasons)
        size = abs(self.d_alpha) if math.isfinite(self.d_alpha) else math.inf
        return worst, -size

    def to_dict(self) -> Dict[str, Any]:
        return {"layer": self.layer, "reasons": list(self.reasons),
                "d_alpha": self.d_alpha if math.isfinite(self.d_alpha) else None}


@dataclass(frozen=True)
class RegressionPolicy:
    """What makes a compared layer a regression (:meth:`ww_core.Comparison.regressions`).

    Args:
        flags: a layer newly carrying one of these flags regresses (default :data:`SERIOUS_FLAGS`);
            ``under-trained`` / ``over-trained`` count only with a material spectrum change.
        max_delta_alpha: a layer whose ``|Δalpha|`` exceeds this, with a material spectrum change,
            regresses; ``None`` turns the criterion off.
        min_spectrum_change: the :func:`spectrum_change` that is material (default 0.1).
        max_spectrum_change: a layer whose :func:`spectrum_change` exceeds this regresses on
            that alone (``None``: off). Default 0.25: it catches a layer whose weights were
            replaced while its alpha stayed put.
        removed, added: a layer removed from (added to) the model regresses.

    ``max_delta_alpha`` and ``max_spectrum_change`` do not judge a layer the baseline flagged
    ``under-trained`` or ``too-few-evals``, nor one the candidate flags ``too-few-evals``.

    Example:
        >>> RegressionPolicy.parse("rank-collapse,non-finite,alpha=1.5").max_delta_alpha
        1.5
    """

    flags: Tuple[str, ...] = SERIOUS_FLAGS
    max_delta_alpha: Optional[float] = 1.0
    min_spectrum_change: float = 0.1
    max_spectrum_change: Optional[float] = 0.25
    removed: bool = False
    added: bool = False

    def __post_init__(self) -> None:
        if self.max_delta_alpha is not None and not self.max_delta_alpha >= 0:
            raise ValueError(f"max_delta_alpha must be >= 0 or None, got {self.max_delta_alpha!r}")
        if self.max_spectrum_change is not None and not self.max_spectrum_change >= 0:
            raise ValueError(f"max_spectrum_change must be >= 0 or None, got {self.max_spectrum_change!r}")
        if not self.min_spectrum_change >= 0:
            raise ValueError(f"min_spectrum_change must be >= 0, got {self.min_spectrum_change!r}")
        unknown = [f for f in self.flags if f not in SERIOUS_FLAGS + ("too-few-evals",)]
        if unknown:
            raise ValueError(f"unknown flag(s) {unknown}; choose from "
                             f"{', '.join(SERIOUS_FLAGS + ('too-few-evals',))}")

    @classmethod
    def parse(cls, spec: str) -> "RegressionPolicy":
        """A policy from a comma-separated spec (``ww-analyze --fail-on``).

        Items: ``default`` (the default policy), ``flags`` (every serious flag), a flag name
        (e.g. ``rank-collapse``), ``alpha=X`` (``|Δalpha|`` threshold), ``change=X``
        (:attr:`min_spectrum_change`), ``spectrum=X`` (:attr:`max_spectrum_change`), ``removed``,
        ``added``, ``none`` (never regress; report only). Items add up; without a flag item no
        flag counts, without ``alpha=`` the ``|Δalpha|`` criterion is off.

        Raises:
            ValueError: an unknown item or a bad number (one line).
        """
        items = [s.strip().lower() for s in str(spec).split(",") if s.strip()]
        if not items:
            raise ValueError("--fail-on is empty; e.g. --fail-on default or --fail-on flags,alpha=1")
        if "default" in items:
            policy = cls()
            items = [i for i in items if i != "default"]
        else:
            policy = cls(flags=(), max_delta_alpha=None, max_spectrum_change=None)
        flags: List[str] = list(policy.flags)
        changes: Dict[str, Any] = {}
        for item in items:
            key, _, value = item.partition("=")
            if item == "none":
                return cls(flags=(), max_delta_alpha=None, max_spectrum_change=None)
            if item == "flags":
                flags += [f for f in SERIOUS_FLAGS if f not in flags]
            elif item in SERIOUS_FLAGS:
                flags += [item] if item not in flags else []
            elif item in ("removed", "added"):
                changes[item] = True
            elif key in ("alpha", "change", "spectrum") and value:
                try:
                    number = float(value)
                except ValueError:
                    raise ValueError(f"--fail-on {key}= needs a number, got {value!r}") from None
                if not number >= 0:
                    raise ValueError(f"--fail-on {key}= must be >= 0, got {value}")
                changes[{"alpha": "max_delta_alpha", "change": "min_spectrum_change",
                         "spectrum": "max_spectrum_change"}[key]] = number
            else:
                raise ValueError(f"--fail-on: unknown item {item!r}; use default, flags, none, "
                                 f"removed, added, alpha=X, change=X, spectrum=X or one of "
                                 f"{', '.join(SERIOUS_FLAGS)}")
        return replace(policy, flags=tuple(flags), **changes)

    def describe(self) -> str:
        """One line: what counts as a regression."""
        parts = []
        if self.flags:
            parts.append("a newly raised " + "/".join(self.flags) + " flag")
        if self.max_delta_alpha is not None:
            parts.append(f"|Δalpha| > {self.max_delta_alpha:g}")
        if self.max_spectrum_change is not None:
            parts.append(f"a spectrum change > {self.max_spectrum_change:g}")
        if self.removed:
            parts.append("a removed layer")
        if self.added:
            parts.append("an added layer")
        if not parts:
            return "regression: never (report only)"
        alpha_based = [f for f in self.flags if f in ALPHA_FLAGS] or self.max_delta_alpha is not None
        tail = (f" (alpha criteria need a spectrum change > {self.min_spectrum_change:g})"
                if alpha_based else "")
        return "regression: " + " or ".join(parts) + tail

    def to_dict(self) -> Dict[str, Any]:
        return {"flags": list(self.flags), "max_delta_alpha": self.max_delta_alpha,
                "min_spectrum_change": self.min_spectrum_change,
                "max_spectrum_change": self.max_spectrum_change, "removed": self.removed,
                "added": self.added}
