"""How the controller records an analysis: history rows, summary, trackers, log line, actions.

:class:`Recording` is a part of :class:`~ww_callbacks.controller.WeightWatcherController` (its
base class): the controller schedules and starts analyses, these methods record them. Nothing
here knows a training framework.
"""

from __future__ import annotations

import time
from typing import Any, Dict

from ww_callbacks.executor import Finished
from ww_callbacks.reporting import format_line
from ww_callbacks.trackers.base import summary_scalars

__all__ = ["Recording"]


class Recording:
    """The recording half of the controller (uses its history, trackers, budget, actions)."""

    def _record(self, done: Finished) -> Any:
        """Record and fan out one analysis, charging its cost and the record's to the budget;
        never raises into training unless ``strict``."""
        self.budget.charge(done.work_seconds + done.copy_seconds, done.num_layers)
        if done.error is not None:
            self.report("analysis", done.failure(), done.error)
            return None
        clock = self.budget.process_clock
        t0 = clock()
        try:
            return self._record_result(done.result, done.step, done.epoch, done.started,
                                       done.hook_seconds)
        except Exception as exc:
            self.report("recording", f"recording the analysis of step {done.step} failed", exc)
            return None
        finally:
            self.budget.charge(clock() - t0, analysis=False)

    def _record_result(self, result: Any, step: int, epoch: int, started: float,
                       hook: float) -> Any:
        self.num_analyses += 1
        self.last_result = result
        self.rotation.observe(result)
        rows = [{"step": step, "epoch": epoch, "time": started, **rec} for rec in result.to_records()]
        self.guard("writing the history files", self.history.append, rows)
        summary = dict(self.guard("summarising", result.summary) or {})
        summary.update(hook_seconds=hook, analysis_seconds=time.time() - started,
                       overhead=self.budget.share())
        drift = self.guard("comparing with the reference", self.drift.measure, result) \
            if self.drift is not None else None
        if drift is not None:
            summary.update(drift.scalars())
        if self.action_set.freeze_policy.enabled:
            summary["num_frozen"] = len(self.action_set.freeze_policy.frozen)
        #: ``{summary key: value}`` of the latest analysis, on every rank (adapters publish it).
        self.last_scalars = self.guard("summarising", summary_scalars, rows, summary) or {}
        self.last_scalars_step = step
        if self.is_global_zero:
            self._fan_out(self.trackers, f"at step {step}", "log_analysis", step=step, epoch=epoch,
                          rows=rows, summary=summary, result=result, history=self.history.rows)
            self.log(format_line(result, step, epoch) + f" [training waited {hook:.3f} s; "
                     f"{self.budget.describe()}]")
        if drift is not None and (drift.newly_flagged or drift.regressions):
            self.log_event(step, "drift", drift.to_dict())
        for action in self.actions:
            name = type(action).__name__
            self.guard(f"action {name}", action.on_analysis, self, result, step, epoch)
        # the run folder's state file: its disk is the history's (one report for both)
        self.guard("writing the history files", self.state.write)
        return result

    def log_event(self, step: int, kind: str, payload: Dict[str, Any]) -> None:
        """Report an action's event (freeze, LR factors, stop) to the log and the trackers."""
        if not self.is_global_zero:
            return
        self.log(f"ww step {step}: {kind} {payload}")
        self.guard("writing the decisions file", self.history.append_decision, step, kind, payload)
        self._fan_out(self.trackers, f"on event {kind!r}", "log_event", step=step, kind=kind,
                      payload=payload)
