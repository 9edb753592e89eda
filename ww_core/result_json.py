"""The JSON document of a saved analysis (the writer side; :mod:`ww_core.result_io` reads it).

Kept apart from :mod:`ww_core.result_io` so that :meth:`ww_core.AnalysisResult.save` can use it
without an import cycle: this module knows results only by their attributes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
from typing import Any, Dict, Iterable, Mapping, Tuple, Union

import numpy as np

from .version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "layer_identity", "plain", "result_to_dict", "save_result"]

#: The ``format`` field of a saved analysis.
FORMAT = "ww_core.analysis"
#: The version of the file layout; a file with a larger version is refused.
FORMAT_VERSION = 1
#: Keys of ``meta`` written at the top level of the file rather than under ``model``.
_TOP_LEVEL_META = ("engine_version", "created", "identity")
#: Fields of a layer result that are not saved: the eigenvalue arrays (``keep_evals=True``).
_ARRAYS = ("evals", "rand_evals")


def plain(value: Any) -> Any:
    """``value`` as strict-JSON data: non-finite floats become ``"nan"``, ``"inf"``, ``"-inf"``;
    numpy scalars become Python numbers; other objects their ``str``."""
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return [plain(v) for v in sorted(value, key=str)]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)       # e.g. a path object in the options


def layer_identity(entries: Iterable[Tuple[str, str, int, int, int]]) -> str:
    """A SHA-256 (hex) of a model's layers, ``(name, type, N, M, rf)`` each, order-independent.

    Two models with the same layer names, types and shapes have the same identity whatever their
    weights: it tells a baseline's architecture from another one.
    """
    lines = sorted(f"{name}\t{ltype}\t{int(n)}x{int(m)}x{int(rf)}" for name, ltype, n, m, rf in entries)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def result_to_dict(result: Any) -> Dict[str, Any]:
    """The strict-JSON document :func:`save_result` writes for an ``AnalysisResult``."""
    layers = []
    for layer in result.layers:
        record = plain(layer.to_dict())               # the table columns, in their order
        for f in dataclasses.fields(layer):           # then every other field but the arrays
            if f.name not in record and f.name not in _ARRAYS:
                record[f.name] = plain(getattr(layer, f.name))
        record["flags"] = list(layer.flags)
        layers.append(record)
    meta = {k: v for k, v in result.meta.items() if k not in _TOP_LEVEL_META}
    created = result.meta.get("created") or datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "engine": {"name": "ww_core", "version": result.meta.get("engine_version") or __version__},
        "created": created,
        "model": {"identity": result.identity, **plain(meta)},
        "options": plain(result.options),
        "layers": layers,
        "skipped": [plain(dataclasses.asdict(s)) for s in result.skipped],
    }


def save_result(result: Any, path: Union[str, os.PathLike]) -> None:
    """Write ``result`` to ``path`` as strict JSON; missing folders are created. The file is
    written beside and renamed into place, so a reader never sees half of it.

    Raises:
        OSError: the file cannot be written.
    """
    doc = result_to_dict(result)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
