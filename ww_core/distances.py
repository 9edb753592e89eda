"""``distances(model_a, model_b)``: how far apart two models' weights are, layer by layer.

WeightWatcher 0.7.7's ``distances(model_1, model_2, method=...)`` with the same three methods:

* ``"raw"`` (default): ``delta_W = ‖W_a − W_b‖_F`` over the whole weight tensor, and ``delta_b``
  the same for the bias vectors (0 when a layer has no bias on either side);
* ``"euclidean"``: the mean over a layer's matrices (a convolution's kernel positions) of
  ``‖W_a − W_b‖_F``; ``delta_b`` is 0;
* ``"cka"``: the mean over a layer's matrices of the uncentred alignment
  ``‖W_aᵀW_b‖_F / sqrt(‖W_aᵀW_a‖_F · ‖W_bW_bᵀ‖_F)`` (1 for identical weights); ``delta_b`` is 0.

Two differences from WeightWatcher, on purpose: layers are matched by name (WeightWatcher zips the
two layer lists by position, so one extra layer shifts every pair after it), and layers present in
one model only, or with different shapes, are listed instead of failing the whole call. The
matrices are those :func:`ww_core.analyze` sees (same options: ``split_qkv``, ``peft``, ...), in
float64, and the layers are the ones it would analyse (same ``layers`` / ``min_evals`` bounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .analyze import DEFAULT_MAX_EVALS, DEFAULT_MAX_N, DEFAULT_MIN_EVALS, analysis_layers, skip_reason
from .errors import in_layer
from .layer_matrices import LayerMatrices
from .selection import LayerSelector
from .spectrum import is_torch_tensor

__all__ = ["METHODS", "LayerDistance", "DistanceResult", "distances"]

#: The methods of WeightWatcher 0.7.7's ``distances``.
METHODS = ("raw", "euclidean", "cka")
# WeightWatcher adds this to a CKA denominator below it.
_CKA_FLOOR = 1e-6


@dataclass
class LayerDistance:
    """The distance between one layer's weights in two models."""

    name: str
    type: str
    N: int
    M: int
    delta_W: float
    delta_b: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "type": self.type, "N": self.N, "M": self.M,
                "delta_W": self.delta_W, "delta_b": self.delta_b}


@dataclass
class DistanceResult:
    """Per-layer distances between two models (:func:`distances`)."""

    method: str
    layers: List[LayerDistance] = field(default_factory=list)
    #: Layers of the first / second model with no counterpart of the same name and shape.
    only_in_a: List[str] = field(default_factory=list)
    only_in_b: List[str] = field(default_factory=list)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerDistance:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; compared: {[l.name for l in self.layers][:10]}")

    @property
    def names(self) -> List[str]:
        return [l.name for l in self.layers]

    @property
    def mean_delta_W(self) -> float:
        """WeightWatcher's ``avg_dW``: the mean of ``delta_W`` over the compared layers."""
        return float(np.mean([l.delta_W for l in self.layers])) if self.layers else math.nan

    @property
    def mean_delta_b(self) -> float:
        """WeightWatcher's ``avg_db``."""
        return float(np.mean([l.delta_b for l in self.layers])) if self.layers else math.nan

    def to_records(self) -> List[Dict[str, Any]]:
        return [dict(l.to_dict(), method=self.method) for l in self.layers]

    def to_dataframe(self):
        """A pandas DataFrame, one row per compared layer."""
        import pandas as pd

        return pd.DataFrame(self.to_records(),
                            columns=["name", "type", "N", "M", "delta_W", "delta_b", "method"])


def _float64(batch: Any) -> np.ndarray:
    if is_torch_tensor(batch):
        return batch.detach().to("cpu").double().numpy()
    return np.asarray(batch, dtype=np.float64)


def _cka(w1: np.ndarray, w2: np.ndarray) -> float:
    # ‖W1ᵀW2‖_F² = <W1W1ᵀ, W2W2ᵀ> and ‖W2W2ᵀ‖_F = ‖W2ᵀW2‖_F: only the smaller Gram matrices are
    # formed (WeightWatcher forms W2W2ᵀ, 30522² for a BERT embedding)
    if w1.shape[0] >= w1.shape[1]:
        num = np.linalg.norm(w1.T @ w2)
    else:
        num = math.sqrt(max(float(np.sum((w1 @ w1.T) * (w2 @ w2.T))), 0.0))
    g1 = w1.T @ w1 if w1.shape[0] >= w1.shape[1] else w1 @ w1.T
    g2 = w2.T @ w2 if w2.shape[0] >= w2.shape[1] else w2 @ w2.T
    norm = math.sqrt(np.linalg.norm(g1) * np.linalg.norm(g2))
    if norm < _CKA_FLOOR:
        norm += _CKA_FLOOR
    return float(num / norm)


