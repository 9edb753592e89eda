"""Compare two analyses of a model, layer by layer: :func:`compare` → :class:`Comparison`.

Each side may be a torch or Keras model, a state dict, a weights file or folder, a Hugging Face
model id in the local cache, or a saved analysis (:meth:`ww_core.AnalysisResult.save`). A layer in
only one side is *added* or *removed* when the other side's model lacks it, and *not analysed*
when that model has it but the analysis left it out (a selection, a size bound): a partial
analysis never reports layers as removed. What counts as a regression is a
:class:`~ww_core.compare_policy.RegressionPolicy`; reports are in :mod:`ww_core.compare_report`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .compare_policy import ALPHA_FLAGS, Regression, RegressionPolicy, spectrum_change
from .model_source import result_of, reusable_options
from .result import AnalysisResult, LayerResult
from .selection import LayerSelector

__all__ = ["DELTA_METRICS", "Comparison", "LayerChange", "compare"]

#: Columns whose candidate − baseline difference each compared layer reports.
DELTA_METRICS: Tuple[str, ...] = ("alpha", "alpha_weighted", "log_alpha_norm", "log_norm",
                                  "log_spectral_norm", "stable_rank", "entropy", "alpha_hill")
#: Options that change the numbers: a comparison notes when the two sides differ in one.
_VALUE_OPTIONS = ("conv2d_norm", "split_qkv", "fix_fingers", "max_fingers", "finger_thresh",
                  "randomize", "peft", "base_model", "solver", "rank_tol", "rank_collapse_share",
                  "hill_xmin_pos", "fit")
#: ``analyze`` keywords that do not change what is measured.
_NOT_MEASURING = ("progress", "batch_elements", "keep_evals")


@dataclass
class LayerChange:
    """One layer of a comparison.

    ``status``: ``"compared"`` (in both analyses), ``"added"`` / ``"removed"`` (the other model
    lacks it), or ``"not analysed"`` (the model on side ``missing_in`` has it, but that analysis
    left it out; ``note`` says why when known).
    """

    name: str
    type: str
    status: str
    baseline: Optional[LayerResult] = None
    candidate: Optional[LayerResult] = None
    missing_in: str = ""
    note: str = ""

    def delta(self, metric: str) -> float:
        """Candidate − baseline of a column (``nan`` unless both sides were analysed)."""
        if self.baseline is None or self.candidate is None:
            return math.nan
        return float(getattr(self.candidate, metric)) - float(getattr(self.baseline, metric))

    @property
    def d_alpha(self) -> float:
        return self.delta("alpha")

    @property
    def d_log_norm(self) -> float:
        return self.delta("log_norm")

    @property
    def d_stable_rank(self) -> float:
        return self.delta("stable_rank")

    @property
    def flags_raised(self) -> Tuple[str, ...]:
        """Flags the candidate carries and the baseline did not (compared layers only)."""
        if self.baseline is None or self.candidate is None:
            return ()
        return tuple(f for f in self.candidate.flags if f not in self.baseline.flags)

    @property
    def flags_cleared(self) -> Tuple[str, ...]:
        """Flags the baseline carried and the candidate does not."""
        if self.baseline is None or self.candidate is None:
            return ()
        return tuple(f for f in self.baseline.flags if f not in self.candidate.flags)

    @property
    def spectrum_change(self) -> float:
        """:func:`~ww_core.compare_policy.spectrum_change` of the two sides (``nan`` if one is missing)."""
        if self.baseline is None or self.candidate is None:
            return math.nan
        return spectrum_change(self.baseline, self.candidate)

    def regression(self, policy: RegressionPolicy) -> Optional[Regression]:
        """This layer's :class:`Regression` under ``policy``, or ``None``."""
        if self.status in ("removed", "added"):
            flagged = policy.removed if self.status == "removed" else policy.added
            return Regression(self.name, (self.status,)) if flagged else None
        if self.status != "compared":
            return None
        material = self.spectrum_change > policy.min_spectrum_change
        reasons = [f for f in self.flags_raised if f in policy.flags
                   and (f not in ALPHA_FLAGS or material)]
        # alpha of a fit on too few eigenvalues, or of a layer the baseline already found
        # under-trained (near-random: no clear tail, no learned structure to lose), is not judged
        judged = not {"too-few-evals", "under-trained"} & set(self.baseline.flags) and (
            "too-few-evals" not in self.candidate.flags)
        d = self.d_alpha
        if (policy.max_delta_alpha is not None and material and judged and math.isfinite(d)
                and abs(d) > policy.max_delta_alpha):
            reasons.append(f"delta-alpha {d:+.2f}")
        change = self.spectrum_change
        if (policy.max_spectrum_change is not None and math.isfinite(change) and judged
                and change > policy.max_spectrum_change):
            reasons.append(f"spectrum-change {change:.2f}")
        return Regression(self.name, tuple(reasons), d) if reasons else None

    def to_dict(self) -> Dict[str, Any]:
        def num(x: float) -> Optional[float]:
            return x if math.isfinite(x) else None

        out: Dict[str, Any] = {"name": self.name, "type": self.type, "status": self.status}
        if self.status == "compared":
            out["baseline"] = {m: num(float(getattr(self.baseline, m))) for m in DELTA_METRICS}
            out["candidate"] = {m: num(float(getattr(self.candidate, m))) for m in DELTA_METRICS}
            out["delta"] = {m: num(self.delta(m)) for m in DELTA_METRICS}
            out["spectrum_change"] = num(self.spectrum_change)
            out["flags_raised"] = list(self.flags_raised)
            out["flags_cleared"] = list(self.flags_cleared)
            out["baseline_flags"] = list(self.baseline.flags)
            out["candidate_flags"] = list(self.candidate.flags)
        if self.status == "not analysed":
            out["missing_in"] = self.missing_in
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class Comparison:
    """The layer-by-layer comparison of a candidate analysis with a baseline (:func:`compare`)."""

    baseline: AnalysisResult
    candidate: AnalysisResult
    layers: List[LayerChange]
    policy: RegressionPolicy = field(default_factory=RegressionPolicy)
    #: Things a reader should know: different options, different architectures, renamed layers.
    notes: List[str] = field(default_factory=list)

    def _with(self, status: str) -> List[LayerChange]:
        return [c for c in self.layers if c.status == status]

    @property
    def compared(self) -> List[LayerChange]:
        return self._with("compared")

    @property
    def added(self) -> List[str]:
        return [c.name for c in self._with("added")]

    @property
    def removed(self) -> List[str]:
        return [c.name for c in self._with("removed")]

    @property
    def not_analysed(self) -> List[str]:
        return [c.name for c in self._with("not analysed")]

    def __getitem__(self, name: str) -> LayerChange:
        for change in self.layers:
            if change.name == name:
                return change
        raise KeyError(f"no layer named {name!r} in the comparison")

    def regressions(self, policy: Optional[RegressionPolicy] = None) -> List[Regression]:
        """The regressed layers under ``policy`` (default: this comparison's), worst first."""
        policy = policy or self.policy
        found = [r for r in (c.regression(policy) for c in self.layers) if r is not None]
        return sorted(found, key=lambda r: r.rank)

    def regressed(self, policy: Optional[RegressionPolicy] = None) -> bool:
        """True when at least one layer regressed."""
        return bool(self.regressions(policy))

    def worst_first(self, policy: Optional[RegressionPolicy] = None) -> List[LayerChange]:
        """Every layer: regressions (worst first), added and removed layers, the other compared
        layers by decreasing ``|Δalpha|``, then the layers not analysed."""
        order = {r.layer: i for i, r in enumerate(self.regressions(policy))}

        def key(c: LayerChange) -> Tuple[int, float]:
            if c.name in order:
                return 0, order[c.name]
            if c.status in ("added", "removed"):
                return 1, 0.0
            if c.status == "compared":
                d = abs(c.d_alpha)
                return 2, -d if math.isfinite(d) else 0.0
            return 3, 0.0
        return sorted(self.layers, key=key)

    def summary(self, policy: Optional[RegressionPolicy] = None) -> Dict[str, Any]:
        """Counts and the largest alpha change: the scalars a tracker or CI log wants."""
        compared = self.compared
        finite = [c for c in compared if math.isfinite(c.d_alpha)]
        top = max(finite, key=lambda c: abs(c.d_alpha), default=None)
        raised = [c.name for c in compared if c.flags_raised and set(c.flags_raised) - {"too-few-evals"}]
        base, cand = self.baseline.summary(), self.candidate.summary()
        return {
            "compared": len(compared), "added": len(self.added), "removed": len(self.removed),
            "not_analysed": len(self.not_analysed), "newly_flagged": len(raised),
            "cleared": sum(1 for c in compared if c.flags_cleared),
            "regressions": len(self.regressions(policy)),
            "max_abs_delta_alpha": abs(top.d_alpha) if top else math.nan,
            "max_delta_alpha_layer": top.name if top else None,
            "delta_alpha_weighted": cand["alpha_weighted"] - base["alpha_weighted"],
            "delta_log_alpha_norm": cand["log_alpha_norm"] - base["log_alpha_norm"],
            "same_architecture": self.baseline.identity == self.candidate.identity,
        }

    def to_dict(self, policy: Optional[RegressionPolicy] = None) -> Dict[str, Any]:
        """The whole comparison as strict-JSON data (see :mod:`ww_core.compare_report`)."""
        from .compare_report import comparison_to_dict

        return comparison_to_dict(self, policy)

    def to_json(self, policy: Optional[RegressionPolicy] = None) -> str:
        from .compare_report import to_json

        return to_json(self, policy)

    def to_markdown(self, policy: Optional[RegressionPolicy] = None, top: int = 20) -> str:
        from .compare_report import to_markdown

        return to_markdown(self, policy, top=top)

    def to_text(self, policy: Optional[RegressionPolicy] = None, top: int = 20) -> str:
        from .compare_report import to_text

        return to_text(self, policy, top=top)


