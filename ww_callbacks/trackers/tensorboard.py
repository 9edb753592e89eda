"""TensorBoard tracker: per-layer scalars at ``global_step=step`` (no TensorFlow needed).

Writes into the trainer's writer when given (Lightning's ``TensorBoardLogger.experiment``, HF's
``TensorBoardCallback.tb_writer``; anything with ``add_scalar(tag, value, step)``), else opens its
own in ``log_dir``: ``torch.utils.tensorboard.SummaryWriter`` when torch is installed (classic
``simple_value`` scalars), else ``tensorboard.summary.Writer`` (tensor-based scalars; TensorBoard
shows both the same way). Only a writer it opened is closed.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from .base import Tracker, flat_metrics, plain_value

__all__ = ["TensorBoardTracker"]


class _TBWriter:
    """``tensorboard.summary.Writer`` behind the ``SummaryWriter`` method names we use."""

    def __init__(self, log_dir: str) -> None:
        from tensorboard.summary import Writer

        self._writer = Writer(log_dir)
        self.log_dir = log_dir

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self._writer.add_scalar(tag, float(value), int(global_step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class TensorBoardTracker(Tracker):
    """Log each analysis as TensorBoard scalars.

    Args:
        writer: the trainer's writer (not closed by this tracker).
        log_dir: where to open an own writer (default ``ww-output/tensorboard``).
        backend: own writer kind: ``"auto"`` (torch's ``SummaryWriter`` if importable, else
            tensorboard's ``Writer``), ``"torch"`` or ``"tensorboard"``.
        log_table: also write the latest layer table as text ``ww/layers`` (writers with
            ``add_text`` only).
        prefix: tag prefix (``ww``).

    If the trainer's torch ``SummaryWriter`` was closed before the final analysis, an own writer
    is opened in its directory (and closed by this tracker).

    Tags: ``ww/<layer>/<metric>`` and ``ww/summary/<metric>`` (finite values), at
    ``global_step=step``; an own torch writer also gets a custom-scalars layout overlaying every
    layer's alpha. The writer is flushed after each analysis.
    """

    name = "tensorboard"

    def __init__(self, writer: Any = None, *, log_dir: Optional[str] = None,
                 backend: str = "auto", log_table: bool = True, prefix: str = "ww") -> None:
        if backend not in ("auto", "torch", "tensorboard"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'tensorboard', got {backend!r}")
        self._writer = writer
        self.log_dir = log_dir
        self.backend = backend
        self.log_table = log_table
        self.prefix = prefix
        self._owns_writer = False
        self._layout_names: Optional[tuple] = None

    @property
    def writer(self) -> Any:
        w = self._writer
        if w is not None and not self._owns_writer and getattr(w, "all_writers", ()) is None:
            # The trainer closed its torch SummaryWriter already (HF's TensorBoardCallback does in
            # on_train_end, which runs before user callbacks): continue in the same directory
            # with a writer of our own, closed in close().
            log_dir = w.get_logdir() if hasattr(w, "get_logdir") else getattr(w, "log_dir", None)
            self.log_dir = log_dir or self.log_dir
            self._writer = None
        if self._writer is None:
            log_dir = self.log_dir or "ww-output/tensorboard"
            writer = None
            if self.backend in ("auto", "torch"):
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    if self.backend == "torch":
                        raise
                else:
                    writer = SummaryWriter(log_dir=log_dir)
            if writer is None:
                writer = _TBWriter(log_dir)
            self._writer = writer
            self._owns_writer = True
        return self._writer

    def log_analysis(self, *, step: int, epoch: int, rows: List[Dict[str, Any]],
                     summary: Dict[str, float], result: Any, history: List[Dict[str, Any]]) -> None:
        writer = self.writer
        for tag, value in flat_metrics(rows, summary, self.prefix).items():
            writer.add_scalar(tag, value, int(step))
        if self._owns_writer and hasattr(writer, "add_custom_scalars"):
            names = tuple(str(r.get("name")) for r in rows)
            if names and names != self._layout_names:
                tags = [f"{self.prefix}/{n}/alpha" for n in names]
                writer.add_custom_scalars(
                    {"weightwatcher": {"alpha per layer": ["Multiline", tags]}})
                self._layout_names = names
        if self.log_table and rows and hasattr(writer, "add_text"):
            writer.add_text(f"{self.prefix}/layers", _markdown_table(rows), int(step))
        if hasattr(writer, "flush"):
            writer.flush()

    def log_event(self, *, step: int, kind: str, payload: Dict[str, Any]) -> None:
        writer = self.writer
        writer.add_scalar(f"{self.prefix}/event/{kind}", 1.0, int(step))
        if hasattr(writer, "add_text"):
            writer.add_text(f"{self.prefix}/events", f"**{kind}**: `{json.dumps(payload, default=str)}`",
                            int(step))
        if hasattr(writer, "flush"):
            writer.flush()

    def close(self) -> None:
        if self._owns_writer and self._writer is not None:
            self._writer.close()
            self._writer = None
            self._owns_writer = False


_TABLE_COLUMNS = ("name", "type", "N", "M", "alpha", "alpha_hill", "D", "log_norm",
                  "log_spectral_norm", "stable_rank", "num_pl_spikes", "warning", "flags")


def _markdown_table(rows: List[Dict[str, Any]]) -> str:
    cols = [c for c in _TABLE_COLUMNS if c in rows[0]]

    def fmt(v: Any) -> str:
        v = plain_value(v)
        if v is None:
            return "nan"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
