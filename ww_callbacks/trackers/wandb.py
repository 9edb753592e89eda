"""Weights & Biases tracker: keys that scale to hundreds of layers and analyses.

The tracker logs into the trainer's existing run (Lightning's ``WandbLogger.experiment``, the run
HF's ``WandbCallback`` opened, or whatever ``wandb.run`` is active). It never opens a second run;
with no run at all it opens one only when ``open_run=True`` and then finishes it in :meth:`close`.

Keys (``prefix="ww"``, N analysed layers), one committed row per analysis:

* ``ww_alpha/<NN_layer>``: alpha per layer (:class:`~ww_callbacks.trackers.base.LayerKeys`:
  zero-padded model-order index + sanitised name, so the panels sort in model order). Other
  per-layer metrics only when asked for (``log_metrics``), each in its own ``ww_<metric>/`` section.
* ``ww/<summary key>``: :data:`~ww_callbacks.trackers.base.SUMMARY_KEYS` (alpha mean/median/
  min/max, flagged and frozen counts, timings).
* ``ww/layers``: a table of this analysis only (every column, ``layer_key`` and the name).
* ``ww/alpha_heatmap``: one image, layers (model order) x analysed steps (the last
  ``heatmap_steps``), redrawn each analysis at a bounded size from a bounded buffer (one float32
  and one flag per layer and step; a layer an analysis skipped, e.g. with layer rotation, is a
  grey gap at that step, not a value).
* ``ww/esd``: a list of ESD images, worst layers first, at most ``max_images``.
* ``ww/decisions``: the decisions table, logged at each action event with only the new rows.

By default that is N + 16 keys, whatever the number of analyses, and nothing re-uploads history.
A partial analysis logs only the layers it measured (the charts of the others have no point at
that step) and its summary keys describe those layers.

Step semantics: the trainers that share the run define their own x-axis metric
(``trainer/global_step`` for Lightning, ``train/global_step`` for HF) and never pass ``step=`` to
``run.log``. This tracker does the same: it logs ``{step_metric: step, ...}`` and declares
``define_metric("<section>/*", step_metric=step_metric)`` for each of its sections.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import deque
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .base import (
    DECISION_COLUMNS,
    LayerKeys,
    Tracker,
    decision_rows,
    finite_float,
    is_flagged,
    is_unjudged,
    metric_section,
    plain_value,
    scalars,
)

__all__ = ["WandbTracker"]

#: The heatmap colour of a fit on too few eigenvalues (as the local report's).
UNJUDGED_COLOUR = "#b9a3d6"

#: W&B's per-table row limit when the installed wandb does not say (``wandb.Table.MAX_ROWS``):
#: a table file logged into a run keeps only its first 10,000 rows.
DEFAULT_MAX_ROWS = 10000


#: The x-axis key of a tracker used outside the three callbacks with no ``step_metric``.
DEFAULT_STEP_METRIC = "global_step"


class WandbTracker(Tracker):
    """Log each analysis into a W&B run.

    Args:
        run: the run to log into (e.g. ``WandbLogger.experiment``). Default: the active
            ``wandb.run``, looked up at the first analysis.
        step_metric: the x-axis key logged with every row. Default ``None``: the callback sets
            the framework's (``trainer/global_step`` for Lightning, ``train/global_step`` for HF,
            ``global_step`` for Keras); used on its own, ``global_step``.
        project: project of a run this tracker opens itself (``open_run=True`` only).
        open_run: with no run passed and none active, open one (then finished in :meth:`close`).
            When False and there is no run, the tracker raises at the first analysis, which the
            controller reports once and disables.
        log_metrics: the per-layer metrics logged as charts, one section each
            (``ww_alpha/...``, ``ww_stable_rank/...``). Every metric is in ``ww/layers`` anyway.
        log_esd_images: log the ESD images ``ww/esd`` (needs eigenvalues, i.e. ``wants_evals``).
        max_images: at most this many ESD images per analysis (flagged layers first, then by
            alpha's distance from the 2-6 band).
        heatmap_steps: the alpha heatmap shows at most this many analysed steps (the latest);
            0 turns it off.
        alert_on_flagged: send ``run.alert`` (level WARN) when an analysis flags layers that the
            previous one did not.
        prefix: key prefix (``ww``).
        init_kwargs: more ``wandb.init`` arguments for a run this tracker opens (``dir``,
            ``name``, ``mode``...).

    Raises:
        ValueError: ``max_images`` outside 0..108 (``wandb.Image.MAX_ITEMS``), a negative
            ``heatmap_steps`` or an unknown metric in ``log_metrics``.

    Example:
        >>> tracker = WandbTracker(step_metric="train/global_step", log_metrics=["alpha", "D"])
        >>> tracker.log_metrics, tracker.wants_evals  # the run is looked up at the first analysis
        (('alpha', 'D'), True)
    """

    name = "wandb"

    def __init__(self, run: Any = None, *, step_metric: Optional[str] = None,
                 project: Optional[str] = None, open_run: bool = False,
                 log_metrics: Union[str, Sequence[str]] = ("alpha",), log_esd_images: bool = True,
                 max_images: int = 8, heatmap_steps: int = 200, alert_on_flagged: bool = False,
                 prefix: str = "ww", init_kwargs: Optional[Dict[str, Any]] = None) -> None:
        from ww_core import COLUMNS

        if not 0 <= int(max_images) <= 108:
            raise ValueError(f"max_images must be in 0..108 (wandb.Image.MAX_ITEMS), got {max_images}")
        if int(heatmap_steps) < 0:
            raise ValueError(f"heatmap_steps must be >= 0, got {heatmap_steps}")
        metrics = (log_metrics,) if isinstance(log_metrics, str) else tuple(log_metrics or ())
        unknown = [m for m in metrics if m not in COLUMNS or m in ("name", "type", "warning",
                                                                    "status", "flags", "precision")]
        if unknown:
            raise ValueError(f"log_metrics: unknown per-layer metric(s) {unknown}")
        self._run = run
        self.step_metric = step_metric
        self.project = project
        self.open_run = open_run
        self.log_metrics = tuple(dict.fromkeys(metrics))
        self.log_esd_images = log_esd_images
        self.max_images = int(max_images)
        self.heatmap_steps = int(heatmap_steps)
        self.alert_on_flagged = alert_on_flagged
        self.prefix = prefix
        self.init_kwargs = dict(init_kwargs or {})
        self.keys = LayerKeys()
        self._owns_run = False
        self._defined = False
        self._warned: set = set()
        self._alphas: Dict[str, Optional[float]] = {}
        #: Layers of the latest analysis fitted on too few eigenvalues (not judged).
        self._unjudged: frozenset = frozenset()
        self._flagged: frozenset = frozenset()
        self._decisions: Any = None
        # the heatmap's last ``heatmap_steps`` columns: (step, alpha per layer index, unjudged mask)
        self._heat: Deque[Tuple[int, np.ndarray, np.ndarray]] = deque(maxlen=max(self.heatmap_steps, 1))
        self._heat_total = 0
        self._heat_started = False
        #: The controller keeps eigenvalues in the result when a tracker sets this.
        self.wants_evals = bool(log_esd_images and max_images > 0)

    @property
    def x_axis(self) -> str:
        """:attr:`step_metric`, or ``global_step`` when neither the user nor an adapter set it."""
        return self.step_metric or DEFAULT_STEP_METRIC

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

    @property
    def run_id(self) -> Optional[str]:
        """The id of the run logged into, without opening one (``None`` while there is none);
        the controller names the run's folder after it."""
        run = self._run
        if run is None:
            import sys

            run = getattr(sys.modules.get("wandb"), "run", None)
        return getattr(run, "id", None)

    def _define_metrics(self, run: Any) -> None:
        if self._defined or not hasattr(run, "define_metric"):
            self._defined = True
            return
        # The x-axis itself (harmless if the trainer defined it already), then our sections.
        if self._owns_run:
            run.define_metric(self.x_axis)
        for section in (self.prefix, *(metric_section(m, self.prefix) for m in self.log_metrics)):
            run.define_metric(f"{section}/*", step_metric=self.x_axis)
        self._defined = True

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"WandbTracker: {message}", RuntimeWarning, stacklevel=3)

    # -- Tracker interface ----------------------------------------------------------------------
    def log_analysis(self, *, step: int, epoch: int, rows: List[Dict[str, Any]],
                     summary: Dict[str, float], result: Any, history: List[Dict[str, Any]]) -> None:
        """Log one analysis as one committed row (see the module docstring for the keys)."""
        import wandb

        run = self.run
        self._define_metrics(run)
        if not self._heat_started:
            # once per process (a resumed run: number the layers as the history's analyses did)
            self._start_heat(history if history is not None and len(history) else rows)
        else:
            self.keys.update(str(r.get("name")) for r in rows)
            self._remember(int(step), rows)
        data: Dict[str, Any] = {self.x_axis: int(step)}
        data.update(scalars(rows, summary, self.keys, self.log_metrics, self.prefix))
        self._alphas = {str(r.get("name")): finite_float(r.get("alpha")) for r in rows}
        self._unjudged = frozenset(str(r.get("name")) for r in rows if is_unjudged(r.get("flags")))
        if rows:
            data.update(self._layer_tables(wandb, rows))
        if self.heatmap_steps and rows:
            image = self._heatmap(wandb, int(step))
            if image is not None:
                data[f"{self.prefix}/alpha_heatmap"] = image
        if self.log_esd_images and self.max_images > 0 and result is not None:
            images = self._esd_images(wandb, result)
            if images:
                data[f"{self.prefix}/esd"] = images
        # One committed row, no step=: the trainer's own x-axis key carries the step.
        run.log(data)
        if self.alert_on_flagged:
            self._alert(wandb, run, int(step), rows)

    def log_event(self, *, step: int, kind: str, payload: Dict[str, Any]) -> None:
        """Append the event's decisions (``base.decision_rows``) to ``ww/decisions``.

        With wandb's ``INCREMENTAL`` tables (wandb 0.31 has them) one table grows and each log
        uploads only the new rows; with an older wandb each event logs a table of its own rows.
        """
        import wandb

        new = decision_rows(step, kind, payload, self._alphas)
        if not new:
            return
        run = self.run
        self._define_metrics(run)
        columns = list(DECISION_COLUMNS)
        limit = self._max_rows(wandb)
        key = f"{self.prefix}/decisions"
        for start in range(0, len(new), limit):  # an increment is capped at the row limit too
            chunk = [[plain_value(r.get(c)) for c in columns] for r in new[start:start + limit]]
            table = self._decisions_table(wandb, columns)
            if table is None:
                table = wandb.Table(columns=columns, data=chunk, allow_mixed_types=True)
            else:
                for values in chunk:
                    table.add_data(*values)
                # wandb 0.31: an incremental table's increment count is only the private
                # _increment_num (no public accessor); absent, the warning is just not given
                if getattr(table, "_increment_num", 0) and table._increment_num >= 99:
                    self._warn_once("increments", f"{key} has more than 100 increments; the W&B "
                                    "workspace shows the latest 100 (every increment stays in "
                                    "the run's files)")
            run.log({self.x_axis: int(step), key: table})

    def close(self) -> None:
        """Finish the run if this tracker opened it; a trainer's run is left alone."""
        if self._owns_run and self._run is not None:
            self._run.finish()
            self._run = None
            self._owns_run = False

    # -- tables ---------------------------------------------------------------------------------
    @staticmethod
    def _max_rows(wandb: Any) -> int:
        return max(1, int(getattr(getattr(wandb, "Table", None), "MAX_ROWS", DEFAULT_MAX_ROWS)))

    def _decisions_table(self, wandb: Any, columns: List[str]) -> Any:
        """The one INCREMENTAL decisions table, or None when this wandb has no such mode."""
        if self._decisions is None and "incremental" not in self._warned:
            try:
                self._decisions = wandb.Table(columns=columns, log_mode="INCREMENTAL",
                                              allow_mixed_types=True)
            except (TypeError, AssertionError, ValueError):
                self._warned.add("incremental")  # old wandb: one table per event
        return self._decisions

    def _layer_tables(self, wandb: Any, rows: List[Dict[str, Any]]) -> Dict[str, Any]:
        """``ww/layers`` (split into ``ww/layers_part2``... above wandb's row limit)."""
        columns = list(dict.fromkeys(["layer_key", "name", *(c for r in rows for c in r)]))
        data = [[self.keys[str(r.get("name"))], str(r.get("name"))]
                + [plain_value(r.get(c)) for c in columns[2:]] for r in rows]
        limit = self._max_rows(wandb)
        key = f"{self.prefix}/layers"
        if len(data) > limit:
            parts = math.ceil(len(data) / limit)
            self._warn_once("rows", f"{len(data)} layers exceed W&B's {limit} rows per table "
                            f"(wandb.Table.MAX_ROWS): the layer table is split into {parts} "
                            f"tables, {key}, {key}_part2, ... (no layer is dropped)")
        out = {}
        for i, start in enumerate(range(0, len(data), limit)):
            out[key if i == 0 else f"{key}_part{i + 1}"] = wandb.Table(
                columns=columns, data=data[start:start + limit], allow_mixed_types=True)
        return out

    # -- images ---------------------------------------------------------------------------------
    def _figure(self, size: tuple, **margins: float) -> Any:
        """A bare Figure (not registered with pyplot: no global state, safe off the main thread),
        or None with one warning when matplotlib is unavailable. Fixed margins: a layout engine
        costs more than the drawing."""
        try:
            from matplotlib.figure import Figure
        except Exception as exc:
            self._warn_once("matplotlib", f"images disabled ({exc!r})")
            return None
        fig = Figure(figsize=size, dpi=80)
        fig.subplots_adjust(**margins)
        return fig

    @staticmethod
    def _image(wandb: Any, fig: Any, caption: str) -> Any:
        """``fig`` as a 256-colour PNG ``wandb.Image`` (a third of wandb's RGBA file)."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from PIL import Image

            canvas = FigureCanvasAgg(fig)
            canvas.draw()
            pixels = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).quantize(256)
            return wandb.Image(pixels, caption=caption)
        except ImportError:
            # wandb.Image's figure check reads the attribute ``matplotlib.pyplot``, which exists
            # only once pyplot is imported; importing it does not select a GUI backend.
            import matplotlib.pyplot  # noqa: F401

            return wandb.Image(fig, caption=caption)

    def _start_heat(self, history: Iterable[Dict[str, Any]]) -> None:
        """Fill the heatmap buffer (and the layer keys) from the rows so far, streamed once."""
        self._heat_started = True
        for s, group in itertools.groupby(history, key=lambda r: int(r["step"])):
            rows = list(group)
            self.keys.update(str(r.get("name")) for r in rows)
            self._remember(s, rows)

    def _remember(self, step: int, rows: Sequence[Dict[str, Any]]) -> None:
        """One heatmap column: alpha by layer index (nan: not analysed or no fit)."""
        if not self.heatmap_steps:
            return
        column = np.full(len(self.keys), np.nan, dtype=np.float32)
        few = np.zeros(len(self.keys), dtype=bool)
        index = {name: i for i, (name, _) in enumerate(self.keys.items())} if rows else {}
        for r in rows:
            i = index[str(r.get("name"))]
            a = finite_float(r.get("alpha"))
            column[i] = np.nan if a is None else a
            few[i] = is_unjudged(r.get("flags"))
        if self._heat and self._heat[-1][0] == step:
            self._heat.pop()
        else:
            self._heat_total += 1
        self._heat.append((int(step), column, few))

    def _heatmap_grid(self, step: int, history: Optional[Iterable[Dict[str, Any]]] = None) -> tuple:
        """``(steps, names, alpha grid, too-few-evals mask, truncated)`` of the heatmap: the
        buffer's columns (filled from ``history`` first if this tracker has none yet)."""
        if not self._heat_started and history is not None:
            self._start_heat(history)
        names = [name for name, _ in self.keys.items()]
        cols = list(self._heat)
        grid = np.full((len(names), len(cols)), np.nan)
        few = np.zeros((len(names), len(cols)), dtype=bool)
        for j, (_, column, mask) in enumerate(cols):
            grid[:len(column), j] = column
            few[:len(mask), j] = mask
        return [c[0] for c in cols], names, grid, few, self._heat_total > len(cols)

    def _heatmap(self, wandb: Any, step: int, history: Optional[Iterable[Dict[str, Any]]] = None) -> Any:
        """alpha, layers (model order) x the latest ``heatmap_steps`` analysed steps; a fit on too
        few eigenvalues (flag ``too-few-evals`` only) is drawn in purple, not on the alpha scale."""
        steps, names, grid, few, truncated = self._heatmap_grid(step, history)
        height = min(2.5 + 0.13 * len(names), 14.0)
        fig = self._figure((10.0, height), left=0.3, right=0.9, bottom=1.0 / height,
                           top=1 - 0.6 / height)
        if fig is None:
            return None
        try:
            import matplotlib

            ax = fig.add_subplot(1, 1, 1)
            cmap = matplotlib.colormaps["coolwarm"].resampled(24).with_extremes(bad="#d9d9d9")
            im = ax.imshow(np.ma.masked_invalid(np.where(few, np.nan, grid)), aspect="auto",
                           interpolation="nearest", cmap=cmap, vmin=1.0, vmax=7.0)
            if few.any():
                ax.imshow(np.ma.masked_where(~few, np.ones(few.shape)), aspect="auto",
                          interpolation="nearest", vmin=0.0, vmax=1.0,
                          cmap=matplotlib.colors.ListedColormap([UNJUDGED_COLOUR]))
            fig.colorbar(im, cax=fig.add_axes((0.92, 0.3, 0.015, 0.4)), label="alpha (2-6: typical)")
            every = max(1, math.ceil(len(names) / max(1, int((height - 1.5) * 80 / 9))))
            ticks = list(range(0, len(names), every))
            ax.set_yticks(ticks, [_label(i, names[i]) for i in ticks], fontsize=6)
            xt = sorted({round(i * (len(steps) - 1) / 9) for i in range(10)}) if len(steps) > 10 \
                else list(range(len(steps)))
            ax.set_xticks(xt, [str(steps[i]) for i in xt], fontsize=7)
            ax.set_xlabel(self.x_axis)
            scope = f"last {len(steps)} analysed steps" if truncated else f"{len(steps)} analysed steps"
            title = f"alpha per layer ({len(names)} layers, {scope})"
            if few.any():
                title += "; purple: too few eigenvalues"
            ax.set_title(title, fontsize=9, y=1.0)  # a fixed y skips a costly title layout
            return self._image(wandb, fig, title)
        except Exception as exc:
            self._warn_once("heatmap", f"alpha heatmap failed ({exc!r})")
            return None
        finally:
            fig.clear()  # wandb.Image has rendered its own copy; free the artists now

    def _esd_images(self, wandb: Any, result: Any) -> List[Any]:
        try:
            from ww_core.plots import plot_esd
        except Exception as exc:  # module missing or matplotlib unavailable
            self._warn_once("matplotlib", f"ESD images disabled ({exc!r})")
            return []
        layers = [lay for lay in getattr(result, "layers", ()) if lay.evals is not None]
        layers.sort(key=_badness)  # stable: model order among equals
        images = []
        for layer in layers[: self.max_images]:
            fig = self._figure((5.0, 3.5), left=0.14, right=0.97, bottom=0.14, top=0.88)
            if fig is None:
                return images
            try:
                ax = plot_esd(layer, ax=fig.add_subplot(1, 1, 1), evals=layer.evals)
                ax.minorticks_off()  # log-log minor ticks cost more than the histogram
                ax.set_title(ax.get_title(), fontsize=9, y=1.0)
                flags = f" flags={','.join(layer.flags)}" if layer.flags else ""
                caption = f"{self.keys[layer.name]} {layer.name}: alpha={layer.alpha:.3g}{flags}"
                images.append(self._image(wandb, fig, caption))
            except Exception as exc:
                self._warn_once("esd", f"ESD plot of {layer.name} failed ({exc!r})")
            finally:
                fig.clear()
        return images

    # -- alerts ---------------------------------------------------------------------------------
    def _alert(self, wandb: Any, run: Any, step: int, rows: List[Dict[str, Any]]) -> None:
        # a layer flagged only too-few-evals could not be judged: no alert
        flagged = {str(r.get("name")): r for r in rows if is_flagged(r.get("flags"))}
        new = [n for n in flagged if n not in self._flagged]
        self._flagged = frozenset(flagged)
        if not new or "alert" in self._warned:
            return
        text = "\n".join(f"{n}: alpha={_fmt(flagged[n].get('alpha'))} "
                         f"flags={plain_value(flagged[n].get('flags'))}" for n in new[:50])
        if len(new) > 50:
            text += f"\n... and {len(new) - 50} more"
        try:
            level = getattr(getattr(wandb, "AlertLevel", None), "WARN", "WARN")
            run.alert(title=f"ww: {len(new)} layer(s) newly flagged at step {step}"[:63],
                      text=text, level=level)
        except Exception as exc:
            self._warn_once("alert", f"run.alert failed, alerts disabled ({exc!r})")


def _badness(layer: Any) -> tuple:
    """Sort key, worst first: flagged (not just too-few-evals), then alpha's distance from
    [2, 6], then from 4."""
    alpha = finite_float(getattr(layer, "alpha", None))
    calm = not is_flagged(layer.flags)
    if alpha is None:
        return (calm, -math.inf, -math.inf)
    return (calm, -max(2.0 - alpha, alpha - 6.0, 0.0), -abs(alpha - 4.0))


def _label(index: int, name: str, width: int = 44) -> str:
    return f"{index} {name if len(name) <= width else '...' + name[-(width - 3):]}"


def _fmt(value: Any) -> str:
    value = finite_float(value)
    return "nan" if value is None else f"{value:.3g}"
