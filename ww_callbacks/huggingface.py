"""WeightWatcher callback for the Hugging Face ``transformers.Trainer``.

Translates ``TrainerCallback`` hooks into :class:`~ww_callbacks.controller.WeightWatcherController`
calls and maps ``args.report_to`` (W&B, MLflow, TensorBoard) to trackers that share the runs the
Trainer's own integrations opened.
"""

from __future__ import annotations

import glob
import json
import math
import os
import socket
from typing import Any, Dict, List, Optional

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ww_callbacks.huggingface needs transformers: "
                      "pip install 'ww-callbacks[huggingface]'") from exc

from ww_callbacks.adapter import CallbackBase, override
from ww_callbacks.controller import WeightWatcherController
from ww_callbacks.settings import ActionSettings, settings_from_json, settings_to_json

__all__ = ["WeightWatcherCallback", "create_layer_optimizer"]

#: HF's WandbCallback declares this as the x-axis of every key.
HF_STEP_METRIC = "train/global_step"


def _console(line: str) -> None:
    """The per-analysis line, printed above the Trainer's tqdm progress bar (HF's own console)."""
    from tqdm.auto import tqdm

    tqdm.write(line)


def _epoch_index(state: Any) -> int:
    """0-based epoch the current weights belong to (``state.epoch`` is e.g. 1.25 or 2.0)."""
    epoch = getattr(state, "epoch", None)
    if epoch is None or not math.isfinite(float(epoch)):
        return 0
    return max(int(math.ceil(float(epoch) - 1e-9)) - 1, 0)


def _tensorboard_dir(args: Any) -> Optional[str]:
    """The folder HF's ``TensorBoardCallback`` writes to in this process, if any.

    Its writer is created in its ``on_train_begin`` (before ours) under
    ``TENSORBOARD_LOGGING_DIR`` or ``<output_dir>/runs/<time>_<host>``; event file names end in
    ``.<host>.<pid>.<n>``, so this process's newest file names the folder. Writing a second
    event file there puts our scalars in the same TensorBoard run.
    """
    # transformers 5.25: the folder is public only on the TensorBoardCallback instance
    # (``logging_dir``, ``tb_writer.log_dir``), and a callback is not given the other callbacks
    # (CallbackHandler.call_event passes the model, optimizer, scheduler and data loaders only),
    # so the folder is found from the files that callback wrote, not from its private state
    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return os.path.expanduser(os.environ["TENSORBOARD_LOGGING_DIR"])
    pattern = f"events.out.tfevents.*.{socket.gethostname()}.{os.getpid()}.*"
    mine = glob.glob(os.path.join(args.output_dir or ".", "runs", "*", pattern))
    return os.path.dirname(max(mine, key=os.path.getmtime)) if mine else None