def _missing_status(name: str, ltype: str, other: AnalysisResult) -> Tuple[str, str]:
    """(status, note) of a layer absent from ``other``'s analysed layers."""
    for s in other.skipped:
        if s.name == name:
            return "not analysed", f"skipped: {s.reason}"
    listed = other.meta.get("model_layers")
    if listed:
        if any(entry[0] == name for entry in listed):
            return "not analysed", "outside the analysed selection"
        return "", ""
    opts = other.options
    selection = opts.get("layers"), opts.get("layer_types")
    if any(v is not None for v in selection) and not LayerSelector(*selection).matches(name, ltype):
        return "not analysed", "outside the analysed selection"
    if opts.get("trainable") is not None:
        return "not analysed", "analysis kept only trainable=" + str(opts.get("trainable"))
    return "", ""


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def _prefixes(names: Sequence[str]) -> List[str]:
    return [""] + sorted({n.split(".", 1)[0] + "." for n in names if "." in n})


def name_alignment(base: Sequence[str], cand: Sequence[str]) -> Tuple[str, str]:
    """The leading name components to drop from each side (e.g. ``"bert."`` of a model with a
    task head) so that the most layer names match; ``("", "")`` when the names match as they are."""
    best, best_n = ("", ""), len(set(base) & set(cand))
    if best_n >= min(len(base), len(cand)) * 0.5:
        return best
    for pb in _prefixes(base):
        sb = {_strip(n, pb) for n in base}
        for pc in _prefixes(cand):
            n = len(sb & {_strip(x, pc) for x in cand})
            if n > best_n:
                best, best_n = (pb, pc), n
    return best


