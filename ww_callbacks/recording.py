"""How an analysis is recorded: history rows, summary, trackers, log line, actions.

:class:`AnalysisRecorder` is a part the controller owns (``controller.recorder``): the
controller schedules and starts analyses, the recorder records each finished one with the parts
it is given. Nothing here knows a training framework.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Sequence

from ww_callbacks.executor import Finished
from ww_callbacks.reporting import ErrorReporter, format_line
from ww_callbacks.trackers.base import Tracker, summary_scalars

__all__ = ["AnalysisRecorder"]


class AnalysisRecorder:
    """Records finished analyses and actions' events; keeps the latest result and its scalars.

    Args:
        history: the run's :class:`~ww_callbacks.history.History`.
        state: the run's :class:`~ww_callbacks.state.RunState` (analysis count, rank, state file).
        budget: the :class:`~ww_callbacks.budget.OverheadBudget` charged with each analysis and
            its record.
        rotation: the :class:`~ww_callbacks.rotation.LayerRotation` told what each analysis saw.
        drift: the :class:`~ww_callbacks.drift.DriftMonitor`, or ``None``.
        action_set: the built-in actions' :class:`~ww_callbacks.actions.build.ActionSet`.
        reporter: the :class:`~ww_callbacks.reporting.ErrorReporter` (guarded calls, reports).
        fan_out: the :class:`~ww_callbacks.trackers.fanout.TrackerFanout` calling the trackers.
        log: the controller's line logger (rank 0 only).

    The parts are fixed when the controller is built (they are the controller's own).

    Example:
        >>> from ww_callbacks import MEMORY_ONLY, WeightWatcherController
        >>> ctl = WeightWatcherController(output_dir=MEMORY_ONLY, trackers=None)
        >>> ctl.recorder.published_scalars()          # before the first analysis
        {}
    """

    def __init__(self, history: Any, state: Any, budget: Any, rotation: Any, drift: Any,
                 action_set: Any, reporter: ErrorReporter, fan_out: Any,
                 log: Callable[[str], None]) -> None:
        self.history, self.state, self.budget, self.rotation = history, state, budget, rotation
        self.drift, self.action_set, self.reporter = drift, action_set, reporter
        self.fan_out, self.log = fan_out, log
        #: The latest recorded ``AnalysisResult``.
        self.last_result: Any = None
        #: ``{summary key: value}`` of the latest analysis, on every rank (adapters publish it).
        self.last_scalars: Dict[str, float] = {}
        #: The step of the analysis :attr:`last_scalars` come from (``None`` before the first).
        self.last_scalars_step: Optional[int] = None

    def record(self, done: Finished, controller: Any, trackers: Sequence[Tracker],
               actions: Sequence[Any]) -> Any:
        """Record and fan out one analysis, charging its cost and the record's to the budget;
        never raises into training unless ``strict``. ``controller`` is what the actions'
        ``on_analysis`` receive, and what reports a drift event (``controller.log_event``).

        Returns:
            The recorded ``AnalysisResult``, or ``None`` when the analysis or its record failed.
        """
        self.budget.charge(done.work_seconds + done.copy_seconds, done.num_layers)
        if done.error is not None:
            self.reporter.report("analysis", done.failure(), done.error)
            return None
        clock = self.budget.process_clock
        t0 = clock()
        try:
            return self._record_result(done.result, done.step, done.epoch, done.started,
                                       done.hook_seconds, controller, trackers, actions)
        except Exception as exc:
            self.reporter.report("recording", f"recording the analysis of step {done.step} failed", exc)
            return None
        finally:
            self.budget.charge(clock() - t0, analysis=False)

    def _record_result(self, result: Any, step: int, epoch: int, started: float, hook: float,
                       controller: Any, trackers: Sequence[Tracker], actions: Sequence[Any]) -> Any:
        guard = self.reporter.guard
        self.state.num_analyses += 1
        self.last_result = result
        self.rotation.observe(result)
        rows = [{"step": step, "epoch": epoch, "time": started, **rec} for rec in result.to_records()]
        guard("writing the history files", self.history.append, rows)
        summary = dict(guard("summarising", result.summary) or {})
        summary.update(hook_seconds=hook, analysis_seconds=time.time() - started,
                       overhead=self.budget.share())
        drift = guard("comparing with the reference", self.drift.measure, result) \
            if self.drift is not None else None
        if drift is not None:
            summary.update(drift.scalars())
        if self.action_set.freeze_policy.enabled:
            summary["num_frozen"] = len(self.action_set.freeze_policy.frozen)
        self.last_scalars = guard("summarising", summary_scalars, rows, summary) or {}
        self.last_scalars_step = step
        if self.state.is_global_zero:
            self.fan_out(trackers, f"at step {step}", "log_analysis", step=step, epoch=epoch,
                         rows=rows, summary=summary, result=result, history=self.history.rows)
            self.log(format_line(result, step, epoch) + f" [training waited {hook:.3f} s; "
                     f"{self.budget.describe()}]")
        if drift is not None and (drift.newly_flagged or drift.regressions):
            controller.log_event(step, "drift", drift.to_dict())
        for action in actions:
            name = type(action).__name__
            guard(f"action {name}", action.on_analysis, controller, result, step, epoch)
        # the run folder's state file: its disk is the history's (one report for both)
        guard("writing the history files", self.state.write)
        return result

    def published_scalars(self) -> Dict[str, float]:
        """What an adapter writes into its trainer's per-epoch metrics (Keras' ``logs``).

        The :attr:`last_scalars` of the latest *recorded* analysis (with asynchronous analysis,
        the latest one finished, not necessarily the one started at this hook) plus
        ``analysis_step``, the step of that analysis; empty before the first one (no placeholder:
        Keras' monitors would take it as their best value).
        """
        step = self.last_scalars_step
        return {**self.last_scalars, **({"analysis_step": step} if step is not None else {})}

    def log_event(self, step: int, kind: str, payload: Dict[str, Any],
                  trackers: Sequence[Tracker]) -> None:
        """Report an action's event (freeze, LR factors, stop) to the log and the trackers."""
        if not self.state.is_global_zero:
            return
        self.log(f"ww step {step}: {kind} {payload}")
        self.reporter.guard("writing the decisions file", self.history.append_decision, step, kind,
                            payload)
        self.fan_out(trackers, f"on event {kind!r}", "log_event", step=step, kind=kind,
                     payload=payload)
