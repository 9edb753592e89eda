"""WeightWatcher callback for Keras 3 (tested on the torch backend).

Translates ``keras.callbacks.Callback`` hooks into
:class:`~ww_callbacks.controller.WeightWatcherController` calls. Keras has no logger objects of its
own that we could share, so ``trackers="auto"`` uses an active ``wandb.run`` and an active MLflow
run when there are any (``wandb.integration.keras`` imports TensorFlow and is not used).

Set ``KERAS_BACKEND`` (e.g. ``torch``) before the first ``import keras``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Union

try:
    import keras
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ww_callbacks.keras needs Keras 3: pip install 'ww_callbacks[keras]' "
                      "(and set KERAS_BACKEND before importing keras)") from exc

from ww_callbacks.actions.build import ActionSet
from ww_callbacks.controller import WeightWatcherController

__all__ = ["WeightWatcherCallback"]

log = logging.getLogger("ww_callbacks")

#: x-axis key logged with every W&B row of this callback.
KERAS_STEP_METRIC = "global_step"


def _is_global_zero() -> bool:
    """Rank 0 unless a torch process group says otherwise (Keras on torch under DDP)."""
    try:
        import sys

        if "torch" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                return dist.get_rank() == 0
    except Exception:  # pragma: no cover - defensive
        pass
    return int(os.environ.get("RANK", "0") or 0) == 0


def _world_size() -> int:
    """Processes in the torch process group (Keras on torch under DDP), else 1."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    return 1


