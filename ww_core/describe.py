"""``describe(model)``: the layers :func:`ww_core.analyze` would analyse, without analysing them.

WeightWatcher 0.7.7's ``describe()``: one row per layer with its type, ``N`` and ``M`` (the larger
and smaller side of its matrices), ``Q = N / M``, ``rf`` (matrices per layer: a convolution's
kernel positions) and ``num_evals`` (``M · rf``, the size of the spectrum), plus the weight's shape
here. No eigenvalue is computed and no weight is loaded, so it is instant even on a large
checkpoint file. Layers outside the bounds (``min_evals``, ...) are listed in ``skipped`` with the
reason, which WeightWatcher drops silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from .analyze import (
    DEFAULT_MAX_EVALS,
    DEFAULT_MAX_N,
    DEFAULT_MIN_EVALS,
    analysis_layers,
    check_options,
    skip_reason,
)
from .result import SkippedLayer
from .selection import LayerSelector

__all__ = ["LayerDescription", "ModelDescription", "describe"]

#: Columns of :meth:`ModelDescription.to_dataframe`.
DESCRIBE_COLUMNS = ("name", "type", "N", "M", "Q", "rf", "num_evals", "shape", "dtype", "trainable")


@dataclass
class LayerDescription:
    """One layer as :func:`describe` lists it. ``shape`` is its stack of matrices
    ``(rf, rows, cols)``."""

    name: str
    type: str
    N: int
    M: int
    rf: int
    num_evals: int
    shape: tuple
    dtype: str = ""
    trainable: Optional[bool] = None

    @property
    def Q(self) -> float:
        """``N / M``, the aspect ratio of the layer's matrices."""
        return self.N / self.M if self.M else float("nan")

    def to_dict(self) -> Dict[str, Any]:
        return {c: (list(getattr(self, c)) if c == "shape" else getattr(self, c))
                for c in DESCRIBE_COLUMNS}


@dataclass
class ModelDescription:
    """The result of :func:`describe`: the layers to analyse and those skipped, in model order."""

    layers: List[LayerDescription] = field(default_factory=list)
    skipped: List[SkippedLayer] = field(default_factory=list)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerDescription:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; described: {[l.name for l in self.layers][:10]}")

    @property
    def names(self) -> List[str]:
        return [l.name for l in self.layers]

    @property
    def num_evals(self) -> int:
        """The eigenvalues an analysis would compute, over all layers."""
        return sum(l.num_evals for l in self.layers)

    def to_records(self) -> List[Dict[str, Any]]:
        return [l.to_dict() for l in self.layers]

    def to_dataframe(self):
        """A pandas DataFrame, one row per layer (columns ``DESCRIBE_COLUMNS``)."""
        import pandas as pd

        return pd.DataFrame(self.to_records(), columns=list(DESCRIBE_COLUMNS))


def describe(
    source: Any,
    *,
    layers: Union[None, str, Sequence[str]] = None,
    layer_types: Optional[Iterable[str]] = None,
    min_evals: int = DEFAULT_MIN_EVALS,
    max_evals: int = DEFAULT_MAX_EVALS,
    max_N: int = DEFAULT_MAX_N,
    conv2d_norm: bool = True,
    split_qkv: bool = True,
    peft: Union[bool, str] = False,
    base_model: Any = None,
    trainable: Optional[bool] = None,
) -> ModelDescription:
    """The layers of ``source`` that :func:`ww_core.analyze` with the same options would analyse.

    Args:
        source, layers, layer_types, min_evals, max_evals, max_N, conv2d_norm, split_qkv, peft,
            base_model, trainable: as :func:`ww_core.analyze`.

    Returns:
        A :class:`ModelDescription`.

    Raises:
        ValueError: an invalid option.
        FileNotFoundError, ww_core.SourceError: as :func:`ww_core.analyze`.

    Example:
        >>> import torch, ww_core
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Conv2d(3, 16, 3),
        ...                             torch.nn.Linear(5, 7))
        >>> [(l.name, l.N, l.M, l.rf, l.num_evals) for l in ww_core.describe(model)]
        [('0', 128, 64, 1, 64), ('1', 16, 3, 9, 27)]
        >>> ww_core.describe(model).skipped[0].reason
        'too few eigenvalues (5 < min_evals=8)'
    """
    check_options(min_evals, max_evals, max_N, None, "auto", "gram")
    selector = LayerSelector(layers, layer_types)
    out = ModelDescription()
    found = analysis_layers(source, conv2d_norm, split_qkv, peft, base_model, trainable)
    for lm in selector.select(found):
        reason = skip_reason(lm, min_evals, max_evals, max_N)
        if reason:
            out.skipped.append(SkippedLayer(lm.name, lm.type, lm.N, lm.M, reason))
        else:
            out.layers.append(LayerDescription(
                name=lm.name, type=lm.type, N=lm.N, M=lm.M, rf=lm.rf, num_evals=lm.num_evals,
                shape=(lm.rf, lm.rows, lm.cols), dtype=lm.dtype, trainable=lm.trainable))
    return out