def _renamed(result: AnalysisResult, prefix: str) -> AnalysisResult:
    if not prefix:
        return result
    meta = dict(result.meta)
    meta["identity"] = result.identity
    if meta.get("model_layers"):
        meta["model_layers"] = [[_strip(e[0], prefix)] + list(e[1:]) for e in meta["model_layers"]]
    return AnalysisResult(layers=[replace(l, name=_strip(l.name, prefix)) for l in result.layers],
                          skipped=[replace(s, name=_strip(s.name, prefix)) for s in result.skipped],
                          options=result.options, meta=meta)


def compare_results(baseline: AnalysisResult, candidate: AnalysisResult,
                    policy: Optional[RegressionPolicy] = None) -> Comparison:
    """:func:`compare` for two analyses already made."""
    notes: List[str] = []
    pb, pc = name_alignment(baseline.names, candidate.names)
    if pb or pc:
        for side, prefix in (("baseline", pb), ("candidate", pc)):
            if prefix:
                notes.append(f"layer names matched after dropping {prefix!r} from the {side}'s names")
        baseline, candidate = _renamed(baseline, pb), _renamed(candidate, pc)
    differing = [k for k in _VALUE_OPTIONS if k in baseline.options and k in candidate.options
                 and baseline.options[k] != candidate.options[k]]
    if differing:
        notes.append("analysed with different options (values may differ for that reason): "
                     + ", ".join(f"{k}={baseline.options[k]!r} vs {candidate.options[k]!r}"
                                 for k in differing))
    base_by = {l.name: l for l in baseline.layers}
    cand_by = {l.name: l for l in candidate.layers}
    changes: List[LayerChange] = []
    for layer in candidate.layers:
        if layer.name in base_by:
            changes.append(LayerChange(layer.name, layer.type, "compared", base_by[layer.name], layer))
        else:
            status, note = _missing_status(layer.name, layer.type, baseline)
            changes.append(LayerChange(layer.name, layer.type, status or "added", None, layer,
                                       "baseline" if status else "", note))
    for layer in baseline.layers:
        if layer.name not in cand_by:
            status, note = _missing_status(layer.name, layer.type, candidate)
            changes.append(LayerChange(layer.name, layer.type, status or "removed", layer, None,
                                       "candidate" if status else "", note))
    def shape(layer: LayerResult) -> Tuple[int, int, int]:
        return layer.N, layer.M, layer.rf

    reshaped = [c.name for c in changes
                if c.status == "compared" and shape(c.baseline) != shape(c.candidate)]
    if reshaped:
        notes.append(f"{len(reshaped)} layer(s) changed shape: {', '.join(reshaped[:5])}")
    return Comparison(baseline, candidate, changes, policy or RegressionPolicy(), notes)


