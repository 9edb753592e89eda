"""WeightWatcher callback for the Hugging Face ``transformers.Trainer``.

Translates ``TrainerCallback`` hooks into :class:`~ww_callbacks.controller.WeightWatcherController`
calls and maps ``args.report_to`` (W&B, MLflow, TensorBoard) to trackers that share the runs the
Trainer's own integrations opened.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ww_callbacks.huggingface needs transformers: "
                      "pip install 'ww_callbacks[huggingface]'") from exc

from ww_callbacks.controller import WeightWatcherController
from ww_callbacks.history import History, read_jsonl

__all__ = ["WeightWatcherCallback"]

log = logging.getLogger("ww_callbacks")

#: HF's WandbCallback declares this as the x-axis of every key.
HF_STEP_METRIC = "train/global_step"


def _epoch_index(state: Any) -> int:
    """0-based epoch the current weights belong to (``state.epoch`` is e.g. 1.25 or 2.0)."""
    epoch = getattr(state, "epoch", None)
    if epoch is None or not math.isfinite(float(epoch)):
        return 0
    return max(int(math.ceil(float(epoch) - 1e-9)) - 1, 0)


def _find_callback_handler(max_depth: int = 6) -> Any:
    """The Trainer's ``CallbackHandler`` that is calling us (hooks get no reference to it)."""
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None
        for _ in range(max_depth):
            if frame is None:
                return None
            obj = frame.f_locals.get("self")
            if obj is not None and type(obj).__name__ == "CallbackHandler" \
                    and isinstance(getattr(obj, "callbacks", None), list):
                return obj
            frame = frame.f_back
    finally:
        del frame
    return None


