"""WeightWatcher callback for Lightning (``lightning.pytorch`` and ``pytorch_lightning``).

Translates Trainer hooks into :class:`~ww_callbacks.controller.WeightWatcherController` calls and
maps the Trainer's loggers (W&B, MLflow, TensorBoard) to trackers.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_info
except ImportError:  # pragma: no cover - depends on which package is installed
    try:
        import pytorch_lightning as pl
        from pytorch_lightning.utilities import rank_zero_info
    except ImportError as exc:
        raise ImportError("ww_callbacks.lightning needs Lightning: pip install 'ww_callbacks[lightning]'") from exc

from ww_callbacks.actions.build import ActionSet
from ww_callbacks.controller import WeightWatcherController

__all__ = ["WeightWatcherCallback", "layer_param_groups"]

log = logging.getLogger("ww_callbacks")

#: Lightning logger class -> (tracker name, kwargs built from the logger).
_LOGGER_TRACKERS = {
    "WandbLogger": ("wandb", lambda lg: {"run": lg.experiment, "step_metric": "trainer/global_step"}),
    "MLFlowLogger": ("mlflow", lambda lg: {"client": lg.experiment, "run_id": lg.run_id}),
    "TensorBoardLogger": ("tensorboard", lambda lg: {"writer": lg.experiment}),
}


class WeightWatcherCallback(pl.Callback):
    r"""Analyse the layer weights' spectra (alpha etc.) during training with ``ww_core``.

    Works in ``lightning.pytorch`` and ``pytorch_lightning`` Trainers. The history is written to
    ``output_dir`` as it goes (``history.jsonl``, ``history.csv``, ``alpha_over_time.png``,
    ``report.html``), kept in checkpoints (a resumed fit continues the same curves) and sent to the
    Trainer's W&B / MLflow / TensorBoard loggers. One line per analysis goes to the console.

    Args:
        start_fraction: share of the planned optimizer steps (``trainer.estimated_stepping_batches``,
            which accounts for ``max_steps``, ``max_epochs`` and gradient accumulation) after
            which analyses start. When that is unknown (an ``IterableDataset`` with ``max_steps=-1``)
            the share of ``max_epochs`` is used; when both are unknown analyses start at once
            (with a warning).
        every_n_epochs: analyse at the end of every n-th training epoch (default 1).
        every_n_steps: analyse every n optimizer steps instead (not with ``every_n_epochs``).
        layers: regex or list of regexes selecting layers by module name.
        output_dir: folder of the local record (default ``<trainer.default_root_dir>/ww-output``).
        trackers: ``"auto"`` (the Trainer's loggers plus the local record), ``None``, or a list of
            names / ``Tracker`` instances.
        strict: raise errors from the analysis or trackers instead of reporting them once.
        freeze: ``"off"`` (default), ``"suggest"`` (record and log the layers that could be frozen,
            change nothing) or ``"apply"`` (freeze them mid-training: ``requires_grad=False`` and
            ``grad=None``; re-applied on resume). See ``docs/actions.md``.
        freeze_options: :class:`~ww_callbacks.actions.FreezePolicy` options (``band``/``preset``,
            ``tol``, ``window``, ``max_share``, ``protect``, ``protect_head``, ``unfreeze``, ...).
        balance_lr: ``False`` (default), ``"suggest"`` (log TempBalance factors) or ``True``
            (apply them to the optimizers' *named* param groups, e.g. from
            :func:`layer_param_groups`; composes with any scheduler, LambdaLR included).
        lr_options: :class:`~ww_callbacks.actions.LRBalancePolicy` options (``s1``, ``s2``,
            ``metric``, ``min_evals``, ...).
        early_stop: ``True`` sets ``trainer.should_stop`` when the mean alpha stops improving for
            ``patience`` analyses or falls below ``lower_bound`` (default ``False``).
        early_stop_options: :class:`~ww_callbacks.actions.EarlyStopPolicy` options
            (``patience``, ``min_delta``, ``lower_bound``, ``metric``).
        actions: further objects with ``on_analysis(controller, result, step, epoch)``.
        log_fn: where the per-analysis line goes (default: ``rank_zero_info``).
        analyze_fn: replaces ``ww_core.analyze`` (testing).
        **analyze_options: passed to ``ww_core.analyze`` (``min_evals``, ``fix_fingers``, ...).

    Raises:
        ValueError: on invalid arguments.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from ww_callbacks.lightning import WeightWatcherCallback
        >>> ww = WeightWatcherCallback(start_fraction=0.5, every_n_epochs=1, output_dir="ww-output")
        >>> trainer = Trainer(callbacks=[ww])  # doctest: +SKIP

    After ``fit``, ``ww.history.rows`` holds one dict per layer per analysis.
    """

    def __init__(self, start_fraction: float = 0.5, every_n_epochs: Optional[int] = None,
                 every_n_steps: Optional[int] = None, layers: Union[None, str, Sequence[str]] = None,
                 output_dir: Optional[str] = None, trackers: Any = "auto", strict: bool = False,
                 actions: Optional[Sequence[Any]] = None, log_fn: Any = None, analyze_fn: Any = None,
                 freeze: Any = "off", freeze_options: Optional[Dict[str, Any]] = None,
                 balance_lr: Any = False, lr_options: Optional[Dict[str, Any]] = None,
                 early_stop: bool = False, early_stop_options: Optional[Dict[str, Any]] = None,
                 **analyze_options: Any) -> None:
        self._output_dir = output_dir
        self._trainer: Any = None
        self._module: Any = None
        self.action_set = ActionSet(freeze, freeze_options, balance_lr, lr_options, early_stop,
                                    early_stop_options)
        self.action_set.bind(freeze_fn=self._freeze, lr_fn=self._set_lr_factors,
                             stop_fn=self._stop, sync_fn=_broadcast)
        self.controller = WeightWatcherController(
            start_fraction=start_fraction, every_n_epochs=every_n_epochs, every_n_steps=every_n_steps,
            layers=layers, output_dir=output_dir, trackers=trackers, log_fn=log_fn or rank_zero_info,
            strict=strict, actions=self.action_set.actions() + list(actions or ()),
            analyze_fn=analyze_fn, **analyze_options)
        self._key = dict(start_fraction=start_fraction, every_n_epochs=every_n_epochs,
                         every_n_steps=every_n_steps, layers=layers)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._key)

    @property
    def history(self):
        """:class:`ww_callbacks.history.History` of this run."""
        return self.controller.history

    @staticmethod
    def param_groups(pl_module: Any, base_lr: Optional[float] = None, layers: Any = None,
                     **group_kwargs: Any) -> List[Dict[str, Any]]:
        """Per-layer named param groups for ``configure_optimizers`` (see :func:`layer_param_groups`)."""
        return layer_param_groups(pl_module, base_lr=base_lr, layers=layers, **group_kwargs)

    # ------------------------------------------------------------------ actions
    @property
    def frozen_layers(self) -> List[str]:
        """Layers frozen (``freeze="apply"``) or suggested (``"suggest"``) so far."""
        return list(self.action_set.freeze_policy.frozen)

    @property
    def lr_factors(self) -> Dict[str, float]:
        """The latest TempBalance factors (``balance_lr`` on)."""
        return dict(self.action_set.lr_policy.factors)

    def _freeze(self, freeze: List[str], unfreeze: List[str]) -> None:
        from ww_callbacks.torch_utils import freeze_layers, unfreeze_layers

        if freeze:
            freeze_layers(self._module, freeze, self._trainer.optimizers if self._trainer else ())
        if unfreeze:
            unfreeze_layers(self._module, unfreeze)

    def _set_lr_factors(self, factors: Dict[str, float]) -> None:
        from ww_callbacks.torch_utils import apply_lr_factors

        scheds = [c.scheduler for c in self._trainer.lr_scheduler_configs]
        for opt in self._trainer.optimizers:
            apply_lr_factors(opt, scheds, factors)

    def _stop(self, reason: str) -> None:
        if self._trainer is not None:
            self._trainer.should_stop = True

    def _check_actions(self, trainer: "pl.Trainer") -> None:
        """Fail early when an ``apply`` mode cannot work with this trainer's setup."""
        if self.action_set.lr_mode == "apply":
            named = sum(1 for o in trainer.optimizers for g in o.param_groups if g.get("name"))
            if not named:
                raise ValueError(
                    "balance_lr=True needs per-layer named param groups; build the optimizer with "
                    "WeightWatcherCallback.param_groups(self, base_lr=...) (or "
                    "ww_callbacks.lightning.layer_param_groups) in configure_optimizers")
        if self.action_set.freeze_mode == "apply" and trainer.world_size > 1:
            kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
            if isinstance(kwargs, dict) and not kwargs.get("find_unused_parameters", False):
                raise ValueError(
                    "freeze='apply' under DDP needs DDPStrategy(find_unused_parameters=True): a "
                    "frozen layer gets no gradient and DDP would raise in the next backward")

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._trainer, self._module = trainer, pl_module
        if self.action_set.enabled:
            self._check_actions(trainer)
            if self.action_set.freeze_policy.protect_head:
                from ww_callbacks.torch_utils import tied_head_layers

                # an input embedding tied to the output head (HF-style) is the head too
                self.action_set.freeze_policy.protect_names(tied_head_layers(pl_module))
            # requires_grad is not in checkpoints: re-freeze what the restored state froze
            self.controller._guard("re-applying frozen layers", self.action_set.reapply)

    def _trackers(self, trainer: "pl.Trainer") -> List[Any]:
        from ww_callbacks.trackers import get_tracker_class

        out = []
        for lg in trainer.loggers:
            names = {cls.__name__ for cls in type(lg).__mro__}
            match = next((v for k, v in _LOGGER_TRACKERS.items() if k in names), None)
            if match is None:
                continue
            name, kwargs = match
            try:
                out.append(get_tracker_class(name)(**kwargs(lg)))
            except ImportError as exc:
                log.debug("ww: no %s tracker (%s); skipping logger %s", name, exc, type(lg).__name__)
            except Exception as exc:
                if self.controller.strict:
                    raise
                self.controller._report(f"tracker {name}", f"could not attach to {type(lg).__name__}", exc)
        return out

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._trainer, self._module = trainer, pl_module
        self.controller._guard("re-applying frozen layers", self.action_set.reapply)
        total_steps = trainer.estimated_stepping_batches
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
        output_dir = self._output_dir or os.path.join(trainer.default_root_dir, "ww-output")
        zero = trainer.is_global_zero
        self.controller.configure(total_steps=total_steps, total_epochs=max_epochs,
                                  trackers=self._trackers(trainer) if zero else [],
                                  is_global_zero=zero, current_step=trainer.global_step,
                                  output_dir=output_dir, world_size=trainer.world_size)

    def _run(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch_end: bool) -> None:
        if trainer.sanity_checking:
            return
        step, epoch = trainer.global_step, trainer.current_epoch
        if self.controller.should_run(step=step, epoch=epoch, epoch_end=epoch_end):
            self._publish(trainer, self.controller.run(pl_module, step=step, epoch=epoch))

    @staticmethod
    def _publish(trainer: "pl.Trainer", result: Any) -> None:
        if result is not None:
            summary = result.summary()
            if math.isfinite(summary.get("alpha", math.nan)):
                import torch

                trainer.callback_metrics["ww/alpha_mean"] = torch.tensor(summary["alpha"])

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # a background analysis that finished is recorded here, soon after it is ready
        self._publish(trainer, self.controller.poll())
        if self.controller.schedule.mode == "steps":
            self._run(trainer, pl_module, epoch_end=False)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.controller.schedule.mode == "epochs":
            self._run(trainer, pl_module, epoch_end=True)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # after the last epoch Lightning has already advanced current_epoch past it
        epoch = max(trainer.current_epoch - (1 if trainer.fit_loop.epoch_loop.done else 0), 0)
        self.controller.finish(pl_module, step=trainer.global_step, epoch=epoch)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                     exception: BaseException) -> None:
        self.controller.close()

    def state_dict(self) -> Dict[str, Any]:
        state = self.controller.state_dict()      # records an analysis in flight (and its actions)
        if self.action_set.enabled:
            state["actions"] = self.action_set.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.controller.load_state_dict(state_dict)
        self.action_set.load_state_dict(state_dict.get("actions"))


def layer_param_groups(pl_module: Any, base_lr: Optional[float] = None, layers: Any = None,
                       **group_kwargs: Any) -> List[Dict[str, Any]]:
    """One named param group per analysable layer plus ``"rest"``, for ``balance_lr=True``.

    Use in ``configure_optimizers``::

        def configure_optimizers(self):
            opt = torch.optim.SGD(layer_param_groups(self, base_lr=0.1), momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.99 ** s)]

    Args:
        pl_module: the module (or any ``nn.Module``).
        base_lr: ``lr`` of every group (``None``: the optimizer's default).
        layers: regex(es) restricting the layers that get their own group.
        **group_kwargs: extra keys for every group (``weight_decay``, ...).
    """
    from ww_callbacks.torch_utils import model_param_groups

    return model_param_groups(pl_module, base_lr=base_lr, layers=layers, **group_kwargs)


def _broadcast(obj: Any) -> Any:
    from ww_callbacks.torch_utils import broadcast_object

    return broadcast_object(obj)
