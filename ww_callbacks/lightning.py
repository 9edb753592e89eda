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

from ww_callbacks.controller import WeightWatcherController

__all__ = ["WeightWatcherCallback"]

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
        actions: objects with ``on_analysis(controller, result, step, epoch)``.
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
                 **analyze_options: Any) -> None:
        self._output_dir = output_dir
        self.controller = WeightWatcherController(
            start_fraction=start_fraction, every_n_epochs=every_n_epochs, every_n_steps=every_n_steps,
            layers=layers, output_dir=output_dir, trackers=trackers, log_fn=log_fn or rank_zero_info,
            strict=strict, actions=actions, analyze_fn=analyze_fn, **analyze_options)
        self._key = dict(start_fraction=start_fraction, every_n_epochs=every_n_epochs,
                         every_n_steps=every_n_steps, layers=layers)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._key)

    @property
    def history(self):
        """:class:`ww_callbacks.history.History` of this run."""
        return self.controller.history

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
        return self.controller.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.controller.load_state_dict(state_dict)
