"""The detX (ERG) condition of a layer's spectrum, as WeightWatcher 0.7.7's ``detX=True``.

The semi-empirical theory behind WeightWatcher's newer releases predicts that in a well-trained
layer the heavy tail of the spectrum satisfies ``det X = 1``: the product of the tail's
eigenvalues, after the spectrum has been rescaled so that its mean is 1, is 1. The tail found this
way is compared with the power-law tail of the fit (``num_pl_spikes``); their difference is the
``ERG_gap``.

Definitions (0.7.7's ``detX_constraint`` and ``apply_detX``), for the ``n`` eigenvalues of one
layer, ascending, conv layers with their scale factor:

1. ``λ'_j = λ_j · n / Σλ`` (mean 1);
2. ``i`` is the largest index for which ``Π_{j ≥ i} λ'_j < 1`` (walking down from the top; the
   eigenvalue that tips the product is part of the tail);
3. ``detX_num = n − i``; ``detX_val = λ_i`` (unrescaled); ``ERG_gap = detX_num − num_pl_spikes``.
   When the product never drops below 1, ``detX_num = n`` and, as in WeightWatcher (whose loop
   variable stops at 1), ``detX_val = λ_1``, the second-smallest eigenvalue.

The product is computed as WeightWatcher computes it (``numpy.prod`` in float64), so the columns
match 0.7.7 also where that product under- or overflows on a spectrum of thousands of
eigenvalues; :func:`detx_constraint` with ``exact=True`` gives the exact tail.
WeightWatcher's ``num_ERG_spikes`` is ``detX_num`` again and
its ``detX_val_unrescaled`` holds ``λ'_i`` (the rescaled value, despite its name); neither is
repeated here.

Example:
    >>> import numpy as np
    >>> from ww_core.detx import detx_columns
    >>> evals = np.array([0.0] * 90 + [1.0] * 10)         # rescaled: ten values of 10
    >>> detx_columns(evals, num_pl_spikes=10)
    {'detX_num': 11, 'detX_val': 0.0, 'ERG_gap': 1}
"""

from __future__ import annotations

import math
from typing import Dict, Tuple, Union

import numpy as np


def detx_constraint(evals: np.ndarray, exact: bool = False) -> Tuple[int, int]:
    """``(detX_num, index)`` of an ascending spectrum: the tail whose rescaled product drops below 1.

    Args:
        evals: eigenvalues, ascending (as :func:`ww_core.analyze` keeps them).
        exact: ``False`` (default): WeightWatcher 0.7.7's computation, ``numpy.prod`` of the
            rescaled values in float64. On a wide spectrum (thousands of eigenvalues) that product
            underflows to 0 or overflows to ``inf`` part-way, and the index it gives is an artefact
            of float64's range (measured: 4809 instead of 5428 eigenvalues on an 8192-value conv
            spectrum). ``True``: the product as a sum of logarithms, which has no such limit and
            gives the same index wherever WeightWatcher's product stays finite and non-zero.

    Returns:
        The number of eigenvalues in the detX tail and the index of its lowest one. ``(0, 0)``
        for fewer than two values or a flat spectrum (``evals[0] >= evals[-1]``); ``(n, 1)``
        when the product never drops below 1, as WeightWatcher (its loop ends at index 1).

    Raises:
        ValueError: ``evals`` is not one-dimensional.

    Example:
        >>> import numpy as np
        >>> detx_constraint(np.array([0.5, 1.0, 1.5]))    # rescaled: 0.5, 1, 1.5
        (3, 1)
    """
    evals = np.asarray(evals, dtype=np.float64)
    if evals.ndim != 1:
        raise ValueError(f"evals must be one-dimensional, got shape {evals.shape}")
    n = evals.size
    if n < 2 or not evals[0] < evals[-1]:
        return 0, 0
    total = float(evals.sum())
    if not total > 0 or not math.isfinite(total):
        return 0, 0
    w_scale = math.sqrt(n) / math.sqrt(total)         # WeightWatcher's rescale_eigenvalues
    scaled = (w_scale * w_scale) * evals
    if not exact:
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            for idx in range(n - 1, 0, -1):
                if np.prod(scaled[idx:]) < 1.0:
                    return n - idx, idx
        return n, 1     # WeightWatcher's loop variable stops at 1: detX_val is then λ_1
    # log Π_{j >= idx} λ'_j for idx = n-1, n-2, ..., 1 (a tiny negative eigenvalue of a Gram
    # solve counts as 0: its product is then below 1)
    with np.errstate(divide="ignore"):
        logs = np.log(np.maximum(scaled[:0:-1], 0.0))
    below = np.flatnonzero(np.cumsum(logs) < 0.0)
    if below.size == 0:
        return n, 1
    idx = n - 1 - int(below[0])
    return n - idx, idx


def detx_columns(evals: np.ndarray, num_pl_spikes: Union[int, float]) -> Dict[str, Union[int, float]]:
    """WeightWatcher 0.7.7's ``detX=True`` columns of one layer.

    Args:
        evals: the layer's eigenvalues, ascending, scaled as :func:`ww_core.analyze` reports them.
        num_pl_spikes: the power-law tail size of the layer's fit (``nan`` when the fit failed:
            ``ERG_gap`` is then ``nan``).

    Returns:
        ``{"detX_num", "detX_val", "ERG_gap"}``.

    Raises:
        ValueError: ``evals`` is not one-dimensional.

    Example:
        >>> import numpy as np
        >>> detx_columns(np.array([1.0, 2.0, 3.0, 10.0]), num_pl_spikes=1)   # ×0.25: 2.5·0.75·0.5 < 1
        {'detX_num': 3, 'detX_val': 2.0, 'ERG_gap': 2}
    """
    num, idx = detx_constraint(evals)
    value = float(np.asarray(evals, dtype=np.float64)[idx]) if np.size(evals) else math.nan
    gap: Union[int, float] = math.nan
    if num_pl_spikes is not None and math.isfinite(float(num_pl_spikes)):
        gap = num - int(num_pl_spikes)
    return {"detX_num": num, "detX_val": value, "ERG_gap": gap}
