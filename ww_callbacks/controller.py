"""The framework-free controller behind every adapter (Lightning, Hugging Face, Keras).

It owns the schedule, the weight snapshot, the call into :func:`ww_core.analyze`, the history,
the tracker fan-out and the actions (freeze, TempBalance, early stop). Adapters only translate
their framework's hooks into :meth:`~WeightWatcherController.configure`,
:meth:`~WeightWatcherController.maybe_run` and :meth:`~WeightWatcherController.finish`, and give
the actions their framework functions with :meth:`~WeightWatcherController.bind_actions`. It is
also usable on its own, in a plain training loop (``examples/plain_pytorch_loop.py``).

``step`` is the number of optimizer steps done (the trainer's global step) and ``epoch`` the
0-based epoch those weights belong to.

Ranks: every rank that calls :meth:`~WeightWatcherController.run` analyses (sharded across the
ranks when a process group is up, :mod:`ww_callbacks.executor`), so every rank takes the same
decisions; only global rank 0 writes files, calls trackers and logs. Errors of the analysis, a
tracker or an action are reported once per kind and training continues
(:mod:`ww_callbacks.reporting`). See ``docs/reliability.md``.

Example:
    >>> import numpy as np
    >>> weights = {"fc.weight": np.random.default_rng(0).standard_normal((200, 100))}
    >>> with WeightWatcherController(every_n_steps=10, start_fraction=0, output_dir=MEMORY_ONLY,
    ...                              trackers=None, log_fn=lambda line: None,
    ...                              async_analysis=False) as ww:  # exact steps below
    ...     ww.configure(total_steps=30)
    ...     for step in range(1, 31):
    ...         _ = ww.maybe_run(weights, step=step, epoch=0)
    >>> ww.history.steps
    [10, 20, 30]
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from ww_callbacks.actions.binding import ActionBinding
from ww_callbacks.actions.build import ActionSet
from ww_callbacks.budget import OverheadBudget, check_max_overhead
from ww_callbacks.distributed import rank_info
from ww_callbacks.drift import DriftMonitor
from ww_callbacks.executor import AnalysisExecutor, check_analyze_options
from ww_callbacks.history import History
from ww_callbacks.recording import AnalysisRecorder
from ww_callbacks.reporting import ErrorReporter, format_line
from ww_callbacks.rotation import LayerRotation, early_freeze_layers, plan_analysis
from ww_callbacks.run_dir import AUTO, KEEP, MEMORY_ONLY, check_output_dir, run_folder  # noqa: F401
from ww_callbacks.schedule import Schedule, early_schedule
from ww_callbacks.settings import BalanceLR, EarlyStop, Freeze
from ww_callbacks.state import RunState, StateField, delegate
from ww_callbacks.trackers.base import Tracker
from ww_callbacks.trackers.fanout import DEFAULT_TIMEOUT, TrackerFanout
from ww_callbacks.trackers.resolve import build_trackers, check_tracker_spec
from ww_callbacks.warnings import warn

__all__ = ["WeightWatcherController", "MEMORY_ONLY"]


class WeightWatcherController:
    """Schedules spectral analyses during training, records them and acts on them.

    Args:
        start_fraction: share of the planned training after which analyses start (default 0.5;
            see :class:`~ww_callbacks.schedule.Schedule` for when the length is unknown).
        every_n_epochs: analyse at the end of every n-th epoch (default 1 without
            ``every_n_steps``).
        every_n_steps: analyse every n optimizer steps instead.
        layers: regex or list of regexes selecting layers by name (``ww_core.analyze``).
        output_dir: folder of ``history.jsonl``/``history.csv`` and the local report. Omitted:
            a new folder per run, ``<base>/<run id or start time>`` (:mod:`ww_callbacks.run_dir`;
            ``base`` is the trainer's folder, else ``ww-output``); a path: that folder;
            ``MEMORY_ONLY`` (``False``): the history in memory only, no files, no local record.
        trackers: ``"auto"`` (the framework's loggers the adapter found), a list of names
            (``"wandb"``, ``"mlflow"``, ``"tensorboard"``) and ``Tracker`` instances, or ``None``
            (no trackers at all, not even the local record).
        local_record: add the local record (``report.html`` in ``output_dir``) to ``"auto"``
            or a ``trackers`` list (default ``True``; ``False`` drops it).
        log_fn: where the per-analysis line and error reports go (default: the
            ``ww_callbacks`` logger at INFO).
        strict: re-raise errors of the analysis, trackers and actions instead of reporting them.
        freeze, balance_lr, early_stop: each ``None``/``False``/``"off"`` (default),
            ``"suggest"`` (decide and log only), ``True``/``"apply"``, or its settings object
            with the options (:mod:`ww_callbacks.settings`). ``"apply"`` needs the framework
            function (``bind_actions(freeze_fn=..., lr_fn=..., stop_fn=...)``; the adapters bind
            them). :attr:`stop_reason` says why early stopping stopped.
        actions: further objects with ``on_analysis(controller, result, step, epoch)``, called
            after the built-in ones, on every rank, in order.
        analyze_fn: replaces :func:`ww_core.analyze` (testing, custom engines).
        async_analysis: ``True`` copies the weights at the hook and analyses the copy in a
            background thread (training waits only for the copy; at most one analysis in
            flight, one falling due meanwhile is skipped and counted in
            :attr:`skipped_analyses`). ``"auto"`` (default): ``True`` for a single process with
            the default engine, else ``False`` (ranks must decide at the same step).
        analyze_frozen: ``"once"`` (default): frozen layers (``requires_grad=False``, e.g. the
            base of a LoRA model or a frozen backbone) are analysed at the first analysis only,
            as a baseline, then only what trains; ``"always"``; ``"never"``. On a PEFT model the
            adapters' updates ``B·A`` are what is analysed (``peft=True``, unless given).
        snapshot_budget: bytes the background copy of the weights may take (``"auto"``: the
            smaller of 2 GB and 10 % of the device's memory; ``None``: no limit); beyond it the
            analysis runs synchronously, one layer at a time (:func:`ww_core.snapshot`'s ``budget``).
        tracker_timeout: seconds a tracker call may take before the tracker is dropped (each
            tracker runs in its own thread, :mod:`ww_callbacks.trackers.fanout`); ``None`` waits.
        max_overhead: the share of the training's time the analyses and their record may take
            (``0.05``: 5 %; CPU time on a CPU, wall time on a GPU); analyses falling due beyond
            it are skipped. ``None`` (default): no cap. Either way the realised share is
            reported (``overhead``). An :class:`~ww_callbacks.budget.OverheadBudget` sets its
            clock and the background thread's priority.
        layers_per_analysis: ``k``: each analysis covers ``k`` layers in a deterministic
            rotation that visits every layer within ``ceil(n / k)`` analyses
            (:mod:`ww_callbacks.rotation`); ``None`` (default): every layer each time.
        reference: a baseline to compare each analysis with (drift): the pretrained model (analysed
            once, here, before training changes it), a saved analysis (``.json``), a weights path
            or an :class:`~ww_core.AnalysisResult`. Each analysis then logs ``drift_*`` summary
            keys and a ``drift`` event naming newly flagged or regressed layers
            (:mod:`ww_callbacks.drift`). ``None`` (default): no comparison.
        **analyze_options: passed to ``ww_core.analyze`` (``min_evals``, ``fix_fingers``, ...).

    Raises:
        ValueError: an invalid argument or option (checked here, before training starts).
    """

    def __init__(self, start_fraction: float = 0.5, every_n_epochs: Optional[int] = None,
                 every_n_steps: Optional[int] = None,
                 layers: Union[None, str, Sequence[str]] = None,
                 output_dir: Union[str, os.PathLike, bool] = AUTO,
                 trackers: Union[str, Sequence[Union[str, Tracker]], None] = "auto",
                 local_record: bool = True,
                 log_fn: Optional[Callable[[str], Any]] = None, strict: bool = False,
                 freeze: Union[str, bool, None, Freeze] = "off",
                 balance_lr: Union[str, bool, None, BalanceLR] = "off",
                 early_stop: Union[str, bool, None, EarlyStop] = "off",
                 actions: Optional[Sequence[Any]] = None,
                 analyze_fn: Optional[Callable[..., Any]] = None,
                 async_analysis: Union[bool, str] = "auto", analyze_frozen: str = "once",
                 snapshot_budget: Any = "auto", tracker_timeout: Optional[float] = DEFAULT_TIMEOUT,
                 max_overhead: Union[None, float, OverheadBudget] = None,
                 layers_per_analysis: Optional[int] = None, reference: Any = None,
                 **analyze_options: Any) -> None:
        from ww_core import check_layer_patterns

        if async_analysis not in (True, False, "auto"):
            raise ValueError(f"async_analysis must be True, False or 'auto', got {async_analysis!r}")
        self.async_analysis = async_analysis
        self.schedule = Schedule(start_fraction, every_n_epochs, every_n_steps)
        #: Auto-freeze's analyses before :attr:`schedule` starts (``Freeze(start_fraction=...)``).
        self.early_schedule: Optional[Schedule] = None
        self.layers = check_layer_patterns(layers)
        named_dir = check_output_dir(output_dir)
        self.tracker_spec = check_tracker_spec(trackers)
        if not isinstance(local_record, bool):
            raise ValueError(f"local_record must be True or False, got {local_record!r}")
        if not local_record and isinstance(self.tracker_spec, list) and "local" in self.tracker_spec:
            raise ValueError("trackers=[..., 'local', ...] with local_record=False: drop one of them")
        self.local_record = local_record
        self.reporter = ErrorReporter(log_fn, strict)
        self._fan_out = TrackerFanout(self.report, tracker_timeout, self.reporter.strict)
        self.action_set = ActionSet(freeze, balance_lr, early_stop)
        self.binding = ActionBinding(self.action_set, actions, self.guard)
        if analyze_fn is not None and not callable(analyze_fn):
            raise ValueError(f"analyze_fn must be callable, got {analyze_fn!r}")
        check_analyze_options(analyze_fn, analyze_options)
        if analyze_frozen not in ("once", "always", "never"):
            raise ValueError(f"analyze_frozen must be 'once', 'always' or 'never', got {analyze_frozen!r}")
        self.analyze_frozen = analyze_frozen
        self.executor = AnalysisExecutor(analyze_fn, self.layers, analyze_options, snapshot_budget)
        #: The overhead budget (:mod:`ww_callbacks.budget`) and the layer rotation.
        self.budget = check_max_overhead(max_overhead)
        self.rotation = LayerRotation(layers_per_analysis)
        self.drift = None if reference is None else DriftMonitor(
            reference, analyze_options={"layers": self.layers, **analyze_options})

        self.history = History(named_dir, write=True)
        self.state = RunState(self.history, self.schedule, self.action_set, self.executor,
                              named_dir, output_dir is AUTO, self.log, self.guard,
                              parts={"rotation": self.rotation, "budget": self.budget})
        self.trackers: List[Tracker] = []
        #: Records each finished analysis (:mod:`ww_callbacks.recording`).
        self.recorder = AnalysisRecorder(self.history, self.state, self.budget, self.rotation,
                                         self.drift, self.action_set, self.reporter,
                                         self._fan_out, self.log)
        #: Analyses that fell due while another was still running (async mode), not run.
        self.skipped_analyses = 0
        #: Seconds the training loop waited inside the controller (the whole analysis when
        #: synchronous, only the weight copy and any final wait when asynchronous).
        self.blocking_seconds = 0.0
        self._keep_evals = False
        self._last_seen: Optional[tuple] = None  # (model, step, epoch) of the last maybe_run

    format_line = staticmethod(format_line)

    # ------------------------------------------------------------------ parts' attributes
    last_step = StateField("state", "The last step analysed (or attempted), else ``None``.")
    num_analyses = StateField("state", "Analyses recorded so far.")
    output_dir = StateField("state", "The run's folder (``None``: history in memory only).")
    per_run = StateField("state", "Whether :attr:`output_dir` is a per-run folder chosen in "
                         ":meth:`configure`.", readonly=True)
    is_global_zero = StateField("state", "Whether this process writes files, calls trackers, logs.")
    configured = StateField("state", "Whether :meth:`configure` ran.")
    finished = StateField("state", "Whether the run was closed.")
    stop_reason = StateField("binding", "Why early stopping asked to stop (``None`` while it has not).")
    frozen_layers = StateField("binding", "Layers frozen or suggested so far.", readonly=True)
    lr_factors = StateField("binding", "The latest TempBalance factors.", readonly=True)
    actions = StateField("binding", "The actions called after each analysis: built-in (freeze, LR, "
                         "stop), then ``actions=``.", readonly=True)
    extra_actions = StateField("binding", readonly=True)
    last_result = StateField("recorder", "The latest recorded ``AnalysisResult``, else ``None``.")
    last_scalars = StateField("recorder", "``{summary key: value}`` of the latest analysis (all ranks).")
    last_scalars_step = StateField("recorder", "The step :attr:`last_scalars` come from, else ``None``.")
    strict = StateField("reporter", "Whether errors are re-raised.", readonly=True)
    log_fn = StateField("reporter", "Where lines go.", readonly=True)
    asynchronous = StateField("executor", "Whether analyses run in the background (decided in "
                              ":meth:`configure`).", readonly=True)
    analyze_options = StateField("executor", "``ww_core.analyze`` options.", readonly=True, attr="options")
    pending = StateField("executor", "Whether a background analysis is still to be recorded.",
                         readonly=True, attr="busy")

    sharded = property(lambda self: self.executor.group is not None,
                       doc="Whether analyses are sharded across the ranks of a process group.")

    bind_actions = delegate("binding", ActionBinding.bind)
    start_actions = delegate("binding", ActionBinding.start)
    state_dict = delegate("state", RunState.state_dict)
    load_state_dict = delegate("state", RunState.load_state_dict)
    save_state = delegate("state", RunState.save_state)
    load_state = delegate("state", RunState.load_state)
    published_scalars = delegate("recorder", AnalysisRecorder.published_scalars)

    guard = delegate("reporter", ErrorReporter.guard)
    report = delegate("reporter", ErrorReporter.report)

    def misconfigured(self, message: Optional[str], stacklevel: int = 2) -> None:
        """``message`` as a ``WeightWatcherWarning`` and a ``ww:`` log line (rank 0; if not empty)."""
        if message and self.is_global_zero:
            warn(message, stacklevel=stacklevel)
            self.reporter.log(f"ww: {message}")

    def log(self, message: str) -> None:
        """One line to ``log_fn`` (rank 0 only)."""
        if self.is_global_zero:
            self.reporter.log(message)

    def log_event(self, step: int, kind: str, payload: Dict[str, Any]) -> None:
        """Report an action's event (freeze, LR factors, stop) to the log and the trackers."""
        self.recorder.log_event(step, kind, payload, self.trackers)

    # ------------------------------------------------------------------ setup
    def configure(self, total_steps: Any = None, total_epochs: Any = None,
                  trackers: Optional[Sequence[Tracker]] = None,
                  is_global_zero: Optional[bool] = None, current_step: Optional[int] = None,
                  output_dir: Union[str, os.PathLike, bool] = KEEP,
                  world_size: Optional[int] = None, base_dir: Optional[str] = None,
                  wrapper: Any = None, step_metric: Optional[str] = None, model: Any = None) -> None:
        """Tell the controller the training plan; call once the trainer knows it, on every rank.

        Args:
            total_steps: planned optimizer steps (``None``/``-1``/``inf`` if unknown).
            total_epochs: planned epochs (``None``/``-1`` if unknown).
            trackers: the framework's own trackers found by the adapter (used by ``"auto"`` and
                by names in ``trackers``); only needed on global rank 0.
            is_global_zero: whether this process writes files, calls trackers and logs
                (default: detected, :func:`ww_callbacks.distributed.rank_info`).
            current_step: the trainer's global step now (all an adapter says about a resume;
                :meth:`RunState.resume`). ``0``/``None`` with no state loaded starts afresh.
            model: the model as the framework restored it; an analysis due at
                ``current_step`` that a crash lost is redone from it here, synchronously.
            output_dir: overrides the constructor's ``output_dir`` (a path or ``MEMORY_ONLY``;
                omitted: ``KEEP``, no override).
            base_dir: where the per-run folder goes when no ``output_dir`` was named (adapters
                pass a folder of the trainer; default ``ww-output``).
            world_size: number of training processes (default: detected). Above 1,
                ``async_analysis="auto"`` is synchronous and the default engine shards the
                layers over the ranks (``new_group`` is a collective: every rank must call this).
            wrapper: the framework's wrapper of the model its hooks pass (Lightning:
                ``trainer.strategy.model``); a sharded (FSDP1) model is gathered from it.
            step_metric: the x-axis key the framework logs (``trainer/global_step``...); set on
                every tracker whose ``step_metric`` the user left unset (``None``).

        Raises:
            ValueError: an ``apply`` action without its framework function.
        """
        zero, world = rank_info()
        is_global_zero = zero if is_global_zero is None else bool(is_global_zero)
        world_size = world if world_size is None else int(world_size)
        if not self.binding.bound:
            self.bind_actions()
        self.executor.configure(world_size, (world_size == 1 and self.executor.default_engine)
                                if self.async_analysis == "auto" else bool(self.async_analysis), wrapper)
        self.budget.start()
        if output_dir is not KEEP:
            self.output_dir, self.state.per_run = check_output_dir(output_dir), False
        elif self.per_run:
            # the folder a loaded state points to, else the latest (resume) or a new one
            self.output_dir = self.history.output_dir or run_folder(base_dir or "ww-output",
                                                                    current_step, trackers or ())
        self.history.output_dir = self.output_dir
        self.state.is_global_zero = self.reporter.is_global_zero = self.history.write = is_global_zero
        self.misconfigured(self.schedule.configure(total_steps, total_epochs), stacklevel=3)
        freeze = self.action_set.freeze
        self.early_schedule = early_schedule(self.schedule, freeze.start_fraction if freeze.enabled else None)
        if current_step is not None:   # re-freeze what a state read from the file froze
            self.state.resume(int(current_step), reapply=self.binding.start)
        self.trackers = (build_trackers(self.tracker_spec, list(trackers or ()), self.output_dir,
                                        self.guard, self.reporter.log, self.strict, self.local_record,
                                        step_metric) if is_global_zero else [])
        self._keep_evals = any(getattr(t, "wants_evals", False) for t in self.trackers)
        # only rank 0 has trackers, but a sharded analysis needs the same options everywhere
        self._keep_evals = bool(self.executor.broadcast(self._keep_evals))
        if is_global_zero:
            self.guard("writing the history files", self.history.sync)
        self.configured = True
        self.finished = False
        redo, self.state.redo = self.executor.broadcast(self.state.redo), None
        if redo is not None and model is not None:
            self.log(f"ww: step {redo[0]} was not recorded when the run stopped: analysing it now")
            self._run_now(model, *redo)       # recorded before training moves the weights

    # ------------------------------------------------------------------ scheduling
    def should_run(self, step: int, epoch: int, epoch_end: bool = False) -> bool:
        """Whether an analysis is due at this point (and this step was not analysed yet)."""
        if self.finished:
            return False
        if not self.configured:
            self.misconfigured("configure() was not called; assuming an unknown training length",
                               stacklevel=4)
            self.configure()
        if self.last_step is not None and step <= self.last_step:
            return False
        return self.schedule.should_run(step, epoch, epoch_end) or (
            self.early_schedule is not None and self.early_schedule.should_run(step, epoch, epoch_end))

    def maybe_run(self, model: Any, step: int, epoch: int, epoch_end: bool = False) -> Any:
        """The hook call: record a finished background analysis, then analyse if one is due.

        Call it after every optimizer step (``epoch_end=False``) and at every epoch end
        (``epoch_end=True``); the schedule picks the calls that count.

        Returns:
            The result recorded during this call (a synchronous analysis, or a background one
            that finished), else ``None``.
        """
        self._last_seen = (model, int(step), int(epoch))
        recorded = self.poll()
        if self.schedule.mode == ("epochs" if epoch_end else "steps") \
                and self.should_run(step=step, epoch=epoch, epoch_end=epoch_end):
            result = self.run(model, step=step, epoch=epoch)
            recorded = result if result is not None else recorded
        return recorded

    # ------------------------------------------------------------------ analysis
    @property
    def wants_evals(self) -> bool:
        """Whether eigenvalues are kept (an option asks for it or a tracker draws ESDs)."""
        return bool(self.analyze_options.get("keep_evals", False)) or self._keep_evals

    def snapshot(self, model: Any) -> Any:
        """What the engine analyses (:meth:`AnalysisExecutor.snapshot`)."""
        return self.executor.snapshot(model)

    def run(self, model: Any, step: int, epoch: int) -> Any:
        """Analyse ``model`` now; record, fan out, log and call the actions.

        Returns:
            The ``AnalysisResult`` when synchronous; ``None`` when this step was analysed
            already, the analysis failed (reported once unless ``strict``) or it runs in the
            background (recorded by a later :meth:`poll`).
        """
        step, epoch = int(step), int(epoch)
        self.poll()
        if self.last_step is not None and step <= self.last_step:
            return None
        if self.asynchronous and self.executor.busy:
            self.skipped_analyses += 1
            self.log(f"ww step {step}: previous analysis still running, skipped this one "
                     f"({self.skipped_analyses} skipped so far)")
            return None
        admit = self.budget.admit(self.executor, model, step, self.rotation.per_analysis, self.log)
        if not self.executor.broadcast(admit):   # sharded: every rank follows rank 0's clock
            return None
        t0 = time.perf_counter()
        sources = [self.action_set.freeze_policy, self.action_set.lr_policy, self.action_set.stop_policy,
                   *self.actions]
        plan, names = plan_analysis(self.rotation, self.executor, model, self.analyze_frozen,
                                    self.num_analyses == 0, sources)
        if self.early_schedule is not None and not self.schedule.started(step, epoch):
            # before the observation starts, only what auto-freeze judges next (``[]``: nothing)
            names = early_freeze_layers(self.action_set.freeze_policy, self.executor, model, plan, names)
            if names == []:
                return None
        self.last_step, self.state.started = step, (step, epoch)
        done = self.executor.start(model, step, epoch, keep_evals=self.wants_evals, plan=plan,
                                   layers=names)
        if done is None:                         # submitted: training waited for the copy only
            self.blocking_seconds += time.perf_counter() - t0
            self.guard("writing the history files", self.state.write)   # a crash now: redone on resume
            return None
        self.blocking_seconds += done.hook_seconds
        if done.fallback:
            self.report("snapshot budget", f"step {step}", MemoryError(done.fallback))
        return self.recorder.record(done, self, self.trackers, self.actions)

    def _run_now(self, model: Any, step: int, epoch: int) -> Any:
        """:meth:`run`, synchronously."""
        was_async, self.executor.asynchronous = self.asynchronous, False
        try:
            return self.run(model, step=step, epoch=epoch)
        finally:
            self.executor.asynchronous = was_async

    def poll(self, wait: bool = False) -> Any:
        """Record a finished background analysis, if any (``wait=True`` waits for it).

        Costs nothing when none is pending. Returns the result recorded now, or ``None``.
        """
        done = self.executor.collect(wait=wait)
        if done is None:
            return None
        self.blocking_seconds += done.waited      # training waited here too: count it
        return self.recorder.record(done, self, self.trackers, self.actions)

    # ------------------------------------------------------------------ end of training
    def finish(self, model: Any, step: int, epoch: int) -> Any:
        """Final analysis at the end of training (unless this step was analysed), then close."""
        if self.finished:
            return None
        if not self.configured:
            self.configure(is_global_zero=self.is_global_zero)
        self.poll(wait=True)
        result = None
        if model is not None and (self.last_step is None or step > self.last_step):
            result = self._run_now(model, step, epoch)    # nothing to overlap
        # auto-freeze that did nothing says why, once (the reason is something the user can change)
        policy = self.action_set.freeze_policy
        if policy.enabled:
            self.misconfigured(self.guard("explaining the freeze policy", policy.why_nothing_froze))
        self.close()
        return result

    def close(self) -> None:
        """Wait for a background analysis, close the trackers (each once); safe to repeat."""
        if self.finished:
            return
        self.finished = True
        self.guard("waiting for the background analysis", self.poll, True)
        self.executor.shutdown()
        self._fan_out.close(self.trackers)

    def __enter__(self) -> "WeightWatcherController":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        # a loop that ended normally gets its final analysis; one that raised is only closed
        if exc_type is None and self._last_seen is not None:
            self.finish(*self._last_seen)
        else:
            self.close()
        return False

    def __repr__(self) -> str:
        return (f"WeightWatcherController({self.schedule!r}, layers={self.layers!r}, "
                f"output_dir={self.output_dir!r}, analyses={self.num_analyses})")

