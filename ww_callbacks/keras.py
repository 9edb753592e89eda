"""WeightWatcher callback for Keras 3.

Translates ``keras.callbacks.Callback`` hooks into
:class:`~ww_callbacks.controller.WeightWatcherController` calls. Keras has no logger objects to
share, so ``trackers="auto"`` uses an active ``wandb.run`` and an active MLflow run when there
are any (``wandb.integration.keras`` imports TensorFlow and is not used).

Set ``KERAS_BACKEND`` (``torch``, ``jax`` or ``tensorflow``; all three are tested) before the first
``import keras``. On JAX and TensorFlow the fit starts with
:func:`~ww_callbacks.keras_utils.prepare_fit` (engine warmed up, the analysis' thread pools
limited on the CPU), a freeze or an LR-factor change rebuilds the traced train function, and on
JAX a frozen layer keeps ``trainable = True`` with its updates masked (see
:mod:`ww_callbacks.keras_utils`).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

try:
    import keras
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ww_callbacks.keras needs Keras 3: pip install 'ww-callbacks[keras]' "
                      "(and set KERAS_BACKEND before importing keras)") from exc

from ww_callbacks.adapter import CallbackBase, override
from ww_callbacks.controller import WeightWatcherController
from ww_callbacks.distributed import rank_info

__all__ = ["WeightWatcherCallback"]

#: x-axis key logged with every W&B row of this callback.
KERAS_STEP_METRIC = "global_step"


def _console(line: str) -> None:
    """The per-analysis line where Keras prints its own progress (the logger when it does not)."""
    if keras.utils.is_interactive_logging_enabled():
        print(line, flush=True)
    else:
        logging.getLogger("ww_callbacks").info(line)


class WeightWatcherCallback(CallbackBase, keras.callbacks.Callback):
    r"""Analyse the layer weights' spectra (alpha etc.) during ``model.fit`` with ``ww_core``.

    Args:
        controller: an existing controller to drive (then give no other keyword).
        **kwargs: :class:`~ww_callbacks.controller.WeightWatcherController` keywords:
            ``start_fraction`` (of ``params["epochs"] * params["steps"]``, else of the epochs),
            ``every_n_epochs``, ``every_n_steps`` (batches), ``layers`` (Keras variable paths
            without ``/kernel``, e.g. ``sequential/dense_1``), ``output_dir`` (default: a folder
            per run in ``ww-output``; also holds the resume state ``ww_state.json``), ``trackers``
            (``"auto"``: an active ``wandb.run`` plotted against ``global_step``, an active
            MLflow run, and the local record), ``log_fn``, ``strict``, ``freeze`` (``"apply"``
            sets ``layer.trainable = False`` mid-fit; on JAX it masks the layer's updates),
            ``balance_lr`` (``"apply"`` scales each variable's update through
            :class:`~ww_callbacks.keras_utils.LayerLRScaler`), ``early_stop`` (``"apply"`` sets
            ``model.stop_training``), each a mode or a settings object
            (:mod:`ww_callbacks.settings`), ``actions``, ``analyze_fn`` and ``ww_core.analyze``
            options. ``inspect.signature`` of this class lists them with their defaults.

    Raises:
        ValueError: an invalid keyword.

    Logs: at each epoch end the callback writes the summary scalars of the latest *finished*
    analysis into ``logs`` as ``ww/<key>`` (``ww/alpha_mean``, ...), with ``ww/analysis_step``,
    the step of that analysis, for the callbacks listed after it (``History``, ``CSVLogger``,
    ``EarlyStopping``...): with ``async_analysis=False`` the analysis of this epoch end, with a
    background analysis usually the previous epoch's (``ww/analysis_step`` says which). Before
    the first finished analysis the keys are absent (no placeholder), so
    ``EarlyStopping(monitor="ww/...")`` needs no extra argument: it waits, with Keras' usual
    warning, and takes the first analysis as its first value. ``CSVLogger`` fixes its columns at
    the end of the first epoch: its file has ``ww/`` columns only when that epoch end is analysed
    synchronously (``start_fraction=0, async_analysis=False``); otherwise the callback's own
    ``history.csv`` in ``output_dir`` holds every analysis (one row per layer, with its step).

    Steps: the global step of batch ``b`` in epoch ``e`` is ``e * steps_per_epoch + b + 1`` (a
    running count when ``steps`` is unknown), so ``fit(initial_epoch=...)`` continues the count.

    Resume: build the callback with the same ``output_dir`` and call ``fit(..., initial_epoch=k)``
    (or let ``BackupAndRestore`` set it): the callback passes the step ``k * steps_per_epoch``
    to the controller, which reloads its state from the run folder's ``ww_state.json``, drops
    rows after that step and redoes an analysis due there that a crash lost, so the history
    continues without gaps or duplicates. ``initial_epoch=0`` starts a fresh record. When
    ``steps_per_epoch`` is unknown (a generator without a length), the step of a resume is only
    known to the callback that counted it: resume with the same callback object.

    Example::

        >>> import tempfile
        >>> import keras, numpy as np
        >>> from ww_callbacks.keras import WeightWatcherCallback
        >>> model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, name="hidden"),
        ...                           keras.layers.Dense(1, name="out")])
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> x, y = np.random.default_rng(0).normal(size=(2, 128, 64)).astype("float32")[0], np.zeros(128)
        >>> ww = WeightWatcherCallback(every_n_epochs=1, output_dir=tempfile.mkdtemp())
        >>> _ = model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[ww])  # doctest: +ELLIPSIS
        ww step 4 epoch 0: mean alpha ...
        ww step 8 epoch 1: mean alpha ...
        >>> sorted({row["step"] for row in ww.history.rows})
        [4, 8]
    """

    def __init__(self, controller: Optional[WeightWatcherController] = None, **kwargs: Any) -> None:
        super().__init__()
        self._setup_controller(controller, kwargs, log_fn=_console)
        self.lr_scaler: Any = None
        self.global_step = 0
        self.epoch = 0
        self._steps_per_epoch: Optional[int] = None
        self._needs_configure = False
        self._is_zero = True
        self._end_fit: Any = lambda: None

    #: Where the per-run folders go when no ``output_dir`` is named.
    BASE_DIR = "ww-output"

    # ------------------------------------------------------------------ apply functions
    def _freeze(self, freeze: List[str], unfreeze: List[str]) -> None:
        from ww_callbacks.keras_utils import freeze_layers, unfreeze_layers

        freeze_layers(self.model, freeze)
        unfreeze_layers(self.model, unfreeze)

    def _set_lr_factors(self, factors: Dict[str, float]) -> None:
        from ww_callbacks.keras_utils import LayerLRScaler

        scaler = self.lr_scaler
        if scaler is None or scaler.model is not self.model or scaler.optimizer is not self.model.optimizer:
            if scaler is not None:
                scaler.uninstall()
            self.lr_scaler = LayerLRScaler(self.model).install()
        self.lr_scaler.set_factors(factors)

    def _stop(self, reason: str) -> None:
        self.model.stop_training = True

    # ------------------------------------------------------------------ tracker discovery
    def _trackers(self) -> List[Any]:
        from ww_callbacks.trackers.resolve import active_mlflow_tracker, active_wandb_tracker, requested_names

        spec = self.controller.tracker_spec
        named, guard = requested_names(spec), self.controller.guard
        found = []
        if spec == "auto" or "wandb" in named:
            found.append(guard("attaching to wandb", active_wandb_tracker, KERAS_STEP_METRIC,
                               required="wandb" in named))
        if spec == "auto" or "mlflow" in named:
            found.append(guard("attaching to mlflow", active_mlflow_tracker))
        # named trackers with no live run are created by the controller under output_dir
        return [t for t in found if t is not None]

    def _configure(self, epoch: int) -> None:
        self._needs_configure = False
        # trainable flags are not in .weights.h5: re-freeze what a restored state froze
        self.controller.start_actions()
        spe, epochs = self._steps_per_epoch, (self.params or {}).get("epochs")
        start = epoch * spe if spe is not None else (self.global_step if epoch > 0 else 0)
        self.global_step = start
        self.controller.configure(total_steps=spe * int(epochs) if spe and epochs else None,
                                  total_epochs=epochs, trackers=self._trackers() if self._is_zero else [],
                                  is_global_zero=self._is_zero, current_step=start,
                                  base_dir=self.BASE_DIR, step_metric=KERAS_STEP_METRIC, model=self.model)
        if self.controller.action_set.lr_mode == "apply":
            self._set_lr_factors(self.controller.lr_factors)

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        from ww_callbacks.keras_utils import prepare_fit

        self._is_zero, spec = rank_info()[0], self.controller.tracker_spec
        # (matplotlib is warmed up too when the local tracker draws its plot)
        self._end_fit = prepare_fit(plots=spec is not None and (self.controller.local_record
                                                                or "local" in spec))
        steps = (self.params or {}).get("steps")
        self._steps_per_epoch = int(steps) if steps else None
        self._needs_configure = True  # at the first epoch, when initial_epoch is known

    @override
    def on_epoch_begin(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if self._needs_configure:
            self._configure(epoch)
        self.epoch = epoch

    @override
    def on_train_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if self._steps_per_epoch is not None:
            self.global_step = self.epoch * self._steps_per_epoch + int(batch) + 1
        else:
            self.global_step += 1
        ctl = self.controller
        # `self.model` syncs the JAX state into the variables: only when an analysis reads them
        if ctl.schedule.mode == "steps" and ctl.should_run(step=self.global_step, epoch=self.epoch):
            ctl.maybe_run(self.model, step=self.global_step, epoch=self.epoch)
        else:
            ctl.poll()

    @override
    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self.epoch = epoch
        self.controller.maybe_run(self.model, step=self.global_step, epoch=epoch, epoch_end=True)
        if logs is not None:   # History, CSVLogger, EarlyStopping, WandbMetricsLogger listed after us
            # absent before the first finished analysis: a nan would be the monitors' best value
            logs.update({f"ww/{k}": v for k, v in self.controller.published_scalars().items()})

    @override
    def on_train_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        try:
            if self._needs_configure:  # fit ran no epoch (initial_epoch >= epochs)
                self.controller.close()
                return
            self.controller.finish(self.model, step=self.global_step, epoch=self.epoch)
        finally:
            self._end_fit()
