"""Atomic file writes: the one way every module of ``ww_callbacks`` replaces or extends a file.

A reader (a resumed run, a browser refreshing ``report.html``) sees either the old file or the
new one, never half of it: the data goes to a temporary file in the same folder, which is then
renamed over the target (``os.replace`` is atomic on POSIX and Windows).

Appends (:func:`append_bytes`, used for ``history.jsonl``/``.csv``) are whole or nothing: when the
disk fills or a file-size limit is reached part-way, the file is cut back to its size before the
append, so a reader never finds half a line.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "state.json")
    >>> write_json(path, {"step": 3})
    >>> read_json(path)
    {'step': 3}
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from typing import IO, Any, Iterator

__all__ = ["atomic_open", "append_bytes", "fsync_dir", "write_bytes", "write_json", "read_json"]


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", fsync: bool = False, **kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    Args:
        path: the file to replace (its folder is created when missing).
        mode: ``"w"`` (text, UTF-8 unless ``encoding`` is given) or ``"wb"``.
        fsync: flush the data to disk before the rename, and the folder after it (survives a
            power loss, not only a crash).
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
    if fsync:
        fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    """Flush ``folder``'s entries (a rename, a new file) to disk; best effort, never raises
    (a folder cannot be opened on Windows, and some file systems refuse to fsync one)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_bytes(path: str, data: bytes, fsync: bool = True) -> int:
    """Append ``data`` to ``path`` (created when missing) whole or not at all.

    How: the file's size is taken before writing; the bytes go out with ``os.write`` in a loop (a
    write can be short when the disk fills or ``RLIMIT_FSIZE`` is reached, and the next one then
    raises ``ENOSPC``/``EFBIG``) and are fsynced (a delayed-allocation file system may report
    ``ENOSPC`` only there). If any of this fails, the file is truncated back to its earlier size
    (shrinking a file needs no free space) and the error is re-raised: the file holds the old
    content, never part of ``data``. Only a process killed between a short write and that
    truncation, or a truncation that fails itself, leaves a partial tail; :func:`os.path.getsize`
    tells the caller (the returned size no longer matches) and readers skip a partial last line.

    One writer per file is assumed (``O_APPEND``; the history is written by global rank 0 only).

    Returns:
        The file's size after the append.

    Raises:
        OSError: the file cannot be opened, written or fsynced (it is left as it was).
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written <= 0:            # no progress and no error: do not loop forever
                    raise OSError(errno.EIO, "write made no progress", path)
                view = view[written:]
            if fsync:
                os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
        return start + len(data)
    finally:
        os.close(fd)


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
