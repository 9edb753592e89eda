"""Weights & Biases tracker: per-layer scalars, a layer table, ESD images and an alpha chart.

The tracker logs into the trainer's existing run (Lightning's ``WandbLogger.experiment``, the run
HF's ``WandbCallback`` opened, or whatever ``wandb.run`` is active). It never opens a second run;
with no run at all it opens one only when ``open_run=True`` and then finishes it in :meth:`close`.

Step semantics: the trainers that share the run define their own x-axis metric
(``trainer/global_step`` for Lightning, ``train/global_step`` for HF) and never pass ``step=`` to
``run.log``. This tracker does the same: it logs ``{step_metric: step, "ww/...": ...}`` as one
committed row and declares ``define_metric("ww/*", step_metric=step_metric)`` once, so the curves
plot against the trainer's step and wandb's internal ``_step`` stays monotonic for everybody.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from typing import Any, Dict, Iterable, List, Optional

from .base import LAYER_METRICS, Tracker, _as_float, _table_value, flat_metrics, metric_key  # noqa: F401

__all__ = ["WandbTracker", "LAYER_METRICS", "flat_metrics", "metric_key", "read_offline_run"]

class WandbTracker(Tracker):
    """Log each analysis into a W&B run.

    Args:
        run: the run to log into (e.g. ``WandbLogger.experiment``). Default: the active
            ``wandb.run``, looked up at the first analysis.
        step_metric: the x-axis key logged with every row (``trainer/global_step`` for
            Lightning, ``train/global_step`` for HF, ``epoch`` or anything else for your own runs).
        project: project of a run this tracker opens itself (``open_run=True`` only).
        open_run: with no run passed and none active, open one (then finished in :meth:`close`).
            When False and there is no run, the tracker raises at the first analysis, which the
            controller reports once and disables.
        log_esd_images: log ``wandb.Image`` ESD plots of flagged layers (needs eigenvalues, i.e.
            ``wants_evals``, and ``ww_core.plots``).
        max_images: at most this many ESD images per analysis.
        prefix: key prefix (``ww``).
        init_kwargs: more ``wandb.init`` arguments for a run this tracker opens (``dir``,
            ``name``, ``mode``...).

    Per analysis one row is committed holding ``{step_metric: step}``, the per-layer scalars
    ``ww/<layer>/<metric>``, ``ww/summary/<metric>``, the latest layer table ``ww/layers``, the
    chart ``ww/alpha_per_layer`` (a ``line_series`` of every layer's alpha over the steps so far)
    and ESD images ``ww/esd/<layer>``.
    """

    name = "wandb"

    def __init__(self, run: Any = None, *, step_metric: str = "trainer/global_step",
                 project: Optional[str] = None, open_run: bool = False, log_esd_images: bool = True,
                 max_images: int = 8, prefix: str = "ww",
                 init_kwargs: Optional[Dict[str, Any]] = None) -> None:
        if max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {max_images}")
        self._run = run
        self.step_metric = step_metric
        self.project = project
        self.open_run = open_run
        self.log_esd_images = log_esd_images
        self.max_images = int(max_images)
        self.prefix = prefix
        self.init_kwargs = dict(init_kwargs or {})
        self._owns_run = False
        self._defined = False
        self._plots_warned = False
        #: The controller keeps eigenvalues in the result when a tracker sets this.
        self.wants_evals = bool(log_esd_images and max_images > 0)

    # -- run handling ---------------------------------------------------------------------------
    @property
    def run(self) -> Any:
        """The run logged into (resolved lazily: passed in, else ``wandb.run``, else opened)."""
        if self._run is None:
            import wandb

            if wandb.run is not None:
                self._run = wandb.run
            elif self.open_run:
                kwargs = {"project": self.project, "reinit": "create_new", **self.init_kwargs}
                self._run = wandb.init(**kwargs)
                self._owns_run = True
            else:
                raise RuntimeError(
                    "WandbTracker: no W&B run is active; pass run=..., call wandb.init() first, "
                    "or use WandbTracker(open_run=True)")
        return self._run

    def _define_metrics(self, run: Any) -> None:
        if self._defined or not hasattr(run, "define_metric"):
            self._defined = True
            return
        # The x-axis itself (harmless if the trainer defined it already), then our namespace.
        if self._owns_run:
            run.define_metric(self.step_metric)
        run.define_metric(f"{self.prefix}/*", step_metric=self.step_metric)
        self._defined = True

    # -- Tracker interface ----------------------------------------------------------------------
    def log_analysis(self, *, step: int, epoch: int, rows: List[Dict[str, Any]],
                     summary: Dict[str, float], result: Any, history: List[Dict[str, Any]]) -> None:
        import wandb

        run = self.run
        self._define_metrics(run)
        data: Dict[str, Any] = {self.step_metric: int(step)}
        data.update(flat_metrics(rows, summary, self.prefix))
        if rows:
            data[f"{self.prefix}/layers"] = self._table(wandb, rows)
        chart = self._alpha_chart(wandb, history)
        if chart is not None:
            data[f"{self.prefix}/alpha_per_layer"] = chart
        if self.log_esd_images and self.max_images > 0 and result is not None:
            data.update(self._esd_images(wandb, result))
        # One committed row, no step=: the trainer's own x-axis key carries the step.
        run.log(data)

    def log_event(self, *, step: int, kind: str, payload: Dict[str, Any]) -> None:
        run = self.run
        self._define_metrics(run)
        safe_kind = re.sub(r"\s+", "_", str(kind))
        data: Dict[str, Any] = {self.step_metric: int(step), f"{self.prefix}/event/{safe_kind}": 1}
        for key, value in (payload or {}).items():
            value = _as_float(value)
            if value is not None:
                data[f"{self.prefix}/event/{safe_kind}/{key}"] = value
        run.log(data)

    def close(self) -> None:
        if self._owns_run and self._run is not None:
            self._run.finish()
            self._run = None
            self._owns_run = False

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _table(wandb: Any, rows: List[Dict[str, Any]]) -> Any:
        columns = list(rows[0].keys())
        data = []
        for row in rows:
            data.append([_table_value(row.get(col)) for col in columns])
        return wandb.Table(columns=columns, data=data)

    def _alpha_chart(self, wandb: Any, history: List[Dict[str, Any]]) -> Any:
        series: Dict[str, Dict[int, float]] = {}
        for row in history or ():
            alpha = _as_float(row.get("alpha"))
            if alpha is None or row.get("step") is None:
                continue
            series.setdefault(str(row.get("name")), {})[int(row["step"])] = alpha
        if not series:
            return None
        names = list(series)
        xs = [sorted(series[n]) for n in names]
        ys = [[series[n][s] for s in x] for n, x in zip(names, xs)]
        return wandb.plot.line_series(xs=xs, ys=ys, keys=names, title="alpha per layer",
                                      xname=self.step_metric)

    def _esd_images(self, wandb: Any, result: Any) -> Dict[str, Any]:
        try:
            from ww_core.plots import plot_esd
        except Exception as exc:  # module missing or matplotlib unavailable
            if not self._plots_warned:
                warnings.warn(f"WandbTracker: ESD images disabled ({exc!r})", RuntimeWarning)
                self._plots_warned = True
            return {}
        layers = [l for l in getattr(result, "layers", ()) if l.flags and l.evals is not None]
        images: Dict[str, Any] = {}
        if not layers:
            return images
        # A bare Figure renders with Agg and never touches pyplot's global backend or state.
        from matplotlib.figure import Figure
        from PIL import Image

        for layer in layers[: self.max_images]:
            fig = Figure(figsize=(5, 3.5))
            ax = fig.add_subplot(1, 1, 1)
            try:
                plot_esd(layer, ax=ax, evals=layer.evals)
                buf = io.BytesIO()
                fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
                buf.seek(0)
                caption = f"{layer.name}: alpha={layer.alpha:.3g} flags={','.join(layer.flags)}"
                images[f"{self.prefix}/esd/{layer.name}"] = wandb.Image(Image.open(buf),
                                                                       caption=caption)
            except Exception as exc:
                if not self._plots_warned:
                    warnings.warn(f"WandbTracker: ESD plot of {layer.name} failed ({exc!r})",
                                  RuntimeWarning)
                    self._plots_warned = True
        return images


# -- reading offline runs back ------------------------------------------------------------------
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
    import zlib

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

    Args:
        path: a ``run-<id>.wandb`` file or the ``offline-run-*`` directory holding one.
        timeout: wait up to this many seconds for the final ``exit`` record, since ``finish()``
            can return before the file is flushed (call ``wandb.teardown()`` to avoid waiting).

    Each history row maps keys (nested keys joined with ``/``) to decoded JSON values and
    includes ``_step``. Media values (tables, images, charts) are the JSON stubs wandb stores.
    """
    import glob
    import os
    import time as _time

    from wandb.proto import wandb_internal_pb2 as pb

    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.wandb")))
        if not files:
            raise FileNotFoundError(f"no .wandb file in {path}")
        path = files[0]
    deadline = _time.monotonic() + timeout
    while True:
        with open(path, "rb") as fh:
            data = fh.read()
        out: Dict[str, Any] = {"history": [], "summary": {}, "exited": False}
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
                elif kind == "summary":
                    for item in rec.summary.update:
                        out["summary"][_item_key(item)] = (json.loads(item.value_json)
                                                           if item.value_json else None)
                elif kind == "exit":
                    out["exited"] = True
        if out["exited"] or _time.monotonic() > deadline:
            return out
        _time.sleep(0.2)
