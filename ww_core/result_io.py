"""Load an analysis saved by :meth:`ww_core.AnalysisResult.save` (JSON).

The file holds every column of every analysed layer (and its other fields but the eigenvalue
arrays: ``scale``, how its spectrum was solved), the skipped layers with their reasons, the
options the analysis ran with, the engine version and the model's identity (a SHA-256 of its
layer names, types and shapes). It is strict JSON: non-finite floats
are the strings ``"nan"``, ``"inf"`` and ``"-inf"``, read back as floats, so any JSON tool reads
the file and a load gives back exactly the saved values. The writer is :mod:`ww_core.result_json`.

Example:
    >>> import numpy as np, os, tempfile, ww_core
    >>> res = ww_core.analyze({"fc.weight": np.random.default_rng(0).standard_normal((200, 100))})
    >>> path = os.path.join(tempfile.mkdtemp(), "baseline.json")
    >>> res.save(path)
    >>> back = ww_core.load_result(path)
    >>> back["fc"].alpha == res["fc"].alpha, back.identity == res.identity
    (True, True)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Mapping, Union

from .errors import SourceError
from .result import AnalysisResult, LayerResult, SkippedLayer
from .result_json import FORMAT, FORMAT_VERSION

__all__ = ["load_result", "result_from_dict", "is_result_file"]

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_LAYER_FIELDS = {f.name: f for f in dataclasses.fields(LayerResult)}


def _number(value: Any, kind: str, where: str) -> Any:
    if isinstance(value, str) and value in _NON_FINITE:
        value = _NON_FINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SourceError(f"{where}: expected a number, got {value!r}")
    if kind == "int":
        if not math.isfinite(value):
            raise SourceError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def _layer_from(record: Any, where: str) -> LayerResult:
    if not isinstance(record, Mapping) or not isinstance(record.get("name"), str):
        raise SourceError(f"{where}: a layer entry without a name")
    values: Dict[str, Any] = {}
    for key, raw in record.items():
        f = _LAYER_FIELDS.get(key)
        if f is None or key in ("evals", "rand_evals"):
            continue                                  # a column of a newer version: ignored
        kind = str(f.type)
        here = f"{where}: layer {record['name']!r}, {key}"
        if key == "flags":
            items = raw.split(",") if isinstance(raw, str) else raw
            if not isinstance(items, list):
                raise SourceError(f"{here}: expected a list of flags, got {raw!r}")
            values[key] = tuple(str(x) for x in items if x)
        elif kind in ("int", "float"):
            values[key] = _number(raw, kind, here)
        elif kind in ("Optional[int]", "Optional[float]"):
            values[key] = None if raw is None else _number(raw, kind[9:-1], here)
        elif raw is None:
            values[key] = None if kind.startswith("Optional") else ""
        else:
            values[key] = str(raw)
    for key in ("type", "N", "M"):
        if key not in values:
            raise SourceError(f"{where}: layer {record['name']!r} has no {key!r}")
    return LayerResult(**values)


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def result_from_dict(doc: Any, where: str = "result") -> AnalysisResult:
    """The :class:`~ww_core.AnalysisResult` of a saved document (already parsed JSON).

    Raises:
        ww_core.SourceError: not a saved analysis, a newer format, or a malformed entry.
    """
    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
        raise SourceError(f"{where}: not a saved ww_core analysis (no \"format\": \"{FORMAT}\")")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SourceError(f"{where}: saved with format version {version!r}; this ww_core reads "
                          f"up to {FORMAT_VERSION} (upgrade ww_core)")
    if not isinstance(doc.get("layers"), list) or not isinstance(doc.get("skipped", []), list):
        raise SourceError(f"{where}: \"layers\" and \"skipped\" must be lists")
    layers = [_layer_from(r, where) for r in doc["layers"]]
    skipped: List[SkippedLayer] = []
    for s in doc.get("skipped", []):
        try:
            skipped.append(SkippedLayer(str(s["name"]), str(s["type"]), int(s["N"]), int(s["M"]),
                                        str(s["reason"])))
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{where}: a malformed skipped-layer entry: {s!r}") from None
    model = doc.get("model") if isinstance(doc.get("model"), Mapping) else {}
    engine = doc.get("engine") if isinstance(doc.get("engine"), Mapping) else {}
    options = doc.get("options") if isinstance(doc.get("options"), Mapping) else {}
    meta: Dict[str, Any] = {k: _decode(v) for k, v in model.items() if k != "identity"}
    meta["engine_version"] = str(engine.get("version", ""))
    meta["created"] = doc.get("created")
    if isinstance(model.get("identity"), str) and model["identity"]:
        meta["identity"] = model["identity"]
    return AnalysisResult(layers=layers, skipped=skipped, options=_decode(dict(options)), meta=meta)


def is_result_file(path: Union[str, os.PathLike]) -> bool:
    """True when ``path`` is a ``.json`` file that starts like a saved analysis."""
    path = os.fspath(path)
    if not os.path.isfile(path) or not path.lower().endswith(".json"):
        return False
    with open(path, "rb") as fh:
        head = fh.read(4096)
    return head.lstrip().startswith(b"{") and f'"{FORMAT}"'.encode() in head


def load_result(path: Union[str, os.PathLike]) -> AnalysisResult:
    """Read an analysis written by :meth:`ww_core.AnalysisResult.save`.

    Args:
        path: the JSON file.

    Returns:
        The :class:`~ww_core.AnalysisResult`; its ``meta`` holds the engine version that wrote
        it, the creation time, the model identity and what was recorded about the source.

    Raises:
        FileNotFoundError: no such file.
        ww_core.SourceError: not valid JSON, not a saved analysis, or a newer format.

    Example:
        >>> import ww_core
        >>> ww_core.load_result("no/such/file.json")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no/such/file.json: no such file
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not a JSON file ({' '.join(str(exc).split())})") from None
    return result_from_dict(doc, where=path)
