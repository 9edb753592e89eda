"""TensorBoard tracker: per-layer alpha scalars at ``global_step=step`` (no TensorFlow needed).

Writes into the trainer's writer when given (Lightning's ``TensorBoardLogger.experiment``, HF's
``TensorBoardCallback.tb_writer``; anything with ``add_scalar(tag, value, step)``), else opens its
own in ``log_dir``: ``torch.utils.tensorboard.SummaryWriter`` when torch is installed (classic
``simple_value`` scalars), else ``tensorboard.summary.Writer`` (tensor-based scalars; TensorBoard
shows both the same way). Only a writer it opened is closed.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

from .base import (
    DECISION_COLUMNS,
    LayerKeys,
    Tracker,
    check_metrics,
    decision_rows,
    finite_float,
    metric_section,
    plain_value,
    scalars,
)

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
        log_table: also write each analysis's layer table (every column, plus the layer's
            ``key``) as markdown text ``ww/layers`` (writers with ``add_text`` only).
        log_metrics: the per-layer columns logged as scalars (default alpha only; e.g.
            ``("alpha", "stable_rank")``); every column is in the text table anyway.
        prefix: tag prefix (``ww``).

    If the trainer's torch ``SummaryWriter`` was closed before the final analysis, an own writer
    is opened in its directory (and closed by this tracker).

    Scalars at ``global_step=step`` (finite values, see :func:`ww_callbacks.trackers.base.scalars`):

    * ``ww_alpha/<NN>_<layer>``: alpha per layer, one TensorBoard section whose charts sort in
      model order (``NN``: the layer's index, fixed per tracker by :attr:`layer_keys`). Other
      ``log_metrics`` get their own section (``ww_stable_rank/...``).
    * ``ww/<summary>``: the :data:`~ww_callbacks.trackers.base.SUMMARY_KEYS`.
    * ``ww/event/<kind>``: at an action's step, the number of layers it concerns.

    Decisions (freeze, LR factors, early stop) are markdown text ``ww/decisions`` at their step
    (columns :data:`~ww_callbacks.trackers.base.DECISION_COLUMNS`, alpha from the latest
    analysis). An own torch writer also gets a custom-scalars layout overlaying every layer's
    alpha. The writer is flushed after each analysis and event.
    """

    name = "tensorboard"

    def __init__(self, writer: Any = None, *, log_dir: Optional[str] = None,
                 backend: str = "auto", log_table: bool = True,
                 log_metrics: Iterable[str] = ("alpha",), prefix: str = "ww") -> None:
        if backend not in ("auto", "torch", "tensorboard"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'tensorboard', got {backend!r}")
        self._writer = writer
        self.log_dir = log_dir
        self.backend = backend
        self.log_table = log_table
        self.log_metrics = check_metrics(log_metrics)
        self.prefix = prefix
        #: Layer name -> tag segment, model order, stable for this tracker's lifetime.
        self.layer_keys = LayerKeys()
        self._alphas: Dict[str, Optional[float]] = {}
        self._owns_writer = False
        self._layout_written: Optional[Any] = None  # the writer that has the layout

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
        for tag, value in scalars(rows, summary, self.layer_keys, self.log_metrics,
                                  self.prefix).items():
            writer.add_scalar(tag, value, int(step))
        self._alphas = {str(r.get("name")): finite_float(r.get("alpha")) for r in rows}
        if (self._owns_writer and self._layout_written is not writer
                and hasattr(writer, "add_custom_scalars")):
            charts = {f"{m} per layer": ["Multiline", [f"{metric_section(m, self.prefix)}/.*"]]
                      for m in self.log_metrics}  # tag regexes: new layers join by themselves
            writer.add_custom_scalars({"weightwatcher": charts})
            self._layout_written = writer
        if self.log_table and rows and hasattr(writer, "add_text"):
            table = [{"key": self.layer_keys[str(r.get("name"))], **r} for r in rows]
            cols = [c for c in table[0] if c != "time"]
            writer.add_text(f"{self.prefix}/layers", _markdown_table(table, cols), int(step))
        if hasattr(writer, "flush"):
            writer.flush()

    def log_event(self, *, step: int, kind: str, payload: Dict[str, Any]) -> None:
        rows = decision_rows(step, kind, payload, self._alphas)
        writer = self.writer
        writer.add_scalar(f"{self.prefix}/event/{kind}", float(len(rows)), int(step))
        if rows and hasattr(writer, "add_text"):
            writer.add_text(f"{self.prefix}/decisions", _markdown_table(rows, DECISION_COLUMNS),
                            int(step))
        if hasattr(writer, "flush"):
            writer.flush()

    def close(self) -> None:
        if self._owns_writer and self._writer is not None:
            self._writer.close()
            self._writer = None
            self._owns_writer = False
            self._layout_written = None


def _markdown_table(rows: List[Dict[str, Any]], cols: Sequence[str]) -> str:
    """``rows`` as a markdown table of ``cols``: floats to 4 significant digits, missing or
    non-finite values as empty cells."""

    def fmt(v: Any) -> str:
        v = plain_value(v)
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