def compare(baseline: Any, candidate: Any, *, policy: Optional[RegressionPolicy] = None,
            labels: Optional[Tuple[str, str]] = None, **analyze_options: Any) -> Comparison:
    """Compare a candidate model with a baseline, layer by layer.

    Args:
        baseline, candidate: each a torch or Keras model, a state dict, a snapshot, a path to a
            weights file or folder, a Hugging Face model id in the local cache, a path to a saved
            analysis (``.json``), or an :class:`~ww_core.AnalysisResult`.
        policy: what counts as a regression (default :class:`RegressionPolicy`'s defaults).
        labels: names of the two sides in reports (default: the paths or class names).
        **analyze_options: keywords of :func:`ww_core.analyze` for the sides that are analysed
            here. Without them, a model compared with a saved analysis is analysed with that
            analysis's recorded options, so both sides are measured the same way.

    Returns:
        A :class:`Comparison`: ``layers`` (one :class:`LayerChange` each), ``regressions()``
        worst first, ``summary()``, ``to_text()`` / ``to_markdown()`` / ``to_json()``.

    Raises:
        FileNotFoundError: a path that does not exist and no cached model id.
        ww_core.SourceError: an unreadable model or saved analysis.
        ValueError: an invalid option.

    Example:
        >>> import numpy as np, ww_core
        >>> rng = np.random.default_rng(0)
        >>> w = np.linalg.qr(rng.standard_normal((300, 300)))[0] @ np.diag(np.arange(1, 301.0) ** -1.5)
        >>> old = {"fc.weight": w @ np.linalg.qr(rng.standard_normal((300, 150)))[0]}
        >>> new = {"fc.weight": old["fc.weight"] * 1.01}
        >>> cmp = ww_core.compare(old, new)
        >>> cmp.regressions(), round(cmp["fc"].d_alpha, 6)
        ([], 0.0)
    """
    labels = labels or (None, None)
    loaded: List[Optional[AnalysisResult]] = [None, None]
    for i, side in enumerate((baseline, candidate)):
        if isinstance(side, AnalysisResult) or (isinstance(side, (str, os.PathLike))
                                                and os.fspath(side).lower().endswith(".json")):
            loaded[i] = result_of(side, label=labels[i])
    saved = next((r for r in loaded if r is not None), None)
    options: Mapping[str, Any] = analyze_options
    if saved is not None and not set(analyze_options) - set(_NOT_MEASURING):
        options = {**reusable_options(saved.options), **analyze_options}
    results = [loaded[i] if loaded[i] is not None else result_of(side, options, labels[i])
               for i, side in enumerate((baseline, candidate))]
    return compare_results(results[0], results[1], policy)
