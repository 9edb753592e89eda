"""Readers of weight files: ``.safetensors`` (our own) and torch checkpoints (``torch.load``).

:func:`read_safetensors_header` needs neither torch nor the safetensors package: it parses the
JSON header and returns one :class:`LazyTensor` per tensor, in file order; nothing else is read
until :meth:`LazyTensor.read` is called, which maps that tensor's byte range only. ``bfloat16``
tensors are widened to ``float32`` (numpy has no bfloat16).

:func:`load_torch_file` reads ``.pt`` / ``.bin`` / ``.pth`` / ``.ckpt`` files with
``torch.load(weights_only=True)`` (memory-mapped where the format allows), so arbitrary pickles
are never executed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from .errors import SourceError

__all__ = ["LazyTensor", "load_torch_file", "read_safetensors_header"]

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16",
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


class LazyTensor:
    """One tensor of a safetensors file, read (memory-mapped) only when asked for."""

    def __init__(self, path: Path, dtype: str, shape: Tuple[int, ...], start: int, end: int):
        self.path, self.dtype_name, self.shape = path, dtype, shape
        self.start, self.end = start, end
        kind = _ST_DTYPES.get(dtype)
        self.unusable = None
        if kind is None:
            self.unusable = f"unsupported dtype {dtype}"
        elif kind != "bf16" and np.dtype(kind).kind != "f":
            self.unusable = f"non-float dtype {dtype}"

    @property
    def nbytes(self) -> int:
        kind = _ST_DTYPES[self.dtype_name]
        itemsize = 2 if kind == "bf16" else np.dtype(kind).itemsize
        return int(np.prod(self.shape)) * itemsize if self.shape else itemsize

    def read(self) -> np.ndarray:
        kind = _ST_DTYPES[self.dtype_name]
        count = int(np.prod(self.shape)) if self.shape else 1
        if kind == "bf16":     # numpy has no bfloat16: widen the 16 bits into a float32
            raw = np.memmap(self.path, dtype="<u2", mode="r", offset=self.start, shape=(count,))
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(self.shape)
        arr = np.memmap(self.path, dtype=np.dtype(kind).newbyteorder("<"), mode="r",
                        offset=self.start, shape=(count,))
        return np.array(arr).reshape(self.shape)   # a private, writable copy of this layer only


def read_safetensors_header(path: Path) -> Dict[str, LazyTensor]:
    """Parse a .safetensors header and return lazy tensors in file order (no torch needed).

    Raises:
        SourceError: the file is truncated or not a valid safetensors file.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SourceError(f"{path}: truncated or corrupt safetensors file (no header)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen <= 0 or 8 + hlen > size or hlen > 100 * 1024 * 1024:
            raise SourceError(f"{path}: truncated or corrupt safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(hlen).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{path}: corrupt safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupt safetensors header")
    base = 8 + hlen
    tensors: Dict[str, LazyTensor] = {}
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    try:
        items.sort(key=lambda kv: kv[1]["data_offsets"][0])
        for key, info in items:
            start, end = (int(x) for x in info["data_offsets"])
            if start < 0 or end < start or base + end > size:
                raise SourceError(f"{path}: truncated safetensors file (tensor {key!r} runs past the end)")
            tensor = LazyTensor(path, str(info["dtype"]), tuple(int(s) for s in info["shape"]),
                                 base + start, base + end)
            if tensor.unusable is None and tensor.nbytes != end - start:
                # a shape that does not match its byte range would read a neighbour's bytes
                raise SourceError(f"{path}: corrupt safetensors header (tensor {key!r}: shape "
                                  f"{list(tensor.shape)} does not fit {end - start} bytes)")
            tensors[key] = tensor
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"{path}: corrupt safetensors header ({exc!r})") from None
    return tensors


def load_torch_file(path: Path) -> Mapping[str, Any]:
    """The state dict in a torch checkpoint, loaded with ``weights_only=True`` on the CPU.

    Raises:
        SourceError: torch is missing, the file is unreadable, refused by ``weights_only``, or
            holds something other than a mapping.
    """
    try:
        import torch
    except ImportError:
        raise SourceError(f"{path}: reading .pt/.bin files needs torch (pip install torch)") from None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # pre-1.6 (non-zip) checkpoints cannot be memory-mapped: read them whole
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types here
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise SourceError(f"{path}: refused: not loadable with torch.load(weights_only=True) "
                              f"(arbitrary pickles are never executed)") from None
        raise SourceError(f"{path}: cannot read checkpoint: {msg}") from None
    if not isinstance(obj, Mapping):
        raise SourceError(f"{path}: checkpoint holds a {type(obj).__name__}, not a state dict")
    return obj
