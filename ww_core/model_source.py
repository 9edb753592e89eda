"""Turn what a user names as a model into an analysis: a model object, a weights file or folder,
a Hugging Face model id in the local cache, or a saved analysis (JSON).

Used by :func:`ww_core.compare` and by ``ww-analyze``; nothing is ever downloaded.
"""

from __future__ import annotations

import inspect
import os
import re
from typing import Any, Dict, Mapping, Optional

from .analyze import analysis_layers, analyze
from .result import AnalysisResult
from .result_io import is_result_file, load_result

__all__ = ["resolve_path", "result_of", "reusable_options", "source_label"]

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json")
#: Options recorded on a result that cannot be passed back to ``analyze`` as they are.
_NOT_REUSABLE = ("base_model",)


def resolve_path(spec: str) -> str:
    """``spec`` itself when it exists, else the local snapshot folder of the Hugging Face model id.

    Raises:
        FileNotFoundError: neither a path nor a model id in the local cache (one-line message).
    """
    if os.path.exists(spec):
        return spec
    if not _HF_ID.match(spec) or spec.lower().endswith(_WEIGHT_SUFFIXES):
        raise FileNotFoundError(f"no such file or directory: {spec}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"no such file or directory: {spec} (to read it as a Hugging Face "
                                f"model id: pip install huggingface_hub)") from None
    try:
        return snapshot_download(spec, local_files_only=True)
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, a bad id, a broken cache entry
        raise FileNotFoundError(f"{spec}: no such file or directory, and not a model in the local "
                                f"Hugging Face cache (nothing is downloaded; fetch it first, e.g. "
                                f"`huggingface-cli download {spec}`)") from None


def source_label(source: Any) -> str:
    """A short name for ``source`` in reports: the path or id as given, else the class name."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, AnalysisResult):
        return str(source.meta.get("source") or "analysis result")
    return type(source).__name__


def reusable_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """The recorded options of a result that :func:`ww_core.analyze` accepts back as keywords, so
    that a model compared with a saved analysis is analysed the same way."""
    accepted = inspect.signature(analyze).parameters
    return {k: v for k, v in options.items() if k in accepted and k not in _NOT_REUSABLE}


def result_of(source: Any, options: Optional[Mapping[str, Any]] = None,
              label: Optional[str] = None) -> AnalysisResult:
    """The analysis of ``source``: a saved one is loaded, anything else analysed with ``options``.

    The result's ``meta`` records the source (``label`` or :func:`source_label`) and, for an
    analysed source, every layer of the model (``model_layers``), so that a layer left out by a
    selection reads as "not analysed", never as missing from the model.

    Args:
        source: an :class:`~ww_core.AnalysisResult`; a path to a saved analysis (``.json``), a
            weights file or folder; a Hugging Face model id in the local cache; or anything
            :func:`ww_core.analyze` accepts (a torch or Keras model, a state dict, a snapshot).
        options: keywords of :func:`ww_core.analyze`.
        label: the name reports give this side.

    Raises:
        FileNotFoundError: a path that does not exist and no cached model id.
        ww_core.SourceError: an unreadable source or saved analysis.
        ValueError: an invalid option.
    """
    options = dict(options or {})
    if isinstance(source, AnalysisResult):
        result = source
    elif isinstance(source, (str, os.PathLike)) and (
            os.fspath(source).lower().endswith(".json") or is_result_file(source)):
        result = load_result(source)
    else:
        target = resolve_path(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else source
        result = analyze(target, **options)
        layers = analysis_layers(target, result.options.get("conv2d_norm", True),
                                 result.options.get("split_qkv", True), options.get("peft", False),
                                 options.get("base_model"), options.get("trainable"))
        result.meta["model_layers"] = [[lm.name, lm.type, int(lm.N), int(lm.M), int(lm.rf)]
                                       for lm in layers]
    if label is not None or "source" not in result.meta:
        result.meta["source"] = label if label is not None else source_label(source)
    return result
