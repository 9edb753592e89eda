"""Which layers an analysis (or a snapshot) looks at: name regexes and layer types.

Every part of ``ww_core`` and ``ww_callbacks`` that filters layers uses :class:`LayerSelector`, so
``layers=`` and ``layer_types=`` mean the same thing everywhere:

* ``layers``: ``None`` (every layer), a regex, or a list of regexes; a layer is kept when any of
  them is found in its name (:func:`re.search`). An empty list is the same as ``None``.
* ``layer_types``: ``None`` (every type), one type or a collection of types from
  :data:`LAYER_TYPES`; a layer is kept when its type is one of them (so an empty collection keeps
  no layer).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, List, Optional, Sequence, TypeVar, Union

__all__ = ["LAYER_TYPES", "LayerSelector", "check_layer_patterns", "check_layer_types"]

#: The layer types ``ww_core`` analyses.
LAYER_TYPES = ("dense", "conv1d", "conv2d", "conv3d", "embedding")

T = TypeVar("T")


def check_layer_patterns(layers: Any, option: str = "layers") -> Union[None, str, List[str]]:
    """Validate a ``layers=`` argument and normalise it.

    Args:
        layers: ``None``, a regex, or an iterable of regexes.
        option: how error messages name the argument (e.g. ``"--layers"`` on a command line).

    Returns:
        ``None``, the regex string itself, or the regexes as a list.

    Raises:
        ValueError: ``layers`` is not a string or an iterable of strings, or a regex does not
            compile (the message names the pattern).

    Example:
        >>> check_layer_patterns(("fc", "attn"))
        ['fc', 'attn']
        >>> check_layer_patterns("fc((")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: invalid layers regex 'fc((': missing ), ...
    """
    if layers is None:
        return None
    patterns = [layers] if isinstance(layers, str) else layers
    try:
        patterns = list(patterns)
    except TypeError:
        raise ValueError(f"{option} must be a regex, a list of regexes or None, got {layers!r}") from None
    for pat in patterns:
        if not isinstance(pat, str):
            raise ValueError(f"{option} must contain regex strings, got {pat!r}")
        try:
            re.compile(pat)
        except re.error as exc:
            raise ValueError(f"invalid {option} regex {pat!r}: {exc}") from None
    return layers if isinstance(layers, str) else patterns


def check_layer_types(layer_types: Union[None, str, Iterable[str]]) -> Optional[frozenset]:
    """Validate a ``layer_types=`` argument: ``None``, or the set of types it names.

    Raises:
        ValueError: a type not in :data:`LAYER_TYPES`.

    Example:
        >>> sorted(check_layer_types(["conv2d", "dense"]))
        ['conv2d', 'dense']
        >>> check_layer_types("lstm")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown layer types ['lstm']; choose from ('dense', 'conv1d', ...)
    """
    if layer_types is None:
        return None
    types = frozenset([layer_types] if isinstance(layer_types, str) else layer_types)
    unknown = types - set(LAYER_TYPES)
    if unknown:
        raise ValueError(f"unknown layer types {sorted(unknown)}; choose from {LAYER_TYPES}")
    return types


class LayerSelector:
    """The ``layers`` / ``layer_types`` filter, validated once, applied to many layers.

    Args:
        layers: ``None``, a regex or a list of regexes searched in layer names.
        layer_types: ``None`` or the layer types to keep.

    Raises:
        ValueError: see :func:`check_layer_patterns` and :func:`check_layer_types`.

    Example:
        >>> sel = LayerSelector(layers=["^fc", "attn"], layer_types="dense")
        >>> sel.matches("fc1", "dense"), sel.matches("fc1", "conv2d"), sel.matches("head", "dense")
        (True, False, False)
        >>> LayerSelector().matches("anything", "embedding")
        True
    """

    __slots__ = ("layers", "types", "_compiled")

    def __init__(self, layers: Union[None, str, Sequence[str]] = None,
                 layer_types: Union[None, str, Iterable[str]] = None):
        #: The normalised patterns (see :func:`check_layer_patterns`).
        self.layers = check_layer_patterns(layers)
        #: The kept types, or ``None`` for all.
        self.types: Optional[frozenset] = check_layer_types(layer_types)
        patterns = [self.layers] if isinstance(self.layers, str) else (self.layers or [])
        self._compiled = [re.compile(p) for p in patterns]

    def matches(self, name: str, type: str) -> bool:  # noqa: A002 - the LayerMatrices field name
        """Whether a layer called ``name`` of type ``type`` is selected."""
        if self._compiled and not any(p.search(name) for p in self._compiled):
            return False
        return self.types is None or type in self.types

    def select(self, layers: Iterable[T]) -> List[T]:
        """The selected items of ``layers`` (objects with ``name`` and ``type``), in order."""
        return [lm for lm in layers if self.matches(lm.name, lm.type)]

    def __repr__(self) -> str:
        types = sorted(self.types) if self.types is not None else None
        return f"LayerSelector(layers={self.layers!r}, layer_types={types!r})"