class WeightWatcherCallback(TrainerCallback, ExportableState):
    r"""Analyse the layer weights' spectra (alpha etc.) during ``Trainer.train()`` with ``ww_core``.

    Args:
        start_fraction: share of the planned optimizer steps (``state.max_steps``) after which
            analyses start (default 0.5).
        every_n_epochs: analyse at the end of every n-th epoch (default 1).
        every_n_steps: analyse every n optimizer steps instead (``on_step_end``).
        layers: regex or list of regexes selecting layers by module name.
        output_dir: folder of the local record (default ``<args.output_dir>/ww-output``).
        trackers: ``"auto"`` (the integrations in ``args.report_to`` that are live — the active
            ``wandb.run`` with step metric ``train/global_step``, the active MLflow run, the
            ``TensorBoardCallback``'s writer — plus the local record), ``None``, or a list of names
            / ``Tracker`` instances. A named ``"tensorboard"`` without HF's TensorBoardCallback
            writes to ``<output_dir>/tensorboard``.
        strict: raise errors from the analysis or trackers instead of reporting them once.
        actions: objects with ``on_analysis(controller, result, step, epoch)``.
        log_fn: where the per-analysis line goes (default: the ``ww_callbacks`` logger).
        analyze_fn: replaces ``ww_core.analyze`` (testing).
        **analyze_options: passed to ``ww_core.analyze`` (``min_evals``, ``fix_fingers``, ...).

    Resume: the history survives ``trainer.train(resume_from_checkpoint=...)`` both ways.

    * With ``TrainingArguments(restore_callback_states_from_checkpoint=True)`` HF rebuilds this
      callback as a **new object** from :meth:`state` (stored in ``trainer_state.json``), with
      the history as of the checkpoint.
    * Otherwise, the history is re-read from ``output_dir/history.jsonl``.

    Either way rows recorded after the checkpoint's global step (a crashed run) are dropped, so
    the continued history has neither gaps nor duplicates. Note that with the restore option the
    instance you passed in is replaced: read the results from ``output_dir`` or from
    ``trainer.callback_handler``.

    Only the world process zero writes files and logs; the analysis runs on the processes that
    reach the hooks.

    Example::

        >>> from transformers import Trainer, TrainingArguments          # doctest: +SKIP
        >>> ww = WeightWatcherCallback(every_n_steps=50)                   # doctest: +SKIP
        >>> Trainer(model, TrainingArguments("out", report_to="wandb"),
        ...         train_dataset=ds, callbacks=[ww]).train()              # doctest: +SKIP
    """

    def __init__(self, start_fraction: float = 0.5, every_n_epochs: Optional[int] = None,
                 every_n_steps: Optional[int] = None, layers: Union[None, str, Sequence[str]] = None,
                 output_dir: Optional[str] = None, trackers: Any = "auto", strict: bool = False,
                 actions: Optional[Sequence[Any]] = None, log_fn: Any = None, analyze_fn: Any = None,
                 **analyze_options: Any) -> None:
        self._output_dir = output_dir
        self._args = dict(start_fraction=start_fraction, every_n_epochs=every_n_epochs,
                          every_n_steps=every_n_steps, layers=layers, output_dir=output_dir,
                          trackers=trackers, strict=strict, **analyze_options)
        self.controller = WeightWatcherController(
            start_fraction=start_fraction, every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps, layers=layers, output_dir=output_dir, trackers=trackers,
            log_fn=log_fn, strict=strict, actions=actions, analyze_fn=analyze_fn,
            **analyze_options)
        self._restored = False

    # ------------------------------------------------------------------ public
    @property
    def history(self) -> History:
        """:class:`ww_callbacks.history.History` of this run."""
        return self.controller.history

    # ------------------------------------------------------------------ ExportableState
    def state(self) -> Dict[str, Any]:
        """JSON state for ``trainer_state.json``: constructor args and the controller state."""
        args = {}
        for key, value in self._args.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                if key == "trackers":  # Tracker instances cannot be rebuilt from JSON
                    value = "auto"
                else:
                    continue
            args[key] = value
        return {"args": args, "attributes": {"controller_state": self.controller.state_dict()}}

    @property
    def controller_state(self) -> Dict[str, Any]:
        return self.controller.state_dict()

    @controller_state.setter
    def controller_state(self, value: Dict[str, Any]) -> None:
        # HF's restore does ``setattr(new_callback, "controller_state", value)``.
        self.controller.load_state_dict(value)
        self._restored = True

    # ------------------------------------------------------------------ trackers
    def _requested(self) -> set:
        spec = self.controller.tracker_spec
        if spec == "auto" or not spec:
            return set()
        return {t for t in spec if isinstance(t, str)}

    def _trackers(self, args: Any, output_dir: str) -> List[Any]:
        report_to = args.report_to or []
        if isinstance(report_to, str):
            report_to = [report_to]
        report_to = {str(r).lower() for r in report_to}
        wanted = report_to | self._requested()
        out: List[Any] = []
        handler = _find_callback_handler()
        if "wandb" in wanted:
            self._add(out, "wandb", self._wandb_tracker, "wandb" in report_to)
        if "mlflow" in wanted:
            self._add(out, "mlflow", self._mlflow_tracker, "mlflow" in report_to)
        if "tensorboard" in wanted:
            self._add(out, "tensorboard", lambda live: self._tb_tracker(handler, output_dir, live),
                      "tensorboard" in report_to)
        return out

    def _add(self, out: List[Any], name: str, factory: Any, from_report_to: bool) -> None:
        try:
            tracker = factory(from_report_to)
        except ImportError as exc:
            log.debug("ww: no %s tracker (%s)", name, exc)
            return
        except Exception as exc:
            if self.controller.strict:
                raise
            self.controller._report(f"tracker {name}", f"could not attach to {name}", exc)
            return
        if tracker is not None:
            out.append(tracker)

    @staticmethod
    def _wandb_tracker(from_report_to: bool) -> Any:
        import wandb

        from ww_callbacks.trackers.wandb import WandbTracker

        if wandb.run is None and from_report_to:
            return None  # report_to=wandb but no run (e.g. WandbCallback skipped): nothing to share
        return WandbTracker(run=wandb.run, step_metric=HF_STEP_METRIC)

    @staticmethod
    def _mlflow_tracker(from_report_to: bool) -> Any:
        import mlflow
        from mlflow import MlflowClient

        from ww_callbacks.trackers.mlflow import MLflowTracker

        active = mlflow.active_run()
        if active is None:
            # HF's MLflowCallback ends its run in on_train_end (before us): resolve it now.
            return None if from_report_to else MLflowTracker()
        return MLflowTracker(MlflowClient(), active.info.run_id)

    @staticmethod
    def _tb_tracker(handler: Any, output_dir: str, from_report_to: bool) -> Any:
        from ww_callbacks.trackers.tensorboard import TensorBoardTracker

        if handler is not None:
            for cb in handler.callbacks:
                if type(cb).__name__ == "TensorBoardCallback" and getattr(cb, "tb_writer", None):
                    return TensorBoardTracker(cb.tb_writer)
        log_dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(output_dir, "tensorboard")
        return TensorBoardTracker(log_dir=log_dir)

    # ------------------------------------------------------------------ hooks
    def _load_history_file(self, output_dir: str) -> None:
        path = os.path.join(output_dir, History.JSONL)
        if not os.path.exists(path):
            return
        rows = read_jsonl(path)
        if not rows:
            return
        # through the controller's own state format (non-finite values as None)
        state = History(None)
        state.rows = rows
        self.controller.load_state_dict({"history": state.state_dict(), "last_step": None})

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        output_dir = self._output_dir or os.path.join(args.output_dir or ".", "ww-output")
        zero = bool(state.is_world_process_zero)
        step = int(state.global_step or 0)
        if step > 0 and not self._restored and not len(self.controller.history):
            # resumed without restore_callback_states_from_checkpoint: the files are the record
            self.controller.output_dir = output_dir
            self._load_history_file(output_dir)
        total_epochs = getattr(state, "num_train_epochs", None) or getattr(args, "num_train_epochs", None)
        self.controller.configure(total_steps=state.max_steps, total_epochs=total_epochs,
                                  trackers=self._trackers(args, output_dir) if zero else [],
                                  is_global_zero=zero, current_step=step, output_dir=output_dir,
                                  world_size=int(getattr(args, "world_size", 1) or 1))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.controller.poll()          # record a finished background analysis
        if self.controller.schedule.mode != "steps":
            return
        step, epoch = int(state.global_step), _epoch_index(state)
        if self.controller.should_run(step=step, epoch=epoch, epoch_end=False):
            self.controller.run(kwargs.get("model"), step=step, epoch=epoch)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.controller.schedule.mode != "epochs":
            return
        step, epoch = int(state.global_step), _epoch_index(state)
        if self.controller.should_run(step=step, epoch=epoch, epoch_end=True):
            self.controller.run(kwargs.get("model"), step=step, epoch=epoch)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.controller.finish(kwargs.get("model"), step=int(state.global_step),
                               epoch=_epoch_index(state))
