"""Plain values: the one rule for what is a plottable number and what a JSON cell looks like.

Used by the history files and every tracker, so a value reads the same everywhere.
"""

from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["finite_float", "plain_value"]


def finite_float(value: Any) -> Optional[float]:
    """``value`` as a finite Python float, else None.

    Accepts ints, floats, numpy scalars and 0-d arrays/tensors; bools, None, strings (a layer
    named ``"0"`` is not a number) and non-finite values give None. The one rule every tracker
    uses to decide what is a plottable scalar.

    >>> finite_float(2), finite_float(float("nan")), finite_float("0"), finite_float(True)
    (2.0, None, None, None)
    """
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def plain_value(value: Any) -> Any:
    """A JSON-safe cell: numpy scalars as Python values, non-finite floats as None, tuples and
    lists (``flags``) joined with ``,``; anything else unchanged.

    >>> plain_value(float("inf")), plain_value(("under-trained", "rank-collapse")), plain_value("a")
    (None, 'under-trained,rank-collapse', 'a')
    """
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except Exception:
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return value
