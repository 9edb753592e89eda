"""WeightWatcher callback for Lightning (``lightning.pytorch``, else ``pytorch_lightning``).

Translates Trainer hooks into :class:`~ww_callbacks.controller.WeightWatcherController` calls and
maps the Trainer's loggers (W&B, MLflow, TensorBoard) to trackers. For ``pytorch_lightning``
Trainers while ``lightning`` is installed too, use :mod:`ww_callbacks.pytorch_lightning`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
except ImportError:  # pragma: no cover - depends on which package is installed
    try:
        import pytorch_lightning as pl
        from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
    except ImportError as exc:
        raise ImportError("ww_callbacks.lightning needs Lightning: "
                          "pip install 'ww-callbacks[lightning]'") from exc

from ww_callbacks.adapter import CallbackBase, override
from ww_callbacks.controller import WeightWatcherController
from ww_callbacks.torch_utils import model_param_groups as layer_param_groups
from ww_callbacks.trackers.base import SUMMARY_KEYS
from ww_callbacks.warnings import warn

__all__ = ["WeightWatcherCallback", "layer_param_groups"]

#: The x-axis key Lightning's loggers write (W&B trackers the user left unset get it).
PL_STEP_METRIC = "trainer/global_step"

#: Lightning logger class -> (tracker name, kwargs built from the logger).
_LOGGER_TRACKERS = {
    "WandbLogger": ("wandb", lambda lg: {"run": lg.experiment, "step_metric": PL_STEP_METRIC}),
    "MLFlowLogger": ("mlflow", lambda lg: {"client": lg.experiment, "run_id": lg.run_id}),
    "TensorBoardLogger": ("tensorboard", lambda lg: {"writer": lg.experiment}),
}


def _ddp_without_unused(strategy: Any) -> bool:
    """Whether ``strategy`` runs DDP without ``find_unused_parameters=True``."""
    from torch.nn.parallel import DistributedDataParallel

    # in a fit the strategy has wrapped the module before on_fit_start (Trainer._run calls
    # strategy.setup first): the wrapper's public attribute says it
    if isinstance(strategy.model, DistributedDataParallel):
        return not strategy.model.find_unused_parameters
    # not wrapped yet (a fit start driven by hand): Lightning 2.6's DDPStrategy keeps its DDP
    # keywords only in the private _ddp_kwargs, with no public accessor
    ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
    return isinstance(ddp_kwargs, dict) and not ddp_kwargs.get("find_unused_parameters", False)


class WeightWatcherCallback(CallbackBase, pl.Callback):
    r"""Analyse the layer weights' spectra (alpha etc.) during training with ``ww_core``.

    The history goes to ``output_dir`` as it goes (``history.jsonl``, ``history.csv``,
    ``report.html``), into checkpoints (a resumed fit continues the same curves) and to the
    Trainer's W&B / MLflow / TensorBoard loggers; one line per analysis goes to the console.

    Args:
        controller: an existing controller to drive (then give no other keyword).
        **kwargs: :class:`~ww_callbacks.controller.WeightWatcherController` keywords:
            ``start_fraction`` (of ``trainer.estimated_stepping_batches``, else of
            ``max_epochs``), ``every_n_epochs``, ``every_n_steps``, ``layers``, ``output_dir``
            (default: a folder per run in ``<trainer.default_root_dir>/ww-output``), ``trackers``, ``log_fn``
            (default ``rank_zero_info``), ``strict``, ``freeze`` (``"apply"`` sets
            ``requires_grad=False`` mid-fit), ``balance_lr`` (``"apply"`` needs named param
            groups, see :func:`layer_param_groups`), ``early_stop`` (``"apply"`` sets
            ``trainer.should_stop``), each a mode or a settings object
            (:mod:`ww_callbacks.settings`), ``actions``, ``analyze_fn`` and ``ww_core.analyze``
            options. ``inspect.signature`` of this class lists them with their defaults.

    Raises:
        ValueError: an invalid keyword (at construction); at fit start, ``balance_lr="apply"``
            without named param groups or ``freeze="apply"`` under DDP without
            ``find_unused_parameters=True``.

    Example::

        >>> import tempfile, torch
        >>> from lightning.pytorch import LightningModule, Trainer
        >>> from ww_callbacks.lightning import WeightWatcherCallback
        >>> class Net(LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(64, 32)
        ...     def training_step(self, batch, _):
        ...         return self.fc(batch[0]).pow(2).mean()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.01)
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 64))
        >>> ww = WeightWatcherCallback(start_fraction=0.5, every_n_epochs=1,
        ...                            output_dir=tempfile.mkdtemp())
        >>> trainer = Trainer(max_epochs=2, callbacks=[ww], logger=False, enable_progress_bar=False,
        ...                   enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=16))
        >>> sorted({(row["step"], row["name"]) for row in ww.history.rows})
        [(4, 'fc'), (8, 'fc')]

    After ``fit``, ``ww.history.rows`` holds one dict per layer per analysis.
    """

    def __init__(self, controller: Optional[WeightWatcherController] = None, **kwargs: Any) -> None:
        super().__init__()
        self._trainer: Any = None
        self._module: Any = None
        self._lenient: List[Any] = []    # EarlyStopping callbacks made lenient for this fit
        #: The :class:`~ww_callbacks.prefix_cache.PrefixCache` of the latest fit with
        #: ``Freeze(cache=...)`` on (its ``stats`` stay readable after the fit), else ``None``.
        self.prefix_cache: Any = None
        self._setup_controller(controller, kwargs, log_fn=rank_zero_info)

    @override
    @property
    def state_key(self) -> str:
        s = self.controller.schedule
        return self._generate_state_key(start_fraction=s.start_fraction, every_n_epochs=s.every_n_epochs,
                                        every_n_steps=s.every_n_steps, layers=self.controller.layers)

    #: Per-layer named param groups for ``configure_optimizers`` (:func:`layer_param_groups`).
    param_groups = staticmethod(layer_param_groups)

    # ------------------------------------------------------------------ apply functions
    def _freeze(self, freeze: List[str], unfreeze: List[str]) -> None:
        from ww_callbacks.torch_utils import freeze_layers, unfreeze_layers

        freeze_layers(self._module, freeze, self._trainer.optimizers if self._trainer else (),
                      whole_prefix=self.action_set.freeze_policy.whole_prefix)
        unfreeze_layers(self._module, unfreeze)

    def _set_lr_factors(self, factors: Dict[str, float]) -> None:
        from ww_callbacks.torch_utils import apply_lr_factors

        scheds = [c.scheduler for c in self._trainer.lr_scheduler_configs]
        for opt in self._trainer.optimizers:
            apply_lr_factors(opt, scheds, factors)

    def _stop(self, reason: str) -> None:
        self._trainer.should_stop = True

    # ------------------------------------------------------------------ tracker discovery
    def _trackers(self, trainer: "pl.Trainer") -> List[Any]:
        from ww_callbacks.trackers import make_tracker
        from ww_callbacks.trackers.metrics_logger import MetricsLoggerTracker

        found = []
        for lg in trainer.loggers:
            names = {cls.__name__ for cls in type(lg).__mro__}
            match = next((v for k, v in _LOGGER_TRACKERS.items() if k in names), None)
            # any other logger (CSVLogger, Comet, Neptune, DVCLive...) gets the summary scalars
            make = (lambda g, m=match: make_tracker(m[0], **m[1](g))) if match else MetricsLoggerTracker
            found.append(self.controller.guard(f"attaching to {type(lg).__name__}", make, lg))
        return [t for t in found if t is not None]

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._trainer, self._module = trainer, pl_module
        actions = self.controller.action_set
        if actions.lr_mode == "apply" and not any(
                g.get("name") for o in trainer.optimizers for g in o.param_groups):
            raise ValueError("balance_lr=True needs per-layer named param groups; build the optimizer "
                             "with WeightWatcherCallback.param_groups(self, base_lr=...) in "
                             "configure_optimizers")
        self._make_early_stopping_lenient(trainer)
        if actions.freeze_mode == "apply" and trainer.world_size > 1 \
                and _ddp_without_unused(trainer.strategy):
            raise ValueError("freeze='apply' under DDP needs DDPStrategy(find_unused_parameters=True): "
                             "a frozen layer gets no gradient and DDP would raise in the next backward")

    def _make_early_stopping_lenient(self, trainer: "pl.Trainer") -> None:
        """``EarlyStopping(monitor="ww/<key>")`` with ``strict=True`` (its default) would raise at
        the epoch ends before the first analysis: its public ``strict`` is turned off for this
        fit and given back in :meth:`_restore_early_stopping`. A ``ww/`` key no analysis
        publishes is warned about (:class:`~ww_callbacks.warnings.WeightWatcherWarning`)."""
        self._restore_early_stopping()
        for cb in trainer.callbacks:
            if not (isinstance(cb, pl.callbacks.EarlyStopping) and str(cb.monitor).startswith("ww/")):
                continue
            if cb.monitor[len("ww/"):] not in SUMMARY_KEYS:
                warn(f"EarlyStopping(monitor={cb.monitor!r}) watches a key WeightWatcherCallback "
                     f"never publishes; known: {['ww/' + k for k in SUMMARY_KEYS]}", stacklevel=3,
                     warn_fn=rank_zero_warn)
            elif cb.strict:
                cb.strict = False
                self._lenient.append(cb)

    def _restore_early_stopping(self) -> None:
        for cb in self._lenient:
            cb.strict = True
        self._lenient = []

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        from ww_callbacks.torch_utils import tied_head_layers

        self._trainer, self._module = trainer, pl_module
        # after the checkpoint restore: re-freeze what it froze; a tied output head is protected
        self.controller.start_actions(protect=tied_head_layers(pl_module))
        zero = trainer.is_global_zero
        self.controller.configure(
            total_steps=trainer.estimated_stepping_batches,
            total_epochs=trainer.max_epochs if trainer.max_epochs not in (None, -1) else None,
            trackers=self._trackers(trainer) if zero else [], is_global_zero=zero,
            current_step=trainer.global_step, world_size=trainer.world_size,
            base_dir=os.path.join(trainer.default_root_dir, "ww-output"), wrapper=trainer.strategy.model,
            step_metric=PL_STEP_METRIC, model=pl_module)
        self._start_prefix_cache(trainer, pl_module)

    def _start_prefix_cache(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """``Freeze(cache=...)``: each training batch is keyed in ``on_train_batch_start``."""
        from ww_callbacks.prefix_cache_setup import start_prefix_cache

        self._close_prefix_cache()
        if not getattr(self.controller.action_set.freeze, "cache", False):
            return
        self.prefix_cache = start_prefix_cache(pl_module, self.controller.action_set.freeze,
                                               self.controller.output_dir, loader=trainer.train_dataloader,
                                               log_fn=self.controller.log, warn_fn=rank_zero_warn)

    def _close_prefix_cache(self) -> None:
        if self.prefix_cache is not None and self.prefix_cache.close():
            self.controller.log(self.prefix_cache.summary())

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.begin_batch(batch)

    def _maybe_run(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch_end: bool) -> None:
        if trainer.sanity_checking:
            return
        result = self.controller.maybe_run(pl_module, step=trainer.global_step,
                                           epoch=trainer.current_epoch, epoch_end=epoch_end)
        if result is not None:
            import torch

            for key, value in self.controller.last_scalars.items():
                trainer.callback_metrics[f"ww/{key}"] = torch.tensor(value)   # the trackers' keys

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.end_batch()
        self._maybe_run(trainer, pl_module, epoch_end=False)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._maybe_run(trainer, pl_module, epoch_end=True)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # after the last epoch Lightning has already advanced current_epoch past it
        epoch = max(trainer.current_epoch - (1 if trainer.fit_loop.epoch_loop.done else 0), 0)
        self._restore_early_stopping()
        self._close_prefix_cache()
        self.controller.finish(pl_module, step=trainer.global_step, epoch=epoch)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                     exception: BaseException) -> None:
        self._restore_early_stopping()
        self._close_prefix_cache()
        self.controller.close()
