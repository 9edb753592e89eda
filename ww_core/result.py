"""Result containers: one :class:`LayerResult` per analysed layer, gathered in an :class:`AnalysisResult`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .result_json import layer_identity, save_result

#: Columns of :meth:`AnalysisResult.to_dataframe`, in order. Names follow WeightWatcher where the
#: quantity is the same.
COLUMNS: Tuple[str, ...] = (
    "name", "type", "N", "M", "rf", "num_evals", "alpha", "alpha_weighted", "log_alpha_norm",
    "log_norm", "log_spectral_norm", "spectral_norm", "stable_rank", "entropy", "xmin", "xmax", "D",
    "sigma", "num_pl_spikes", "warning", "alpha_hill", "matrix_rank", "rank_collapse", "num_fingers",
    "raw_alpha", "num_spikes", "sigma_mp", "mp_softrank", "bulk_max", "rand_distance",
    "max_rand_eval", "num_traps", "detX_num", "detX_val", "ERG_gap", "status", "flags", "precision",
)

#: Metrics that :meth:`AnalysisResult.summary` averages (WeightWatcher's ``get_summary`` set).
SUMMARY_METRICS: Tuple[str, ...] = (
    "log_norm", "alpha", "alpha_weighted", "log_alpha_norm", "log_spectral_norm", "stable_rank",
)


@dataclass
class LayerResult:
    """Spectral diagnostics of one layer.

    Scale metrics (``xmin``, ``spectral_norm``, ``log_norm``…) carry the convolution scale factor
    (see ``scale``), exactly as WeightWatcher reports them. ``alpha`` is ``nan`` when the fit failed
    (WeightWatcher reports -1 and calls the layer "over-trained"); the reason is in ``flags``.
    """

    name: str
    type: str
    N: int
    M: int
    rf: int = 1
    num_evals: int = 0
    scale: float = 1.0
    alpha: float = math.nan
    alpha_weighted: float = math.nan
    log_alpha_norm: float = math.nan
    log_norm: float = math.nan
    log_spectral_norm: float = math.nan
    spectral_norm: float = math.nan
    stable_rank: float = math.nan
    entropy: float = math.nan
    xmin: float = math.nan
    xmax: float = math.nan
    D: float = math.nan
    sigma: float = math.nan
    num_pl_spikes: int = 0
    warning: str = ""
    alpha_hill: float = math.nan
    matrix_rank: int = 0
    rank_collapse: float = math.nan
    num_fingers: int = 0
    raw_alpha: float = math.nan
    num_spikes: float = math.nan
    sigma_mp: float = math.nan
    mp_softrank: float = math.nan
    bulk_max: float = math.nan
    rand_distance: float = math.nan
    max_rand_eval: float = math.nan
    num_traps: float = math.nan
    #: ``detX=True`` (:mod:`ww_core.detx`): the detX tail size, its lowest eigenvalue, and
    #: ``detX_num - num_pl_spikes``; ``nan`` otherwise.
    detX_num: float = math.nan
    detX_val: float = math.nan
    ERG_gap: float = math.nan
    status: str = "success"
    flags: Tuple[str, ...] = ()
    #: The precision the reported spectrum was solved in (``float32`` or ``float64``).
    precision: str = ""
    #: Eigensolves of this layer's matrices: 1, or 2 when ``precision="auto"`` rejected a float32 solve.
    solves: int = field(default=0, compare=False)
    #: Why float64 was used under ``precision="auto"`` ("predicted: ...", "float32 rejected: ...").
    precision_reason: str = field(default="", compare=False)
    #: The float32 check's verdict on this spectrum ("" accepted; ``None`` not checked).
    float32_check: Optional[str] = field(default=None, compare=False)
    #: The eigenvalues (ascending, scaled) when ``keep_evals=True``; not part of the table.
    evals: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    #: Randomised eigenvalues when ``randomize=True`` and ``keep_evals=True``.
    rand_evals: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        """The table columns of this layer as plain Python values (JSON-serialisable)."""
        out: Dict[str, Any] = {}
        for col in COLUMNS:
            value = getattr(self, col)
            if col == "flags":
                value = ",".join(value)
            elif isinstance(value, (np.floating, np.integer)):
                value = value.item()
            out[col] = value
        return out

    @property
    def ok(self) -> bool:
        """True when the power-law fit succeeded."""
        return self.status == "success" and math.isfinite(self.alpha)


@dataclass
class SkippedLayer:
    """A layer that was found but not analysed, with the reason (e.g. too few eigenvalues)."""

    name: str
    type: str
    N: int
    M: int
    reason: str


@dataclass
class AnalysisResult:
    """All layers of one analysis. Iterable over :class:`LayerResult`.

    Example:
        >>> import numpy as np, ww_core
        >>> rng = np.random.default_rng(0)
        >>> res = ww_core.analyze({"fc.weight": rng.standard_normal((1000, 500))})
        >>> res["fc"].alpha > 6        # an untrained (random) layer
        True
    """

    layers: List[LayerResult] = field(default_factory=list)
    skipped: List[SkippedLayer] = field(default_factory=list)
    options: Dict[str, Any] = field(default_factory=dict)
    #: What is known about the analysis besides its options: ``source`` (a path or class name),
    #: ``model_layers`` (``[name, type, N, M, rf]`` of every layer of the model, when recorded),
    #: and, for a loaded result, ``engine_version``, ``created`` and ``identity``.
    meta: Dict[str, Any] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerResult:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no analysed layer named {name!r}; analysed: {[l.name for l in self.layers][:10]}")

    @property
    def names(self) -> List[str]:
        return [layer.name for layer in self.layers]

    def to_records(self) -> List[Dict[str, Any]]:
        """One JSON-serialisable dict per analysed layer, keys as :data:`COLUMNS`."""
        return [layer.to_dict() for layer in self.layers]

    def to_dataframe(self):
        """A pandas DataFrame with one row per analysed layer (columns :data:`COLUMNS`)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
        return pd.DataFrame(self.to_records(), columns=list(COLUMNS))

    def summary(self, how: str = "mean") -> Dict[str, float]:
        """Layer averages of the WeightWatcher summary metrics plus counts.

        Every metric is reduced over the successful fits only (:attr:`LayerResult.ok`): a failed
        fit's finite ``log_norm`` or ``stable_rank`` is left out too, so all metrics describe the
        same layers (WeightWatcher averages its -1 placeholders along with everything else).
        ``nan`` when no fit succeeded.

        Args:
            how: ``"mean"`` or ``"median"``.
        """
        if how not in ("mean", "median"):
            raise ValueError(f"how must be 'mean' or 'median', got {how!r}")
        reduce = np.mean if how == "mean" else np.median
        fitted = [l for l in self.layers if l.ok]
        out: Dict[str, float] = {}
        for metric in SUMMARY_METRICS:
            values = np.array([getattr(l, metric) for l in fitted], dtype=float)
            values = values[np.isfinite(values)]
            out[metric] = float(reduce(values)) if values.size else math.nan
        out["num_layers"] = len(self.layers)
        out["num_failed"] = sum(1 for l in self.layers if not l.ok)
        # a fit on too few eigenvalues is not judged: "too-few-evals" alone does not count
        out["num_flagged"] = sum(1 for l in self.layers if set(l.flags) - {"too-few-evals"})
        return out

    def flagged(self, flag: Optional[str] = None) -> List[LayerResult]:
        """Layers carrying any flag, or the given one."""
        return [l for l in self.layers if (flag in l.flags if flag else bool(l.flags))]

    @property
    def identity(self) -> str:
        """A SHA-256 of the model's layer names, types and shapes (not its weights): the saved one
        for a loaded result, else from ``meta["model_layers"]`` when recorded, else from the
        analysed and skipped layers."""
        if isinstance(self.meta.get("identity"), str):
            return self.meta["identity"]
        listed = self.meta.get("model_layers")
        if listed:
            return layer_identity(tuple(entry) for entry in listed)
        return layer_identity([(l.name, l.type, l.N, l.M, l.rf) for l in self.layers]
                              + [(s.name, s.type, s.N, s.M, 1) for s in self.skipped])

    def save(self, path: Any) -> None:
        """Write this result to ``path`` as JSON (every column, skipped layers, options, engine
        version, model identity); :func:`ww_core.load_result` reads it back.

        Raises:
            OSError: the file cannot be written.
        """
        save_result(self, path)


def replace(layer: LayerResult, **changes: Any) -> LayerResult:
    """A copy of ``layer`` with some fields changed."""
    return dataclasses.replace(layer, **changes)
