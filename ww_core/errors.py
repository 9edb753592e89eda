"""Exceptions raised by ``ww_core``, and which layer an escaping exception came from.

When an exception escapes :func:`ww_core.analyze`, :func:`ww_core.analyze_distributed`,
:func:`ww_core.snapshot` or :func:`ww_core.gather_snapshot` while one layer's weights
were being loaded, copied or analysed, the engine records that layer's name on the exception
(attribute ``ww_layer``, the innermost layer wins) without changing the exception's type;
:func:`failing_layer` reads it.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["SourceError", "failing_layer", "in_layer"]


class SourceError(ValueError):
    """A model source that cannot be read: unknown format, corrupt or truncated file, refused pickle.

    The message is one line, meant to be shown to the user as it is.
    """


def failing_layer(exc: BaseException) -> Optional[str]:
    """The name of the layer ``ww_core`` was loading or analysing when ``exc`` was raised.

    Args:
        exc: an exception that escaped a ``ww_core`` call.

    Returns:
        The layer name, or ``None`` when the failure was not inside one layer's work.

    Example:
        >>> import ww_core
        >>> class Broken:                  # a state-dict value that cannot become an array
        ...     shape, dtype = (16, 32), "float32"
        ...     def __array__(self, *args, **kwargs):
        ...         raise RuntimeError("boom")
        >>> try:
        ...     ww_core.analyze({"fc.weight": Broken()})
        ... except RuntimeError as exc:
        ...     print(failing_layer(exc))
        fc
    """
    name = getattr(exc, "ww_layer", None)
    return name if isinstance(name, str) else None


class in_layer:  # noqa: N801 - used like a function: ``with in_layer(name): ...``
    """Context manager: an exception escaping the block is tagged with layer ``name``.

    The exception is re-raised unchanged (same object, same type); only its ``ww_layer``
    attribute is set, and only when no inner block has set it already.
    """

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> "in_layer":
        return self

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if isinstance(exc, Exception) and getattr(exc, "ww_layer", None) is None:
            try:
                exc.ww_layer = self.name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):  # pragma: no cover - exotic exception types
                pass
        return False