def _bias(source: Any, name: str) -> Optional[np.ndarray]:
    """The bias vector of layer ``name`` (torch modules and state dicts; else ``None``)."""
    value = None
    if isinstance(source, dict):
        value = source.get(f"{name}.bias")
    elif hasattr(source, "named_modules"):
        module = dict(source.named_modules()).get(name)
        value = getattr(module, "bias", None) if module is not None else None
    if value is None or not hasattr(value, "shape"):
        return None
    return _float64(value).ravel()


def _layer_distance(method: str, a: LayerMatrices, b: LayerMatrices, src_a: Any,
                    src_b: Any) -> LayerDistance:
    w1, w2 = _float64(a.load()), _float64(b.load())
    delta_b = 0.0
    if method == "raw":
        delta_w = float(np.linalg.norm((w1 - w2).ravel()))
        b1, b2 = _bias(src_a, a.name), _bias(src_b, b.name)
        if b1 is not None and b2 is not None and b1.shape == b2.shape:
            delta_b = float(np.linalg.norm(b1 - b2))
    elif method == "euclidean":
        delta_w = float(np.mean([np.linalg.norm(x - y) for x, y in zip(w1, w2)]))
    else:
        delta_w = float(np.mean([_cka(x, y) for x, y in zip(w1, w2)]))
    return LayerDistance(a.name, a.type, a.N, a.M, delta_w, delta_b)


def distances(
    model_a: Any,
    model_b: Any,
    method: str = "raw",
    *,
    layers: Union[None, str, Sequence[str]] = None,
    layer_types: Optional[Iterable[str]] = None,
    min_evals: int = DEFAULT_MIN_EVALS,
    max_evals: int = DEFAULT_MAX_EVALS,
    max_N: int = DEFAULT_MAX_N,
    split_qkv: bool = True,
    peft: Union[bool, str] = False,
) -> DistanceResult:
    """Per-layer distances between the weights of two models of the same architecture.

    Args:
        model_a, model_b: any two sources :func:`ww_core.analyze` accepts (modules, state dicts,
            files, Keras models).
        method: ``"raw"``, ``"euclidean"`` or ``"cka"`` (see the module docstring).
        layers, layer_types, min_evals, max_evals, max_N, split_qkv, peft: as
            :func:`ww_core.analyze`: which layers are compared.

    Returns:
        A :class:`DistanceResult`: one :class:`LayerDistance` per layer present in both models
        with the same shape, in ``model_a``'s order; the others in ``only_in_a`` / ``only_in_b``.

    Raises:
        ValueError: an unknown ``method`` or another invalid option.
        FileNotFoundError, ww_core.SourceError: as :func:`ww_core.analyze`.

    Example:
        >>> import numpy as np, ww_core
        >>> w = np.random.default_rng(0).standard_normal((64, 32))
        >>> ww_core.distances({"fc.weight": w}, {"fc.weight": w + 0.5})["fc"].delta_W
        22.627416997969522
    """
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    method = method.lower()
    selector = LayerSelector(layers, layer_types)

    def usable(source: Any) -> Dict[str, LayerMatrices]:
        found = selector.select(analysis_layers(source, True, split_qkv, peft))
        return {lm.name: lm for lm in found if not skip_reason(lm, min_evals, max_evals, max_N)}

    side_a, side_b = usable(model_a), usable(model_b)
    result = DistanceResult(method=method)
    for name, lm_a in side_a.items():
        lm_b = side_b.get(name)
        if lm_b is None or _shape(lm_a) != _shape(lm_b):
            result.only_in_a.append(name)
            continue
        with in_layer(name):
            result.layers.append(_layer_distance(method, lm_a, lm_b, model_a, model_b))
    result.only_in_b = [n for n, lm in side_b.items()
                        if n not in side_a or _shape(lm) != _shape(side_a[n])]
    return result


def _shape(lm: LayerMatrices) -> Tuple[int, int, int]:
    return lm.rf, lm.rows, lm.cols
