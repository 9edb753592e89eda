"""Atomic file writes: the one way every module of ``ww_callbacks`` replaces a file.

A reader (a resumed run, a browser refreshing ``report.html``) sees either the old file or the
new one, never half of it: the data goes to a temporary file in the same folder, which is then
renamed over the target (``os.replace`` is atomic on POSIX and Windows).

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "state.json")
    >>> write_json(path, {"step": 3})
    >>> read_json(path)
    {'step': 3}
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import IO, Any, Iterator

__all__ = ["atomic_open", "write_bytes", "write_json", "read_json"]


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", fsync: bool = False, **kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    Args:
        path: the file to replace (its folder is created when missing).
        mode: ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``.
        fsync: flush the data to disk before the rename (survives a power loss, not only a crash).
        **kwargs: passed to :func:`open` (``newline=""`` for CSV, ...).

    Raises:
        OSError: when the folder cannot be created or the file cannot be written; the target is
            left as it was and the temporary file is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_json(path: str, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as strict JSON (no NaN), atomically and fsynced.

    Raises:
        ValueError: ``obj`` holds a non-finite float (strict JSON cannot represent it).
        TypeError: ``obj`` is not JSON-serialisable.
        OSError: the file cannot be written.
    """
    text = json.dumps(obj, allow_nan=False)
    with atomic_open(path, "w", fsync=True) as fh:
        fh.write(text)


def read_json(path: str) -> Any:
    """The JSON document in ``path``.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not valid JSON.
    """
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