class WeightWatcherCallback(CallbackBase, TrainerCallback, ExportableState):
    r"""Analyse the layer weights' spectra (alpha etc.) during ``Trainer.train()`` with ``ww_core``.

    Args:
        controller: an existing controller to drive (then give no other keyword).
        **kwargs: :class:`~ww_callbacks.controller.WeightWatcherController` keywords:
            ``start_fraction`` (of ``state.max_steps``), ``every_n_epochs``, ``every_n_steps``,
            ``layers``, ``output_dir`` (default: a folder per run in
            ``<args.output_dir>/ww-output``), ``trackers``
            (``"auto"``: the live integrations of ``args.report_to`` plus the local record),
            ``log_fn``, ``strict``, ``freeze``, ``balance_lr`` (``"apply"`` needs
            :func:`create_layer_optimizer`), ``early_stop`` (``"apply"`` sets
            ``control.should_training_stop``), each a mode or a settings object
            (:mod:`ww_callbacks.settings`), ``actions``, ``analyze_fn`` and ``ww_core.analyze``
            options. ``inspect.signature`` of this class lists them with their defaults.

    Raises:
        ValueError: an invalid keyword (at construction); at train start, ``balance_lr="apply"``
            without named param groups or ``freeze="apply"`` under DDP without
            ``ddp_find_unused_parameters=True``.

    Resume: the history and the actions survive ``trainer.train(resume_from_checkpoint=...)``.
    With ``TrainingArguments(restore_callback_states_from_checkpoint=True)`` HF rebuilds this
    callback as a **new object** from :meth:`state` (in ``trainer_state.json``) with the
    JSON-serialisable keywords only (not ``actions=``, ``log_fn=``, ``analyze_fn=``, tracker
    instances or ``controller=``); read results from ``output_dir`` or
    ``trainer.callback_handler``. Otherwise the controller reads the state of the checkpoint's
    step from the run folder (``ww_state.json``, rows from ``history.jsonl``). Rows recorded
    after the checkpoint's step (a crashed run) are dropped either way, and an analysis due at
    that step that the crash lost is redone from the restored weights at train begin.

    Example (run by ``tests/test_docstring_examples.py``; transformers prints a line at import
    under ``WANDB_MODE=offline``, so it is not a doctest)::

        import torch
        from transformers import Trainer, TrainingArguments
        from ww_callbacks.huggingface import WeightWatcherCallback

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(64, 32)

            def forward(self, x, labels=None):
                return {"loss": self.fc(x).pow(2).mean()}

        ww = WeightWatcherCallback(every_n_steps=2, output_dir="out/ww")
        args = TrainingArguments("out", max_steps=4, per_device_train_batch_size=8, report_to="none",
                                 save_strategy="no")
        ds = [{"x": torch.randn(64)} for _ in range(32)]
        Trainer(Net(), args, train_dataset=ds, callbacks=[ww]).train()
        sorted({(row["step"], row["name"]) for row in ww.history.rows})   # [(2, 'fc'), (4, 'fc')]

    With W&B, pass ``report_to="wandb"``: the callback logs to the Trainer's run.
    """

    def __init__(self, controller: Optional[WeightWatcherController] = None, **kwargs: Any) -> None:
        self._model: Any = None
        self._optimizer: Any = None
        self._scheduler: Any = None
        #: The :class:`~ww_callbacks.prefix_cache.PrefixCache` of the latest fit with
        #: ``Freeze(cache=...)`` on (its ``stats`` stay readable after the fit), else ``None``.
        self.prefix_cache: Any = None
        kwargs = {key: settings_from_json(value) for key, value in kwargs.items()}
        self._setup_controller(controller, kwargs, log_fn=_console)

    # ------------------------------------------------------------------ ExportableState
    @override
    def state(self) -> Dict[str, Any]:
        """JSON state for ``trainer_state.json``: the keywords and the controller state."""
        args = {}
        for key, value in self.init_kwargs.items():
            if isinstance(value, ActionSettings):
                value = settings_to_json(value)   # the Trainer rebuilds the callback from these
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                if key != "trackers":
                    continue
                value = "auto"  # Tracker instances cannot be rebuilt from JSON
            args[key] = value
        return {"args": args, "attributes": {"controller_state": self.controller.state_dict()}}

    @property
    def controller_state(self) -> Dict[str, Any]:
        return self.controller.state_dict()

    @controller_state.setter
    def controller_state(self, value: Dict[str, Any]) -> None:
        # HF's restore does ``setattr(new_callback, "controller_state", value)``
        self.controller.load_state_dict(value)

    # ------------------------------------------------------------------ apply functions
    def _freeze(self, freeze: List[str], unfreeze: List[str]) -> None:
        from ww_callbacks.torch_utils import freeze_layers, unfreeze_layers

        freeze_layers(self._model, freeze, [self._optimizer] if self._optimizer is not None else [],
                      whole_prefix=self.action_set.freeze_policy.whole_prefix)
        unfreeze_layers(self._model, unfreeze)

    def _set_lr_factors(self, factors: Dict[str, float]) -> None:
        from ww_callbacks.torch_utils import apply_lr_factors

        apply_lr_factors(self._optimizer, [self._scheduler], factors)

    def _stop(self, reason: str) -> None:
        pass  # the controller's stop_reason is copied into control.should_training_stop

    def _run(self, state: Any, control: Any, kwargs: Dict[str, Any], epoch_end: bool) -> None:
        self._bind(kwargs)
        self.controller.maybe_run(kwargs.get("model"), step=int(state.global_step),
                                  epoch=_epoch_index(state), epoch_end=epoch_end)
        if self.controller.stop_reason is not None:
            control.should_training_stop = True

    def _bind(self, kwargs: Dict[str, Any]) -> None:
        for attr, key in (("_model", "model"), ("_optimizer", "optimizer"), ("_scheduler", "lr_scheduler")):
            if kwargs.get(key) is not None:
                setattr(self, attr, kwargs[key])

    def _check_actions(self, args: Any) -> None:
        from ww_callbacks.torch_utils import unwrap_optimizer

        actions = self.controller.action_set
        if actions.lr_mode == "apply":
            opt = unwrap_optimizer(self._optimizer) if self._optimizer is not None else None
            if opt is None or not any(g.get("name") for g in opt.param_groups):
                raise ValueError("balance_lr=True needs per-layer named param groups; the Trainer's "
                                 "default optimizer has two unnamed ones. Call ww_callbacks."
                                 "huggingface.create_layer_optimizer(trainer) before train()")
        if actions.freeze_mode == "apply" and int(getattr(args, "world_size", 1) or 1) > 1 \
                and not getattr(args, "ddp_find_unused_parameters", False):
            raise ValueError("freeze='apply' under DDP needs "
                             "TrainingArguments(ddp_find_unused_parameters=True)")

    # ------------------------------------------------------------------ tracker discovery
    def _trackers(self, args: Any) -> List[Any]:
        from ww_callbacks.trackers.resolve import active_mlflow_tracker, active_wandb_tracker, requested_names

        report_to = args.report_to or []
        report_to = {str(r).lower() for r in ([report_to] if isinstance(report_to, str) else report_to)}
        wanted = report_to | requested_names(self.controller.tracker_spec)
        guard = self.controller.guard
        found = []
        if "wandb" in wanted:   # named but not in report_to: the tracker starts its own run
            found.append(guard("attaching to wandb", active_wandb_tracker, HF_STEP_METRIC,
                               required="wandb" not in report_to))
        if "mlflow" in wanted:  # no active run: a named "mlflow" gets its own store (controller)
            found.append(guard("attaching to mlflow", active_mlflow_tracker))
        log_dir = _tensorboard_dir(args) if "tensorboard" in wanted else None
        if log_dir is not None:  # else a named "tensorboard" writes into the run folder (controller)
            from ww_callbacks.trackers.tensorboard import TensorBoardTracker

            found.append(guard("attaching to tensorboard", TensorBoardTracker, log_dir=log_dir))
        return [t for t in found if t is not None]

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from ww_callbacks.torch_utils import tied_head_layers

        zero, step = bool(state.is_world_process_zero), int(state.global_step or 0)
        self._bind(kwargs)
        self._check_actions(args)
        # an input embedding tied to lm_head is the output head too: never freeze it. LR factors
        # live in the optimizer's param groups and the scheduler's base_lrs (restored by HF).
        tied = tied_head_layers(self._model) if self._model is not None else ()
        self.controller.start_actions(protect=tied)
        total_epochs = getattr(state, "num_train_epochs", None) or getattr(args, "num_train_epochs", None)
        self.controller.configure(total_steps=state.max_steps, total_epochs=total_epochs,
                                  trackers=self._trackers(args) if zero else [],
                                  is_global_zero=zero, current_step=step,
                                  base_dir=os.path.join(args.output_dir or ".", "ww-output"),
                                  world_size=int(getattr(args, "world_size", 1) or 1),
                                  step_metric=HF_STEP_METRIC, model=self._model)
        self._start_prefix_cache(kwargs.get("train_dataloader"))

    def _start_prefix_cache(self, loader: Any) -> None:
        """``Freeze(cache=...)``: key the model's training forwards; ``"auto"`` inspects the data."""
        from ww_callbacks.prefix_cache_setup import start_prefix_cache

        self._close_prefix_cache()
        if self._model is None or not getattr(self.controller.action_set.freeze, "cache", False):
            return
        self.prefix_cache = start_prefix_cache(self._model, self.controller.action_set.freeze,
                                               self.controller.output_dir, loader=loader,
                                               log_fn=self.controller.log)
        if self.prefix_cache is not None:
            self.prefix_cache.hook_inputs(self._model)

    def _close_prefix_cache(self) -> None:
        if self.prefix_cache is not None and self.prefix_cache.close():
            self.controller.log(self.prefix_cache.summary())

    @override
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._run(state, control, kwargs, epoch_end=False)

    @override
    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._run(state, control, kwargs, epoch_end=True)

    @override
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_prefix_cache()
        self.controller.finish(kwargs.get("model"), step=int(state.global_step),
                               epoch=_epoch_index(state))


def create_layer_optimizer(trainer: Any, layers: Any = None) -> Any:
    """Give ``trainer`` an optimizer with one named param group per analysable layer.

    Needed for ``balance_lr=True``: the Trainer's default optimizer has two unnamed groups
    (decay / no decay) that per-layer factors cannot address. Call it after building the Trainer
    and before ``train()`` (and again on a new Trainer when resuming); the Trainer keeps it and
    still creates its default scheduler over all groups. The optimizer class and arguments are
    the Trainer's own (``args.optim``, ``learning_rate``, ...), and each layer keeps HF's
    weight-decay split (two groups of the same ``name``).

    Args:
        trainer: a ``transformers.Trainer`` (not yet trained).
        layers: regex(es) restricting the layers that get their own groups.

    Returns:
        The optimizer (also set as ``trainer.optimizer``).

    Example (run by ``tests/test_docstring_examples.py``)::

        trainer = Trainer(model, args, train_dataset=ds,
                          callbacks=[WeightWatcherCallback(balance_lr=True)])
        create_layer_optimizer(trainer)
        trainer.train()
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
