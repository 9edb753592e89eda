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

from ww_callbacks.actions.build import ActionSet
from ww_callbacks.controller import WeightWatcherController
from ww_callbacks.history import History, read_jsonl

__all__ = ["WeightWatcherCallback", "create_layer_optimizer"]

#: File in each ``checkpoint-N`` folder holding the actions' state (frozen layers, decisions,
#: LR factors) for resumes without ``restore_callback_states_from_checkpoint``.
ACTIONS_FILE = "ww_actions.json"

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
        freeze: ``"off"`` (default), ``"suggest"`` (record and log the layers that could be frozen)
            or ``"apply"`` (freeze them mid-training; works with the Trainer's default optimizer).
        freeze_options: :class:`~ww_callbacks.actions.FreezePolicy` options (``band``/``preset``,
            ``tol``, ``window``, ``max_share``, ``protect``, ``unfreeze``, ...).
        balance_lr: ``False`` (default), ``"suggest"`` (log TempBalance factors) or ``True``:
            scale per-layer LRs, composed with the Trainer's scheduler (factors go into its
            ``base_lrs``). Needs per-layer named groups: call
            :func:`create_layer_optimizer(trainer) <create_layer_optimizer>` before ``train()``.
        lr_options: :class:`~ww_callbacks.actions.LRBalancePolicy` options (``s1``, ``s2``,
            ``metric``, ...).
        early_stop: ``True`` sets ``control.should_training_stop`` when the mean alpha stops
            improving for ``patience`` analyses or falls below ``lower_bound``.
        early_stop_options: :class:`~ww_callbacks.actions.EarlyStopPolicy` options.
        actions: further objects with ``on_analysis(controller, result, step, epoch)``.
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
    ``trainer.callback_handler``. The rebuilt object only gets the JSON-serialisable arguments:
    ``actions=``, ``log_fn=``, ``analyze_fn=`` and tracker instances are not carried over.

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
                 freeze: Any = "off", freeze_options: Optional[Dict[str, Any]] = None,
                 balance_lr: Any = False, lr_options: Optional[Dict[str, Any]] = None,
                 early_stop: bool = False, early_stop_options: Optional[Dict[str, Any]] = None,
                 **analyze_options: Any) -> None:
        self._output_dir = output_dir
        self._args = dict(start_fraction=start_fraction, every_n_epochs=every_n_epochs,
                          every_n_steps=every_n_steps, layers=layers, output_dir=output_dir,
                          trackers=trackers, strict=strict, freeze=freeze,
                          freeze_options=freeze_options, balance_lr=balance_lr,
                          lr_options=lr_options, early_stop=early_stop,
                          early_stop_options=early_stop_options, **analyze_options)
        self._model: Any = None
        self._optimizer: Any = None
        self._scheduler: Any = None
        self._stop_reason: Optional[str] = None
        self.action_set = ActionSet(freeze, freeze_options, balance_lr, lr_options, early_stop,
                                    early_stop_options)
        self.action_set.bind(freeze_fn=self._freeze, lr_fn=self._set_lr_factors,
                             stop_fn=self._stop, sync_fn=_broadcast)
        self.controller = WeightWatcherController(
            start_fraction=start_fraction, every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps, layers=layers, output_dir=output_dir, trackers=trackers,
            log_fn=log_fn, strict=strict, actions=self.action_set.actions() + list(actions or ()),
            analyze_fn=analyze_fn, **analyze_options)
        self._restored = False
        self._actions_restored = False

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
        attributes = {"controller_state": self.controller.state_dict()}
        if self.action_set.enabled:
            attributes["actions_state"] = self.action_set.state_dict()
        return {"args": args, "attributes": attributes}

    @property
    def controller_state(self) -> Dict[str, Any]:
        return self.controller.state_dict()

    @controller_state.setter
    def controller_state(self, value: Dict[str, Any]) -> None:
        # HF's restore does ``setattr(new_callback, "controller_state", value)``.
        self.controller.load_state_dict(value)
        self._restored = True

    @property
    def actions_state(self) -> Dict[str, Any]:
        return self.action_set.state_dict()

    @actions_state.setter
    def actions_state(self, value: Dict[str, Any]) -> None:
        self.action_set.load_state_dict(value)
        self._actions_restored = True

    @property
    def frozen_layers(self) -> List[str]:
        """Layers frozen (``freeze="apply"``) or suggested (``"suggest"``) so far."""
        return list(self.action_set.freeze_policy.frozen)

    @property
    def lr_factors(self) -> Dict[str, float]:
        """The latest TempBalance factors (``balance_lr`` on)."""
        return dict(self.action_set.lr_policy.factors)

    # ------------------------------------------------------------------ actions
    def _bind(self, kwargs: Dict[str, Any]) -> None:
        for attr, key in (("_model", "model"), ("_optimizer", "optimizer"),
                          ("_scheduler", "lr_scheduler")):
            if kwargs.get(key) is not None:
                setattr(self, attr, kwargs[key])

    def _freeze(self, freeze: List[str], unfreeze: List[str]) -> None:
        from ww_callbacks.torch_utils import freeze_layers, unfreeze_layers

        if freeze:
            freeze_layers(self._model, freeze, [self._optimizer] if self._optimizer is not None else [])
        if unfreeze:
            unfreeze_layers(self._model, unfreeze)

    def _set_lr_factors(self, factors: Dict[str, float]) -> None:
        from ww_callbacks.torch_utils import apply_lr_factors

        apply_lr_factors(self._optimizer, [self._scheduler], factors)

    def _stop(self, reason: str) -> None:
        self._stop_reason = reason

    def _after(self, control: Any) -> None:
        if self._stop_reason is not None:
            control.should_training_stop = True

    def _check_actions(self, args: Any) -> None:
        if self.action_set.lr_mode == "apply":
            from ww_callbacks.torch_utils import unwrap_optimizer

            opt = unwrap_optimizer(self._optimizer) if self._optimizer is not None else None
            if opt is None or not any(g.get("name") for g in opt.param_groups):
                raise ValueError(
                    "balance_lr=True needs per-layer named param groups; the Trainer's default "
                    "optimizer has two unnamed ones. Call "
                    "ww_callbacks.huggingface.create_layer_optimizer(trainer) before train()")
        if self.action_set.freeze_mode == "apply" and int(getattr(args, "world_size", 1) or 1) > 1 \
                and not getattr(args, "ddp_find_unused_parameters", False):
            raise ValueError("freeze='apply' under DDP needs "
                             "TrainingArguments(ddp_find_unused_parameters=True)")

    def _load_actions_file(self, args: Any, step: int) -> None:
        path = os.path.join(args.output_dir or ".", f"checkpoint-{step}", ACTIONS_FILE)
        if not os.path.exists(path):
            return
        try:
            with open(path, encoding="utf-8") as fh:
                self.action_set.load_state_dict(json.load(fh))
        except Exception as exc:
            if self.controller.strict:
                raise
            self.controller._report("actions file", f"could not read {path}", exc)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.action_set.enabled or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir or ".", f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            return
        # (no waiting for an analysis in flight: the optimizer is already saved, so only the
        # decisions taken so far belong with this checkpoint)
        try:
            with open(os.path.join(folder, ACTIONS_FILE), "w", encoding="utf-8") as fh:
                json.dump(self.action_set.state_dict(), fh)
        except Exception as exc:
            if self.controller.strict:
                raise
            self.controller._report("actions file", f"could not write {folder}/{ACTIONS_FILE}", exc)

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
            # No run to share: a named "mlflow" is created by the controller (own sqlite store in
            # output_dir).
            return None
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
        rows = read_jsonl(path, skip_bad_lines=True)   # a crash may cut the last line short
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
        self._bind(kwargs)
        if self.action_set.enabled:
            self._check_actions(args)
            if self.action_set.freeze_policy.protect_head and self._model is not None:
                from ww_callbacks.torch_utils import tied_head_layers

                # an input embedding tied to lm_head is the output head too: never freeze it
                self.action_set.freeze_policy.protect_names(tied_head_layers(self._model))
            if step > 0 and not self._actions_restored:
                self._load_actions_file(args, step)
            # requires_grad is not in checkpoints: re-freeze what the restored state froze.
            # LR factors live in the optimizer's param groups and the scheduler's base_lrs,
            # both restored by the Trainer.
            self.controller._guard("re-applying frozen layers", self.action_set.reapply)
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
        self._bind(kwargs)
        self.controller.poll()          # record a finished background analysis
        if self.controller.schedule.mode == "steps":
            step, epoch = int(state.global_step), _epoch_index(state)
            if self.controller.should_run(step=step, epoch=epoch, epoch_end=False):
                self.controller.run(kwargs.get("model"), step=step, epoch=epoch)
        self._after(control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._bind(kwargs)
        if self.controller.schedule.mode == "epochs":
            step, epoch = int(state.global_step), _epoch_index(state)
            if self.controller.should_run(step=step, epoch=epoch, epoch_end=True):
                self.controller.run(kwargs.get("model"), step=step, epoch=epoch)
        self._after(control)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.controller.finish(kwargs.get("model"), step=int(state.global_step),
                               epoch=_epoch_index(state))


def create_layer_optimizer(trainer: Any, layers: Any = None) -> Any:
    """Give ``trainer`` an optimizer with one named param group per analysable layer.

    Needed for ``balance_lr=True``: the Trainer's default optimizer has two unnamed groups
    (decay / no decay) that per-layer factors cannot address. Call it after building the Trainer
    and before ``train()``; the Trainer keeps this optimizer (``create_optimizer`` only builds one
    when ``trainer.optimizer`` is ``None``) and still creates its default scheduler
    (``args.lr_scheduler_type``, warmup included) over all groups. The optimizer class and its
    arguments are the Trainer's own (``args.optim``, ``learning_rate``, ``adam_*``...), and each
    layer keeps HF's weight-decay split (two groups of the same ``name``: decayed weights, and
    biases/norms at ``weight_decay=0``). Call it again (on a new Trainer) when resuming: the
    checkpoint's optimizer state then loads into the same layout.

    Args:
        trainer: a ``transformers.Trainer`` (not yet trained).
        layers: regex(es) restricting the layers that get their own groups.

    Returns:
        The optimizer (also set as ``trainer.optimizer``).

    Example::

        >>> trainer = Trainer(model, args, train_dataset=ds,
        ...                   callbacks=[WeightWatcherCallback(balance_lr=True)])  # doctest: +SKIP
        >>> create_layer_optimizer(trainer)                                          # doctest: +SKIP
        >>> trainer.train()                                                          # doctest: +SKIP
    """
    from ww_callbacks.torch_utils import model_param_groups

    model = trainer.model
    decay = set(trainer.get_decay_parameter_names(model))
    names = {id(p): n for n, p in model.named_parameters()}
    wd = float(trainer.args.weight_decay)
    groups: List[Dict[str, Any]] = []
    for group in model_param_groups(model, layers=layers):
        params = group.pop("params")
        on = [p for p in params if names.get(id(p)) in decay]
        off = [p for p in params if names.get(id(p)) not in decay]
        if on:
            groups.append({**group, "params": on, "weight_decay": wd})
        if off:
            groups.append({**group, "params": off, "weight_decay": 0.0})
    cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("params", "model")}
    trainer.optimizer = cls(groups, **kwargs)
    return trainer.optimizer


def _broadcast(obj: Any) -> Any:
    from ww_callbacks.torch_utils import broadcast_object

    return broadcast_object(obj)