class WeightWatcherCallback(keras.callbacks.Callback):
    r"""Analyse the layer weights' spectra (alpha etc.) during ``model.fit`` with ``ww_core``.

    Args:
        start_fraction: share of the planned steps (``params["epochs"] * params["steps"]``)
            after which analyses start (default 0.5); when the steps per epoch are unknown, the
            share of the epochs.
        every_n_epochs: analyse at the end of every n-th epoch (default 1).
        every_n_steps: analyse every n batches instead.
        layers: regex or list of regexes selecting layers by name (Keras variable paths without
            ``/kernel``, e.g. ``sequential/dense_1``; see ``ww_core.analyze``).
        output_dir: folder of the local record and of the resume state ``ww_state.json``
            (default ``ww-output``).
        trackers: ``"auto"`` (an active ``wandb.run`` — keys ``ww/...`` plotted against
            ``global_step`` — and an active MLflow run, plus the local record), ``None``, or a list
            of names / ``Tracker`` instances (``"tensorboard"`` writes to
            ``<output_dir>/tensorboard``).
        strict: raise errors from the analysis or trackers instead of reporting them once.
        freeze: ``"off"`` (default), ``"suggest"`` (record and log the layers that could be frozen)
            or ``"apply"`` (``layer.trainable = False`` mid-fit; effective at the next step on the
            torch backend; re-applied on resume).
        freeze_options: :class:`~ww_callbacks.actions.FreezePolicy` options (``band``/``preset``,
            ``tol``, ``window``, ``max_share``, ``protect``, ``unfreeze``, ...).
        balance_lr: ``False`` (default), ``"suggest"`` (log TempBalance factors) or ``True``:
            per-layer LRs through :class:`~ww_callbacks.keras_utils.LayerLRScaler` (each
            variable's update is scaled, i.e. ``factor × the optimizer's LR or schedule``).
        lr_options: :class:`~ww_callbacks.actions.LRBalancePolicy` options (``s1``, ``s2``, ...).
        early_stop: ``True`` sets ``model.stop_training`` when the mean alpha stops improving
            for ``patience`` analyses or falls below ``lower_bound``.
        early_stop_options: :class:`~ww_callbacks.actions.EarlyStopPolicy` options.
        actions: further objects with ``on_analysis(controller, result, step, epoch)``.
        log_fn: where the per-analysis line goes (default: the ``ww_callbacks`` logger).
        analyze_fn: replaces ``ww_core.analyze`` (testing).
        **analyze_options: passed to ``ww_core.analyze``.

    Steps: the global step of batch ``b`` in epoch ``e`` is ``e * steps_per_epoch + b + 1`` (a
    running count when ``steps`` is unknown), so ``fit(initial_epoch=...)`` continues the count.

    Resume: construct the callback with the same ``output_dir`` and call ``fit(...,
    initial_epoch=k)``: the history is reloaded from ``ww_state.json`` and rows after step
    ``k * steps_per_epoch`` (from a run that went further than the restarted one) are dropped, so
    the history continues without gaps or duplicates. ``initial_epoch=0`` starts a fresh record.

    Example::

        >>> import os; os.environ.setdefault("KERAS_BACKEND", "torch")   # doctest: +SKIP
        >>> from ww_callbacks.keras import WeightWatcherCallback          # doctest: +SKIP
        >>> model.fit(x, y, epochs=10, callbacks=[WeightWatcherCallback()])  # doctest: +SKIP
    """

    STATE_FILE = "ww_state.json"

    def __init__(self, start_fraction: float = 0.5, every_n_epochs: Optional[int] = None,
                 every_n_steps: Optional[int] = None, layers: Union[None, str, Sequence[str]] = None,
                 output_dir: Optional[str] = "ww-output", trackers: Any = "auto",
                 strict: bool = False, actions: Optional[Sequence[Any]] = None, log_fn: Any = None,
                 analyze_fn: Any = None, freeze: Any = "off",
                 freeze_options: Optional[Dict[str, Any]] = None, balance_lr: Any = False,
                 lr_options: Optional[Dict[str, Any]] = None, early_stop: bool = False,
                 early_stop_options: Optional[Dict[str, Any]] = None,
                 **analyze_options: Any) -> None:
        super().__init__()
        self.action_set = ActionSet(freeze, freeze_options, balance_lr, lr_options, early_stop,
                                    early_stop_options)
        self.action_set.bind(freeze_fn=self._freeze, lr_fn=self._set_lr_factors,
                             stop_fn=self._stop, sync_fn=_broadcast)
        self.lr_scaler: Any = None
        self.controller = WeightWatcherController(
            start_fraction=start_fraction, every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps, layers=layers, output_dir=output_dir, trackers=trackers,
            log_fn=log_fn, strict=strict, actions=self.action_set.actions() + list(actions or ()),
            analyze_fn=analyze_fn, **analyze_options)
        self.output_dir = output_dir
        self.global_step = 0
        self.epoch = 0
        self._steps_per_epoch: Optional[int] = None
        self._state_loaded = False
        self._saved_step: Optional[int] = None
        self._needs_configure = False
        self._is_zero = True

    # ------------------------------------------------------------------ public
    @property
    def history(self):
        """:class:`ww_callbacks.history.History` of this run."""
        return self.controller.history

    @property
    def state_path(self) -> Optional[str]:
        return os.path.join(self.output_dir, self.STATE_FILE) if self.output_dir else None

    @property
    def frozen_layers(self) -> List[str]:
        """Layers frozen (``freeze="apply"``) or suggested (``"suggest"``) so far."""
        return list(self.action_set.freeze_policy.frozen)

    @property
    def lr_factors(self) -> Dict[str, float]:
        """The latest TempBalance factors (``balance_lr`` on)."""
        return dict(self.action_set.lr_policy.factors)

    def state_dict(self) -> Dict[str, Any]:
        state = {"controller": self.controller.state_dict(), "global_step": self.global_step,
                 "epoch": self.epoch}
        if self.action_set.enabled:
            state["actions"] = self.action_set.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.controller.load_state_dict(state.get("controller", {}))
        self.action_set.load_state_dict(state.get("actions"))
        self._saved_step = state.get("global_step")

    # ------------------------------------------------------------------ actions
    def _freeze(self, freeze: List[str], unfreeze: List[str]) -> None:
        from ww_callbacks.keras_utils import freeze_layers, unfreeze_layers

        if freeze:
            freeze_layers(self.model, freeze)
        if unfreeze:
            unfreeze_layers(self.model, unfreeze)

    def _set_lr_factors(self, factors: Dict[str, float]) -> None:
        if self.lr_scaler is None:
            from ww_callbacks.keras_utils import LayerLRScaler

            self.lr_scaler = LayerLRScaler(self.model).install()
        self.lr_scaler.set_factors(factors)

    def _stop(self, reason: str) -> None:
        self.model.stop_training = True

    def _start_actions(self) -> None:
        """At fit start: install the LR scaler and re-apply a restored state (resume)."""
        if self.action_set.lr_mode == "apply":
            from ww_callbacks.keras_utils import LayerLRScaler

            if self.lr_scaler is None or self.lr_scaler.model is not self.model \
                    or self.lr_scaler.optimizer is not self.model.optimizer:
                if self.lr_scaler is not None:
                    self.lr_scaler.uninstall()
                self.lr_scaler = LayerLRScaler(self.model).install()
            self.lr_scaler.set_factors(self.action_set.lr_policy.factors)
        # trainable flags are not in .weights.h5: re-freeze what the restored state froze
        # (a stale layer name must not stop the user's fit: reported once instead)
        self.controller._guard("re-applying frozen layers", self.action_set.reapply)

    # ------------------------------------------------------------------ state file
    def _load_state_file(self) -> None:
        self._state_loaded = True
        path = self.state_path
        if path is None or not os.path.exists(path) or len(self.controller.history):
            return
        try:
            with open(path, encoding="utf-8") as fh:
                self.load_state_dict(json.load(fh))
        except Exception as exc:
            if self.controller.strict:
                raise
            self.controller._report("state file", f"could not read {path}", exc)

    def _save_state_file(self) -> None:
        path = self.state_path
        if path is None or not self._is_zero:
            return
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.state_dict(), fh, allow_nan=False)
            os.replace(tmp, path)
        except Exception as exc:
            if self.controller.strict:
                raise
            self.controller._report("state file", f"could not write {path}", exc)

    # ------------------------------------------------------------------ trackers
    def _trackers(self) -> List[Any]:
        spec = self.controller.tracker_spec
        named = set() if spec == "auto" else {t for t in (spec or ()) if isinstance(t, str)}
        out: List[Any] = []
        if spec == "auto" or "wandb" in named:
            try:
                import wandb

                from ww_callbacks.trackers.wandb import WandbTracker

                if wandb.run is not None or "wandb" in named:
                    out.append(WandbTracker(run=wandb.run, step_metric=KERAS_STEP_METRIC))
            except ImportError:
                pass
        if spec == "auto" or "mlflow" in named:
            try:
                import mlflow
                from mlflow import MlflowClient

                from ww_callbacks.trackers.mlflow import MLflowTracker

                active = mlflow.active_run()
                if active is not None:
                    out.append(MLflowTracker(MlflowClient(), active.info.run_id))
            except ImportError:
                pass
        # named trackers with no live run (mlflow, tensorboard) are created by the controller,
        # with their files under output_dir
        return out

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        self._is_zero = _is_global_zero()
        steps = (self.params or {}).get("steps")
        self._steps_per_epoch = int(steps) if steps else None
        self._needs_configure = True  # at the first epoch, when initial_epoch is known

    def _configure(self, epoch: int) -> None:
        self._needs_configure = False
        # Only a resumed fit (initial_epoch > 0) takes over the saved state and its actions;
        # initial_epoch=0 is a fresh run, whatever an earlier run left in output_dir.
        if epoch > 0 and not self._state_loaded:
            self._load_state_file()
        if self.action_set.enabled:
            self._start_actions()
        epochs = (self.params or {}).get("epochs")
        spe = self._steps_per_epoch
        if spe is not None:
            start = epoch * spe
        elif epoch > 0:
            start = int(self._saved_step if self._saved_step is not None else self.global_step)
        else:
            start = 0
        self.global_step = start
        total = spe * int(epochs) if spe and epochs else None
        self.controller.configure(total_steps=total, total_epochs=epochs,
                                  trackers=self._trackers() if self._is_zero else [],
                                  is_global_zero=self._is_zero, current_step=start,
                                  world_size=_world_size())

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if self._needs_configure:
            self._configure(epoch)
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if self._steps_per_epoch is not None:
            self.global_step = self.epoch * self._steps_per_epoch + int(batch) + 1
        else:
            self.global_step += 1
        self.controller.poll()          # record a finished background analysis
        if self.controller.schedule.mode == "steps" and self.controller.should_run(
                step=self.global_step, epoch=self.epoch, epoch_end=False):
            self.controller.run(self.model, step=self.global_step, epoch=self.epoch)

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self.epoch = epoch
        if self.controller.schedule.mode == "epochs" and self.controller.should_run(
                step=self.global_step, epoch=epoch, epoch_end=True):
            self.controller.run(self.model, step=self.global_step, epoch=epoch)
        self._save_state_file()

    def on_train_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        if self._needs_configure:  # fit ran no epoch (initial_epoch >= epochs)
            self.controller.close()
            return
        self.controller.finish(self.model, step=self.global_step, epoch=self.epoch)
        self._save_state_file()


def _broadcast(obj: Any) -> Any:
    """rank 0's ``obj`` on every rank under a torch process group (Keras on torch), else ``obj``."""
    import sys

    if "torch" not in sys.modules:
        return obj
    from ww_callbacks.torch_utils import broadcast_object

    return broadcast_object(obj)
