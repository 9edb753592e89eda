"""Where a run's record goes when the user names no folder: one sub-folder per run.

``<base>/<run name>``, the name being the experiment tracker's run id when there is one (so the
folder matches the W&B / MLflow run) or the start time (``20261201-064512``). A resumed run
continues in the folder its checkpoint points to, or, without a checkpoint pointer, in the most
recent run folder under ``base``.

Example:
    >>> import tempfile
    >>> base = tempfile.mkdtemp()
    >>> first = new_run_dir(base, run_id="abc123")
    >>> os.makedirs(first)
    >>> os.path.basename(first), os.path.basename(new_run_dir(base, run_id="abc123"))
    ('abc123', 'abc123-1')
"""

from __future__ import annotations

import glob
import os
import re
import time
from typing import Any, Iterable, Optional

__all__ = ["AUTO", "MEMORY_ONLY", "KEEP", "check_output_dir", "run_folder", "new_run_dir",
           "latest_run_dir", "run_id_of"]


class _Auto:
    """The default ``output_dir``: a new folder per run under the trainer's (or ``ww-output``)."""

    def __repr__(self) -> str:
        return "'<base>/<run>'"


#: Sentinel default of ``output_dir``: one folder per run (see the module docstring).
AUTO: Any = _Auto()

#: ``output_dir=MEMORY_ONLY`` (the value ``False``): keep the history in memory only, no files.
MEMORY_ONLY = False


class _Keep:
    """``configure(output_dir=KEEP)`` (its default): keep the constructor's ``output_dir``."""

    def __repr__(self) -> str:
        return "KEEP"


#: The default of ``configure(output_dir=...)``: no override.
KEEP: Any = _Keep()


def check_output_dir(output_dir: Any) -> Optional[str]:
    """The named folder of an ``output_dir`` argument: a path, or ``None`` for :data:`AUTO`
    (chosen per run later) and :data:`MEMORY_ONLY`.

    Raises:
        ValueError: ``None`` (ambiguous before 0.2.0: omit it for a per-run folder, or pass
            ``MEMORY_ONLY``) or anything else that is not a path.

    Example:
        >>> check_output_dir("out"), check_output_dir(MEMORY_ONLY), check_output_dir(AUTO)
        ('out', None, None)
    """
    if output_dir is AUTO or output_dir is MEMORY_ONLY:
        return None
    if output_dir is None:
        raise ValueError("output_dir=None is not accepted: omit output_dir for a folder per run, "
                         "or pass output_dir=MEMORY_ONLY (False) to keep the history in memory only")
    if isinstance(output_dir, bool) or not isinstance(output_dir, (str, os.PathLike)):
        raise ValueError(f"output_dir must be a path or MEMORY_ONLY (False), got {output_dir!r}")
    return os.fspath(output_dir)


def run_id_of(trackers: Iterable[Any]) -> Optional[str]:
    """The first non-empty ``run_id`` a tracker reports (W&B run id, MLflow run id), else None."""
    for tracker in trackers:
        try:
            rid = getattr(tracker, "run_id", None)
        except Exception:  # a tracker whose run cannot be resolved yet
            continue
        if rid:
            return str(rid)
    return None


def new_run_dir(base: str, run_id: Optional[str] = None) -> str:
    """A folder name for a new run under ``base`` (not created): the run id or the time, made
    unique with ``-1``, ``-2``... when taken."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id) if run_id else time.strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(base, name), 0
    while os.path.exists(path):
        n += 1
        path = os.path.join(base, f"{name}-{n}")
    return path


def latest_run_dir(base: str) -> Optional[str]:
    """The most recently written run folder under ``base`` that holds a history or a state
    file, else None."""
    found = [p for name in ("history.jsonl", "ww_state.json")
             for p in glob.glob(os.path.join(base, "*", name))]
    return os.path.dirname(max(found, key=os.path.getmtime)) if found else None


def run_folder(base: str, current_step: Optional[int], trackers: Iterable[Any]) -> str:
    """A run's folder under ``base``: for a resume (``current_step > 0``) the latest run folder
    there, else a new one named by the trackers' run id or the time."""
    if current_step:
        latest = latest_run_dir(base)
        if latest is not None:
            return latest
    return new_run_dir(base, run_id_of(trackers))
