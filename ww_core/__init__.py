"""ww_core: a fast, exact spectral engine for neural-network weights.

Turns a model's weights into per-layer eigenvalue spectra, power-law fits and metrics that agree
with WeightWatcher 0.7.7 where that tool is right. Needs only numpy and scipy; torch, Keras,
pandas and matplotlib are used when present.

Example:
    >>> import numpy as np, ww_core
    >>> res = ww_core.analyze({"fc.weight": np.random.default_rng(0).standard_normal((1000, 500))})
    >>> res.names, res["fc"].flags
    (['fc'], ('under-trained',))
"""

from .analyze import analysis_layers, analyze
from .compare import Comparison, LayerChange, compare
from .compare_policy import Regression, RegressionPolicy
from .describe import ModelDescription, describe
from .distances import DistanceResult, distances
from .distributed import analyze_distributed
from .errors import SourceError, failing_layer
from .gather import gather_snapshot
from .layer_analysis import analyze_layer
from .layer_matrices import LayerMatrices
from .powerlaw import PowerLawFit, fit_powerlaw, hill_alpha
from .ranking import Ranking, rank_models
from .result import COLUMNS, AnalysisResult, LayerResult, SkippedLayer
from .result_io import load_result
from .selection import LAYER_TYPES, LayerSelector, check_layer_patterns, check_layer_types
from .snapshot_memory import SnapshotBudgetError, check_budget
from .sources import Snapshot, find_layers, snapshot
from .spectrum import eigenvalues
from .version import __version__
from .wrappers import unwrap_model

# The public API (docs/architecture.md, "Public API"): everything else in ww_core is internal.
__all__ = [
    "analyze", "analyze_layer", "analyze_distributed", "analysis_layers", "AnalysisResult",
    "LayerResult", "SkippedLayer", "COLUMNS", "SourceError", "failing_layer", "PowerLawFit",
    "fit_powerlaw", "hill_alpha", "LayerMatrices", "find_layers", "LAYER_TYPES", "LayerSelector",
    "check_layer_patterns", "check_layer_types", "Snapshot", "snapshot", "SnapshotBudgetError",
    "check_budget", "gather_snapshot", "unwrap_model", "eigenvalues", "__version__",
    "describe", "ModelDescription", "distances", "DistanceResult",
    "load_result", "compare", "Comparison", "LayerChange", "RegressionPolicy", "Regression",
    "rank_models", "Ranking",
]
