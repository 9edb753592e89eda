"""Which trackers a run logs to: the ``trackers=`` argument, checked and resolved.

``"auto"`` means the framework's own loggers that the adapter found (plus the local record);
names use the adapter's tracker of that name when there is one, else a tracker created here with
its files under the output folder; :class:`~ww_callbacks.trackers.base.Tracker` instances are
used as they are. The live-run finders (:func:`active_wandb_tracker`,
:func:`active_mlflow_tracker`) are shared by the adapters whose frameworks keep the run in a
global (the Hugging Face Trainer's integrations, Keras).

Example:
    >>> check_tracker_spec(["local", "WandB"])
    ['local', 'wandb']
    >>> check_tracker_spec(None) is None
    True
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from ww_callbacks.trackers import TRACKERS, make_tracker
from ww_callbacks.trackers.base import Tracker
from ww_callbacks.warnings import warn

__all__ = ["check_tracker_spec", "build_trackers", "active_wandb_tracker",
           "active_mlflow_tracker"]

log = logging.getLogger("ww_callbacks")

TrackerSpec = Union[str, Sequence[Union[str, Tracker]], None]


def check_tracker_spec(trackers: TrackerSpec) -> Union[str, List[Any], None]:
    """Validate ``trackers=`` up front: ``"auto"``, ``None`` (no trackers at all), or a list of
    lower-case names and instances.

    Raises:
        ValueError: an unknown name, or an item that is neither a name nor a tracker.
    """
    if trackers is None:
        return None
    if isinstance(trackers, str):
        if trackers == "auto":
            return "auto"
        trackers = [trackers]
    if isinstance(trackers, Tracker):
        trackers = [trackers]
    try:
        items = list(trackers)
    except TypeError:
        raise ValueError(f"trackers must be 'auto', None or a list, got {trackers!r}") from None
    for item in items:
        if isinstance(item, str):
            if item.lower() not in TRACKERS:
                raise ValueError(f"unknown tracker {item!r}; known: {sorted(TRACKERS)}")
        elif not callable(getattr(item, "log_analysis", None)):
            raise ValueError(f"tracker {item!r} is neither a name nor a Tracker (no log_analysis)")
    return [i.lower() if isinstance(i, str) else i for i in items]


def requested_names(spec: Union[str, List[Any]]) -> set:
    """The tracker names ``spec`` asks for explicitly (none for ``"auto"``)."""
    return set() if spec in ("auto", None) else {t for t in spec if isinstance(t, str)}


def _own_tracker(name: str, output_dir: Optional[str]) -> Tracker:
    """A tracker the trainer did not provide: its files go under ``output_dir``."""
    kwargs: Dict[str, Any] = {}
    if output_dir is not None:
        if name == "tensorboard":
            kwargs["log_dir"] = os.path.join(output_dir, "tensorboard")
        elif name == "mlflow":
            kwargs["tracking_uri"] = "sqlite:///" + os.path.abspath(os.path.join(output_dir, "mlflow.db"))
    return make_tracker(name, **kwargs)


def build_trackers(spec: Union[str, List[Any], None], framework: Sequence[Tracker],
                   output_dir: Optional[str], guard: Callable[..., Any],
                   log_fn: Callable[[str], Any], strict: bool = False,
                   local_record: bool = True, step_metric: Optional[str] = None) -> List[Tracker]:
    """The trackers of a run, in order.

    Args:
        spec: the checked ``trackers=`` argument (:func:`check_tracker_spec`).
        framework: trackers the adapter made from the trainer's own loggers.
        output_dir: folder of the local record and of trackers created here (``None``: no
            local record).
        guard: ``guard(what, fn, *args)`` runs ``fn`` and reports its error once (a tracker
            that fails at creation is left out; the others and the local record continue).
        log_fn: where the local tracker reports its own problems.
        strict: passed to the local tracker.
        local_record: add the local record to ``"auto"`` and to a list (``spec`` ``None``: no
            trackers at all).
        step_metric: the framework's x-axis key, set on each tracker whose ``step_metric`` is
            unset (``None``).
    """
    if spec is None:
        return []
    named = spec != "auto"
    explicit_local = named and "local" in spec
    if not named:
        spec = list(framework)
    if local_record and "local" not in spec:
        spec = list(spec) + ["local"]
    by_name = {getattr(t, "name", None): t for t in framework}
    out: List[Tracker] = []
    for item in spec:
        if not isinstance(item, str):
            out.append(item)
        elif item == "local":
            if output_dir is None and named and explicit_local:
                warn("trackers=[..., 'local', ...] with output_dir=MEMORY_ONLY: the local record "
                     "needs a folder and is left out", stacklevel=4)
            if output_dir is not None:
                from ww_callbacks.trackers.local import LocalTracker

                out.append(LocalTracker(output_dir, log_fn=log_fn, strict=strict))
        elif item in by_name:
            out.append(by_name[item])
        else:
            tracker = guard(f"creating the {item!r} tracker", _own_tracker, item, output_dir)
            if tracker is not None:
                out.append(tracker)
    for tracker in out:
        if step_metric and getattr(tracker, "step_metric", "") is None:
            tracker.step_metric = step_metric
    return out


def active_wandb_tracker(step_metric: str, required: bool = False) -> Optional[Tracker]:
    """A W&B tracker on the active ``wandb.run``.

    Args:
        step_metric: the x-axis key the framework logs (e.g. ``train/global_step``).
        required: make a tracker even without an active run (it starts its own run).

    Returns:
        The tracker, or ``None`` when wandb is not installed or no run is active and not
        ``required``.
    """
    try:
        import wandb
    except ImportError:
        return None
    if wandb.run is None and not required:
        return None
    from ww_callbacks.trackers.wandb import WandbTracker

    return WandbTracker(run=wandb.run, step_metric=step_metric)


def active_mlflow_tracker() -> Optional[Tracker]:
    """An MLflow tracker on the active MLflow run, or ``None`` (no mlflow or no active run)."""
    try:
        import mlflow
    except ImportError:
        return None
    active = mlflow.active_run()
    if active is None:
        return None
    from ww_callbacks.trackers.mlflow import MLflowTracker

    return MLflowTracker(mlflow.MlflowClient(), active.info.run_id)
