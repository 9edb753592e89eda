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

import re
import warnings
from typing import Any, Dict, List, Optional

from .base import LAYER_METRICS, Tracker, finite_float, flat_metrics, metric_key, plain_value

__all__ = ["WandbTracker", "LAYER_METRICS", "flat_metrics", "metric_key"]


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
            value = finite_float(value)
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
            data.append([plain_value(row.get(col)) for col in columns])
        return wandb.Table(columns=columns, data=data)

    def _alpha_chart(self, wandb: Any, history: List[Dict[str, Any]]) -> Any:
        series: Dict[str, Dict[int, float]] = {}
        for row in history or ():
            alpha = finite_float(row.get("alpha"))
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
                warnings.warn(f"WandbTracker: ESD images disabled ({exc!r})", RuntimeWarning, stacklevel=2)
                self._plots_warned = True
            return {}
        layers = [lay for lay in getattr(result, "layers", ()) if lay.flags and lay.evals is not None]
        images: Dict[str, Any] = {}
        if not layers:
            return images
        # A bare Figure (not registered with pyplot: nothing global to leak, safe off the main
        # thread) rendered by wandb itself. wandb.Image's figure check reads the attribute
        # ``matplotlib.pyplot``, which exists only once pyplot is imported; importing it does not
        # select a GUI backend.
        import matplotlib.pyplot  # noqa: F401
        from matplotlib.figure import Figure

        for layer in layers[: self.max_images]:
            fig = Figure(figsize=(5, 3.5), dpi=80, layout="tight")
            try:
                plot_esd(layer, ax=fig.add_subplot(1, 1, 1), evals=layer.evals)
                caption = f"{layer.name}: alpha={layer.alpha:.3g} flags={','.join(layer.flags)}"
                images[f"{self.prefix}/esd/{layer.name}"] = wandb.Image(fig, caption=caption)
            except Exception as exc:
                if not self._plots_warned:
                    warnings.warn(f"WandbTracker: ESD plot of {layer.name} failed ({exc!r})",
                                  RuntimeWarning, stacklevel=2)
                    self._plots_warned = True
            finally:
                fig.clear()  # wandb.Image has rendered its own copy; free the artists now
        return images
