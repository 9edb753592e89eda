"""Test tooling: read a W&B offline run (``offline-run-*/run-<id>.wandb``) back into Python.

Not part of the package: the ``.wandb`` file format is wandb's internal LevelDB-style log of
``wandb.proto`` records, good enough for asserting what a test logged, not a public API.
Tests import it as ``from wandb_offline import read_offline_run`` (pytest's default ``prepend``
import mode puts ``tests/``, which has no ``__init__.py``, on ``sys.path``).
"""

from __future__ import annotations

import glob
import json
import os
import time
import zlib
from typing import Any, Dict, Iterable

__all__ = ["read_offline_run"]

_BLOCK = 32768
_HEADER = 7


def _history_item_value(item: Any) -> Any:
    kind = item.WhichOneof("value") if hasattr(item, "WhichOneof") else None
    if kind == "none":
        return None
    if kind in ("boolean", "integer", "number", "text"):
        return getattr(item, kind)
    if kind == "json":
        return json.loads(item.json)
    return json.loads(item.value_json) if item.value_json else None


def _item_key(item: Any) -> str:
    return item.key if item.key else "/".join(item.nested_key)


def _read_records(data: bytes) -> Iterable[bytes]:
    """Logical records of wandb's LevelDB-style log (CRC-32 over type byte + payload)."""
    if data[:4] != b":W&B":
        raise ValueError("not a .wandb file (bad header)")
    pos = _HEADER
    pending = b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:
            pos += left_in_block
            continue
        crc = int.from_bytes(data[pos:pos + 4], "little")
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        rtype = data[pos + 6]
        if length == 0 and rtype == 0:
            pos += left_in_block
            continue
        payload = data[pos + _HEADER:pos + _HEADER + length]
        if len(payload) < length:
            break  # truncated tail (still being written)
        if zlib.crc32(bytes([rtype]) + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"CRC mismatch at byte {pos}")
        pos += _HEADER + length
        if rtype == 1:
            yield payload
        elif rtype == 2:
            pending = payload
        elif rtype == 3:
            pending += payload
        elif rtype == 4:
            yield pending + payload
            pending = b""


def read_offline_run(path: str, timeout: float = 10.0) -> Dict[str, Any]:
    """Read an offline run back: ``{"history": [row, ...], "summary": {...}, "exited": bool}``.

    Also ``"history_bytes"`` (the serialised size of each history record, parallel to
    ``"history"``), ``"alerts"`` (``{"title", "text", "level"}`` per ``run.alert``) and
    ``"metrics"`` (``{"name" or "glob_name": step_metric}`` per ``define_metric``).

    Args:
        path: a ``run-<id>.wandb`` file or the ``offline-run-*`` directory holding one.
        timeout: wait up to this many seconds for the final ``exit`` record, since ``finish()``
            can return before the file is flushed (call ``wandb.teardown()`` to avoid waiting).

    Each history row maps keys (nested keys joined with ``/``) to decoded JSON values and
    includes ``_step``. Media values (tables, images, charts) are the JSON stubs wandb stores.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.wandb")))
        if not files:
            raise FileNotFoundError(f"no .wandb file in {path}")
        path = files[0]
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as fh:
            data = fh.read()
        out: Dict[str, Any] = {"history": [], "summary": {}, "exited": False,
                               "history_bytes": [], "alerts": [], "metrics": {}}
        if len(data) >= _HEADER:
            for raw in _read_records(data):
                rec = pb.Record()
                rec.ParseFromString(raw)
                kind = rec.WhichOneof("record_type")
                if kind == "history":
                    row = {_item_key(i): _history_item_value(i) for i in rec.history.item}
                    if "_step" not in row and rec.history.HasField("step"):
                        row["_step"] = rec.history.step.num
                    out["history"].append(row)
                    out["history_bytes"].append(len(raw))
                elif kind == "alert":
                    out["alerts"].append({"title": rec.alert.title, "text": rec.alert.text,
                                          "level": rec.alert.level})
                elif kind == "metric":
                    name = rec.metric.name or rec.metric.glob_name
                    out["metrics"][name] = rec.metric.step_metric
                elif kind == "summary":
                    for item in rec.summary.update:
                        out["summary"][_item_key(item)] = (json.loads(item.value_json)
                                                           if item.value_json else None)
                elif kind == "exit":
                    out["exited"] = True
        if out["exited"] or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def logical_keys(rows: Iterable[Dict[str, Any]]) -> set:
    """Distinct keys as W&B panels see them: a table's/image's sub-keys count once."""
    keys = set()
    for row in rows:
        media = {k[: -len("/_type")] for k in row if k.endswith("/_type")}
        for k in row:
            keys.add(next((m for m in media if k.startswith(m + "/")), k))
    return keys
