"""The framework-free controller behind every adapter (Lightning, Hugging Face, Keras).

It owns the schedule, the weight snapshot, the call into :func:`ww_core.analyze`, the history, the
tracker fan-out and the hook for actions. Adapters only translate their framework's hooks:

.. code-block:: python

    ctl = WeightWatcherController(start_fraction=0.5, every_n_epochs=1, output_dir="ww-output")
    ctl.configure(total_steps=1000, total_epochs=10, trackers=[...], is_global_zero=True,
                  current_step=0)                     # once, when the trainer knows its plan
    ...
    if ctl.should_run(step=step, epoch=epoch, epoch_end=True):   # at an epoch end
        ctl.run(model, step=step, epoch=epoch)
    ...
    ctl.finish(model, step=step, epoch=epoch)          # end of training: final analysis, close

``step`` is the number of optimizer steps done (the trainer's global step) and ``epoch`` the
0-based epoch those weights belong to.

Ranks: the analysis runs on every rank that calls :meth:`run` (weights are identical under DDP and
actions may need the result everywhere), but only global rank 0 (``is_global_zero=True``) writes
files, calls trackers and logs. With ``configure(world_size>1)``, an initialised
``torch.distributed`` and the default engine, the layers are sharded across the ranks
(:func:`ww_core.analyze_distributed` over a gloo group made once in :meth:`configure`): each rank
analyses its share, the results are all-gathered, and every rank records the same full result at
the same step. FSDP (``FullyShardedDataParallel``) units are gathered one unit at a time into a
CPU copy before the analysis (see :meth:`snapshot`). See ``docs/reliability.md``.

Errors: an exception in the analysis, a tracker or an action is caught and reported once through
``log_fn`` with its context (``strict=True`` re-raises instead). A failing tracker is disabled and
the local record continues.

Actions (``ww_callbacks.actions``, or your own): objects with ``on_analysis(controller, result, step, epoch)``,
called after the history, the trackers and the log line, on every rank, in order. They can read
``controller.history`` and report events to the trackers with :meth:`log_event`.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import os
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from ww_callbacks.history import History
from ww_callbacks.schedule import Schedule
from ww_callbacks.trackers.base import Tracker

__all__ = ["WeightWatcherController"]

logger = logging.getLogger("ww_callbacks")

_STATE_VERSION = 1
#: How many flagged layers the compact log line names before "+N more".
_MAX_FLAGGED_IN_LINE = 5


def _default_analyze(*args: Any, **kwargs: Any) -> Any:
    import ww_core

    return ww_core.analyze(*args, **kwargs)


def _unwrap(model: Any) -> Any:
    """The module under DDP/DataParallel-style wrappers (``.module``)."""
    seen = 0
    while seen < 4 and type(model).__name__ in ("DistributedDataParallel", "DataParallel") \
            and hasattr(model, "module"):
        model = model.module
        seen += 1
    return model


#: Path segments that FSDP1 (and activation checkpointing) insert into module names.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _clean_name(name: str) -> str:
    """``_fsdp_wrapped_module.0._fsdp_wrapped_module`` -> ``0``: the user's module path."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_SEGMENTS)


def _fsdp_units(model: Any) -> List[tuple]:
    """``(path, module)`` of every FSDP1 unit in ``model`` (model order), ``[]`` without FSDP.

    Looks only when ``torch.distributed.fsdp`` is already imported (FSDP cannot be in use
    otherwise), so plain runs never import it.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FullyShardedDataParallel", None)
    if cls is None or not hasattr(model, "named_modules"):
        return []
    return [(path, mod) for path, mod in model.named_modules() if isinstance(mod, cls)]


def _failing_layer(exc: BaseException) -> Optional[str]:
    """The layer ``ww_core`` was working on when ``exc`` was raised (innermost frame), if any."""
    name = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if str(frame.f_globals.get("__name__", "")).startswith("ww_core"):
            for key in ("lm", "res"):       # LayerMatrices / LayerResult locals of the engine
                obj = frame.f_locals.get(key)
                if isinstance(getattr(obj, "name", None), str) and hasattr(obj, "num_evals"):
                    name = obj.name
                    break
        tb = tb.tb_next
    return name


class WeightWatcherController:
    """Schedules spectral analyses during training and records them.

    Args:
        start_fraction: share of the planned training after which analyses start (default 0.5;
            see :mod:`ww_callbacks.schedule` for the fallback when the length is unknown).
        every_n_epochs: analyse at the end of every n-th epoch (default 1 when ``every_n_steps``
            is not given).
        every_n_steps: analyse every n optimizer steps instead (step schedule).
        layers: regex or list of regexes selecting layers by name (passed to ``ww_core.analyze``).
        output_dir: folder for ``history.jsonl``/``history.csv`` and the local report; ``None``
            keeps the history in memory only (and drops the local tracker).
        trackers: ``"auto"`` (the framework's own loggers mapped by the adapter, plus the local
            record), ``None``/``[]`` (history files only), or a list of names (``"local"``,
            ``"wandb"``, ``"mlflow"``, ``"tensorboard"``) and :class:`Tracker` instances. A name
            uses the adapter's tracker of that name when it found one, else the registry class
            constructed without arguments.
        log_fn: where the one-line summary per analysis and error reports go (default: the
            ``ww_callbacks`` logger at INFO).
        strict: re-raise errors from the analysis, trackers and actions instead of reporting them.
        actions: objects with ``on_analysis(controller, result, step, epoch)``.
        analyze_fn: the analysis function (default :func:`ww_core.analyze`).
        async_analysis: ``True`` copies the weights at the hook (one copy, on their device) and
            analyses the copy in a background thread, so training only waits for the copy;
            results are recorded when ready (checked at every :meth:`poll`/:meth:`run`), stamped
            with the step they belong to. At most one analysis is in flight: one that falls due
            meanwhile is skipped and counted (``skipped_analyses``). ``"auto"`` (default) is
            ``True`` for a single process with the default engine, ``False`` under distributed
            training (every rank must take its decisions at the same step) or a custom
            ``analyze_fn``.
        **analyze_options: passed to ``ww_core.analyze`` (``min_evals``, ``fix_fingers``, ...).

    Raises:
        ValueError: on invalid arguments (checked here, before training starts).
    """

    def __init__(self, start_fraction: float = 0.5, every_n_epochs: Optional[int] = None,
                 every_n_steps: Optional[int] = None,
                 layers: Union[None, str, Sequence[str]] = None,
                 output_dir: Optional[Union[str, os.PathLike]] = "ww-output",
                 trackers: Union[str, Sequence[Union[str, Tracker]], None] = "auto",
                 log_fn: Optional[Callable[[str], Any]] = None, strict: bool = False,
                 actions: Optional[Sequence[Any]] = None,
                 analyze_fn: Optional[Callable[..., Any]] = None,
                 async_analysis: Union[bool, str] = "auto", **analyze_options: Any) -> None:
        if async_analysis not in (True, False, "auto"):
            raise ValueError(f"async_analysis must be True, False or 'auto', got {async_analysis!r}")
        self.async_analysis = async_analysis
        self.schedule = Schedule(start_fraction, every_n_epochs, every_n_steps)
        self.layers = self._check_layers(layers)
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise ValueError(f"output_dir must be a path or None, got {output_dir!r}")
        self.output_dir = os.fspath(output_dir) if output_dir is not None else None
        self.tracker_spec = self._check_trackers(trackers)
        if log_fn is not None and not callable(log_fn):
            raise ValueError(f"log_fn must be callable, got {log_fn!r}")
        self.log_fn = log_fn if log_fn is not None else logger.info
        self.strict = bool(strict)
        self.actions = list(actions or ())
        for action in self.actions:
            if not callable(getattr(action, "on_analysis", None)):
                raise ValueError(f"action {action!r} has no on_analysis(controller, result, step, epoch)")
        if analyze_fn is not None and not callable(analyze_fn):
            raise ValueError(f"analyze_fn must be callable, got {analyze_fn!r}")
        self.analyze_fn = analyze_fn or _default_analyze
        if "layers" in analyze_options:  # pragma: no cover - Python rejects the duplicate anyway
            raise ValueError("pass layers= once")
        self.analyze_options = dict(analyze_options)
        self._check_analyze_options(analyze_fn)

        self.history = History(self.output_dir, write=True)
        self.trackers: List[Tracker] = []
        self.is_global_zero = True
        self.configured = False
        self.finished = False
        self.last_step: Optional[int] = None     # last step analysed (or attempted)
        self.num_analyses = 0
        self.last_result: Any = None
        self._reported: set = set()
        self._warned_unconfigured = False
        self._async = False
        self._keep_evals = False
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[tuple] = None     # (future, step, epoch, started, hook_seconds)
        #: gloo process group for sharded analyses (world_size > 1, default engine), else None.
        self._group: Any = None
        #: Analyses that fell due while another was still running (async mode), not run.
        self.skipped_analyses = 0
        #: Total seconds the training loop waited inside run() (the analysis itself when
        #: synchronous, only the weight copy when asynchronous).
        self.blocking_seconds = 0.0

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_layers(layers: Any) -> Any:
        if layers is None:
            return None
        patterns = [layers] if isinstance(layers, str) else layers
        try:
            patterns = list(patterns)
        except TypeError:
            raise ValueError(f"layers must be a regex, a list of regexes or None, got {layers!r}") from None
        for pat in patterns:
            if not isinstance(pat, str):
                raise ValueError(f"layers must contain regex strings, got {pat!r}")
            try:
                re.compile(pat)
            except re.error as exc:
                raise ValueError(f"invalid layers regex {pat!r}: {exc}") from None
        return layers if isinstance(layers, str) else patterns

    @staticmethod
    def _check_trackers(trackers: Any) -> Any:
        from ww_callbacks.trackers import TRACKERS

        if trackers is None:
            return []
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

    def _check_analyze_options(self, analyze_fn: Optional[Callable[..., Any]]) -> None:
        if not self.analyze_options:
            return
        fn = analyze_fn
        if fn is None:
            try:
                import ww_core

                fn = ww_core.analyze
            except Exception:  # ww_core missing or broken: the first analysis will report it
                return
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        unknown = sorted(set(self.analyze_options) - set(params))
        if unknown:
            raise ValueError(f"unknown analysis option(s) {unknown}; ww_core.analyze accepts "
                             f"{sorted(p for p in params if p not in ('source', 'layers'))}")

    # ------------------------------------------------------------------ setup
    def configure(self, total_steps: Any = None, total_epochs: Any = None,
                  trackers: Optional[Sequence[Tracker]] = None, is_global_zero: bool = True,
                  current_step: Optional[int] = None,
                  output_dir: Optional[Union[str, os.PathLike]] = None,
                  world_size: int = 1) -> None:
        """Tell the controller the training plan; call once the trainer knows it.

        Args:
            total_steps: planned optimizer steps (``None``/``-1``/``inf`` if unknown).
            total_epochs: planned epochs (``None``/``-1`` if unknown).
            trackers: the framework's own trackers found by the adapter (used by ``"auto"`` and
                by names in ``trackers``); only needed on global rank 0.
            is_global_zero: whether this process writes files, calls trackers and logs.
            current_step: the trainer's global step now. On resume, history rows after it (from
                a run that crashed after its last checkpoint) are dropped, rows on disk up to it
                that the checkpoint missed are recovered, and the files are rewritten. With
                ``current_step=0`` (or ``None``) and no state loaded the files start afresh.
            output_dir: overrides the constructor's ``output_dir`` (adapters use it to default
                to a folder of the trainer).
            world_size: number of training processes; ``async_analysis="auto"`` is synchronous
                when it is above 1, and with the default engine and an initialised
                ``torch.distributed`` the layers are sharded across the ranks. Every rank must
                call ``configure`` (it creates a process group, a collective).
        """
        if self.async_analysis == "auto":
            self._async = int(world_size) == 1 and self.analyze_fn is _default_analyze
        else:
            self._async = bool(self.async_analysis)
        if int(world_size) > 1 and self.analyze_fn is _default_analyze and self._group is None:
            self._group = self._make_group()
        if output_dir is not None:
            self.output_dir = os.fspath(output_dir)
            self.history.output_dir = self.output_dir
        self.is_global_zero = bool(is_global_zero)
        self.history.write = self.is_global_zero
        warning = self.schedule.configure(total_steps, total_epochs)
        if warning and self.is_global_zero:
            self._log(f"ww: {warning}")
        if current_step is not None:
            self._resume_history(int(current_step))
        self.trackers = self._build_trackers(list(trackers or ())) if self.is_global_zero else []
        self._keep_evals = any(getattr(t, "wants_evals", False) for t in self.trackers)
        if self._group is not None:
            # only rank 0 has trackers, but a sharded analysis needs the same options everywhere
            import torch.distributed as dist

            flag = [self._keep_evals]
            dist.broadcast_object_list(flag, src=0, group=self._group)
            self._keep_evals = bool(flag[0])
        if self.is_global_zero:
            self._guard("writing the history files", self.history.sync)
        self.configured = True
        self.finished = False

    @staticmethod
    def _make_group() -> Any:
        """A gloo group over all ranks for :func:`ww_core.analyze_distributed`, or ``None``.

        gloo, whatever the training backend: the exchange is small pickled per-layer results on
        the CPU, and it keeps NCCL's device and stream rules out of it. ``new_group`` is a
        collective: every rank reaches it from ``configure`` (called on every rank by the
        adapters). Without an initialised default group (e.g. Keras) each rank analyses alone.
        """
        try:
            import torch.distributed as dist
        except ImportError:  # pragma: no cover - torch without distributed
            return None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return dist.new_group(backend="gloo")

    def _resume_history(self, current_step: int) -> None:
        dropped = self.history.truncate(current_step)
        recovered = 0
        if current_step > 0 and self.is_global_zero:
            recovered = self._guard("reading the history file", self.history.recover, current_step) or 0
        steps = [s for s in (self.last_step, self.history.last_step) if s is not None]
        self.last_step = min(max(steps), current_step) if steps else None
        if (dropped or recovered) and self.is_global_zero:
            self._log(f"ww: resumed at step {current_step}: dropped {dropped} history rows recorded "
                      f"after it, recovered {recovered} rows from {self.history.jsonl_path}")

    def _build_trackers(self, framework: List[Tracker]) -> List[Tracker]:
        spec = self.tracker_spec
        if spec == "auto":
            spec = list(framework) + ["local"]
        by_name = {getattr(t, "name", None): t for t in framework}
        out: List[Tracker] = []
        for item in spec:
            if not isinstance(item, str):
                out.append(item)
                continue
            if item == "local":
                if self.output_dir is None:
                    continue
                from ww_callbacks.trackers.local import LocalTracker

                out.append(LocalTracker(self.output_dir, log_fn=self._log, strict=self.strict))
            elif item in by_name:
                out.append(by_name[item])
            else:
                tracker = self._guard(f"creating the {item!r} tracker", self._make_tracker, item)
                if tracker is not None:
                    out.append(tracker)
        return out

    def _make_tracker(self, name: str) -> Tracker:
        """A tracker the trainer did not provide: its files go under ``output_dir``."""
        from ww_callbacks.trackers import make_tracker

        kwargs: Dict[str, Any] = {}
        if self.output_dir is not None:
            if name == "tensorboard":
                kwargs["log_dir"] = os.path.join(self.output_dir, "tensorboard")
            elif name == "mlflow":
                db = os.path.abspath(os.path.join(self.output_dir, "mlflow.db"))
                kwargs["tracking_uri"] = "sqlite:///" + db
        return make_tracker(name, **kwargs)

    # ------------------------------------------------------------------ scheduling
    def should_run(self, step: int, epoch: int, epoch_end: bool = False) -> bool:
        """Whether an analysis is due at this point (and this step was not analysed yet)."""
        if self.finished:
            return False
        if not self.configured:
            if not self._warned_unconfigured:
                self._warned_unconfigured = True
                self._log("ww: configure() was not called; assuming an unknown training length")
            self.configure(is_global_zero=self.is_global_zero)
        if self.last_step is not None and step <= self.last_step:
            return False
        return self.schedule.should_run(step, epoch, epoch_end)

    # ------------------------------------------------------------------ analysis
    @property
    def wants_evals(self) -> bool:
        """Whether eigenvalues are kept (the options ask for it or a tracker wants ESD images).

        Decided in :meth:`configure` from rank 0's trackers, the same on every rank.
        """
        return bool(self.analyze_options.get("keep_evals", False)) or self._keep_evals

    def snapshot(self, model: Any) -> Any:
        """What is handed to the engine: the model itself (unwrapped from DDP-style wrappers).

        The analysis is synchronous (training waits), so the live weights are the snapshot;
        ``ww_core`` reads them one layer at a time with ``detach().float().cpu()``.

        Under FSDP1 each rank holds only a shard of every weight, so the units are gathered one
        at a time (``summon_full_params(unit, recurse=False, writeback=False)``, a collective
        that every rank enters in the same order) and the layers each unit owns are copied to
        the CPU; the result is a ``ww_core`` snapshot with the user's module names (FSDP's
        ``_fsdp_wrapped_module`` segments removed). Peak device memory is one unit unsharded.
        """
        model = _unwrap(model)
        units = _fsdp_units(model)
        return self._fsdp_snapshot(model, units) if units else model

    def _fsdp_snapshot(self, model: Any, units: List[tuple]) -> Any:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        from ww_core.sources import LayerMatrices, Snapshot, find_layers

        opts = self.analyze_options
        patterns = [self.layers] if isinstance(self.layers, str) else list(self.layers or ())
        compiled = [re.compile(p) for p in patterns]
        types = opts.get("layer_types")
        types = {types} if isinstance(types, str) else set(types or ())
        # model order of the layers (units are visited outer first, not in model order)
        order = {_clean_name(path): i for i, (path, _) in enumerate(model.named_modules())}

        def position(name: str) -> int:
            while name not in order and "." in name:
                name = name.rsplit(".", 1)[0]
            return order.get(name, len(order))

        kept: List[Any] = []
        for path, unit in units:
            nested = [p for p, m in unit.named_modules() if m is not unit and isinstance(m, FSDP)]
            with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=False):
                for lm in find_layers(unit, conv_norm=opts.get("conv2d_norm", True),
                                      split_qkv=opts.get("split_qkv", True)):
                    if any(lm.name == p or lm.name.startswith(p + ".") for p in nested):
                        continue                   # owned (and gathered) by a nested unit
                    name = _clean_name(f"{path}.{lm.name}" if path else lm.name)
                    if compiled and not any(p.search(name) for p in compiled):
                        continue
                    if types and lm.type not in types:
                        continue
                    load = lm.load
                    if lm.unusable is None:
                        data = lm.load()
                        data = data.detach().to("cpu", copy=True) if hasattr(data, "detach") else data.copy()
                        load = (lambda data=data: data)
                    kept.append(LayerMatrices(name=name, type=lm.type, rf=lm.rf, rows=lm.rows,
                                              cols=lm.cols, load=load, scale=lm.scale,
                                              unusable=lm.unusable, dtype=lm.dtype))
        kept.sort(key=lambda lm: position(lm.name))
        return Snapshot(kept, conv2d_norm=opts.get("conv2d_norm", True),
                        split_qkv=opts.get("split_qkv", True))

    def _analyze(self, model: Any, options: Dict[str, Any]) -> Any:
        """The synchronous analysis: sharded across the ranks when a group was made."""
        source = self.snapshot(model)
        if self._group is None:
            return self.analyze_fn(source, layers=self.layers, **options)
        import ww_core

        # Every rank gets here at the same step (the schedule is a pure function of the step),
        # analyses its share of the layers and receives the others' (all_gather): the same full
        # result everywhere, so the actions decide alike.
        return ww_core.analyze_distributed(source, group=self._group, layers=self.layers, **options)

    def run(self, model: Any, step: int, epoch: int) -> Any:
        """Analyse ``model`` now; record, fan out, log and call the actions.

        Synchronous mode returns the ``AnalysisResult`` (``None`` when this step was analysed
        already or the analysis failed, reported once unless ``strict``). Asynchronous mode copies
        the weights, starts the analysis in the background and returns ``None``; the result is
        recorded by a later :meth:`poll` (or :meth:`finish`).
        """
        step, epoch = int(step), int(epoch)
        self.poll()
        if self.last_step is not None and step <= self.last_step:
            return None
        if self._async and self._pending is not None:
            self.skipped_analyses += 1
            if self.is_global_zero:
                self._log(f"ww step {step}: previous analysis still running, skipped this one "
                          f"({self.skipped_analyses} skipped so far)")
            return None
        self.last_step = step
        options = dict(self.analyze_options)
        if self.wants_evals:
            options["keep_evals"] = True
        started = time.time()
        t0 = time.perf_counter()
        try:
            if self._async:
                future = self._submit(model, options)
            else:
                result = self._analyze(model, options)
        except Exception as exc:
            if self.strict:
                raise
            self._report("analysis", self._analysis_context(step, epoch, exc), exc)
            return None
        hook = time.perf_counter() - t0
        self.blocking_seconds += hook
        if self._async:
            self._pending = (future, step, epoch, started, hook)
            return None
        return self._record(result, step, epoch, started, hook)

    def _submit(self, model: Any, options: Dict[str, Any]) -> "Future":
        """Copy the weights (the only part training waits for) and analyse the copy in a thread."""
        import ww_core

        snap = ww_core.snapshot(self.snapshot(model), layers=self.layers,
                                layer_types=options.get("layer_types"),
                                conv2d_norm=options.get("conv2d_norm", True),
                                split_qkv=options.get("split_qkv", True))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ww-analysis")
        return self._executor.submit(self.analyze_fn, snap, layers=self.layers, **options)

    def poll(self, wait: bool = False) -> Any:
        """Record a finished background analysis, if any (``wait=True`` waits for it).

        Adapters call this from a frequent hook (every batch) so results reach the trackers soon
        after they are ready; it costs nothing when no analysis is pending. Returns the result
        recorded now, or ``None``.
        """
        if self._pending is None:
            return None
        future, step, epoch, started, hook = self._pending
        if not future.done():
            if not wait:
                return None
            t0 = time.perf_counter()
            futures_wait([future])
            waited = time.perf_counter() - t0
            self.blocking_seconds += waited      # training waits here too: count it
            hook += waited
        self._pending = None
        try:
            result = future.result()
        except Exception as exc:
            if self.strict:
                raise
            self._report("analysis", self._analysis_context(step, epoch, exc), exc)
            return None
        return self._record(result, step, epoch, started, hook)

    @staticmethod
    def _analysis_context(step: int, epoch: int, exc: BaseException) -> str:
        layer = _failing_layer(exc)
        where = f" in layer {layer!r}" if layer else ""
        return f"analysis at step {step} (epoch {epoch}) failed{where}"

    def _record(self, result: Any, step: int, epoch: int, started: float, hook: float) -> Any:
        """Record and fan out one result; never raises into training unless ``strict``."""
        try:
            return self._record_unguarded(result, step, epoch, started, hook)
        except Exception as exc:
            if self.strict:
                raise
            self._report("recording", f"recording the analysis of step {step} failed", exc)
            return None

    def _record_unguarded(self, result: Any, step: int, epoch: int, started: float,
                          hook: float) -> Any:
        self.num_analyses += 1
        self.last_result = result
        rows = [{"step": step, "epoch": epoch, "time": started, **rec} for rec in result.to_records()]
        self._guard("writing the history files", self.history.append, rows)
        if self.is_global_zero:
            summary = dict(self._guard("summarising", result.summary) or {})
            summary["hook_seconds"] = hook
            summary["analysis_seconds"] = time.time() - started
            for tracker in list(self.trackers):
                try:
                    tracker.log_analysis(step=step, epoch=epoch, rows=rows, summary=summary,
                                         result=result, history=self.history.rows)
                except Exception as exc:
                    if self.strict:
                        raise
                    self._disable(tracker, f"tracker {self._tracker_name(tracker)} failed at step "
                                           f"{step}", exc)
            self._log(self.format_line(result, step, epoch) + f" [training waited {hook:.3f} s]")
        for action in self.actions:
            try:
                action.on_analysis(self, result, step, epoch)
            except Exception as exc:
                if self.strict:
                    raise
                self._report(f"action {type(action).__name__}",
                             f"action {type(action).__name__} failed at step {step}", exc)
        return result

    def finish(self, model: Any, step: int, epoch: int) -> Any:
        """Final analysis at the end of training (unless this step was analysed), then close."""
        if self.finished:
            return None
        if not self.configured:
            self.configure(is_global_zero=self.is_global_zero)
        self.poll(wait=True)
        result = None
        if model is not None and (self.last_step is None or step > self.last_step):
            was_async, self._async = self._async, False     # the run is over: nothing to overlap
            try:
                result = self.run(model, step=step, epoch=epoch)
            finally:
                self._async = was_async
        self.close()
        return result

    def close(self) -> None:
        """Close the trackers (each once); safe to call more than once."""
        if self.finished:
            return
        self.finished = True
        self._guard("waiting for the background analysis", self.poll, True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for tracker in self.trackers:
            self._guard(f"closing tracker {self._tracker_name(tracker)}", tracker.close)

    def log_event(self, step: int, kind: str, payload: Dict[str, Any]) -> None:
        """Report an action's event (freeze, LR factors, stop) to the trackers and the log."""
        if not self.is_global_zero:
            return
        self._log(f"ww step {step}: {kind} {payload}")
        for tracker in list(self.trackers):
            try:
                tracker.log_event(step=step, kind=kind, payload=payload)
            except Exception as exc:
                if self.strict:
                    raise
                self._disable(tracker, f"tracker {self._tracker_name(tracker)} failed on event "
                                       f"{kind!r}", exc)

    # ------------------------------------------------------------------ output helpers
    @staticmethod
    def format_line(result: Any, step: int, epoch: int) -> str:
        """``ww step 120 epoch 3: mean alpha 4.12 (12 layers), flagged: fc2 under-trained``."""
        layers = list(getattr(result, "layers", ()))
        alphas = [l.alpha for l in layers if isinstance(l.alpha, numbers.Real) and math.isfinite(l.alpha)]
        mean = f"{sum(alphas) / len(alphas):.2f}" if alphas else "n/a"
        flagged = [f"{l.name} {'/'.join(l.flags)}" for l in layers if l.flags]
        text = ", ".join(flagged[:_MAX_FLAGGED_IN_LINE]) or "none"
        if len(flagged) > _MAX_FLAGGED_IN_LINE:
            text += f", +{len(flagged) - _MAX_FLAGGED_IN_LINE} more"
        return f"ww step {step} epoch {epoch}: mean alpha {mean} ({len(layers)} layers), flagged: {text}"

    def _log(self, message: str) -> None:
        try:
            self.log_fn(message)
        except Exception:  # a broken log_fn must not break training
            logger.info(message)

    def _report(self, key: str, context: str, exc: BaseException) -> None:
        if key in self._reported or not self.is_global_zero:
            return
        self._reported.add(key)
        self._log(f"ww: {context}: {type(exc).__name__}: {exc} (training continues; further "
                  f"errors of this kind are not reported)")
        logger.debug("ww_callbacks error details (%s)", context, exc_info=exc)

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            if self.strict:
                raise
            self._report(what, what, exc)
            return None

    def _disable(self, tracker: Tracker, context: str, exc: BaseException) -> None:
        if tracker in self.trackers:
            self.trackers.remove(tracker)
        self._report(f"tracker {id(tracker)}", context + "; tracker disabled", exc)
        try:
            tracker.close()
        except Exception:
            pass

    @staticmethod
    def _tracker_name(tracker: Any) -> str:
        return str(getattr(tracker, "name", type(tracker).__name__))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """JSON-serialisable state for checkpoints: the history rows and the last analysed step.

        Never waits for a background analysis: one still in flight is simply not part of this
        state (its step counts as not analysed yet). Its rows reach ``history.jsonl`` when it
        finishes, and a resume from this checkpoint takes them back from there.
        """
        last = self.last_step if self._pending is None else self.history.last_step
        return {"version": _STATE_VERSION, "last_step": last,
                "num_analyses": self.num_analyses, "schedule": self.schedule.describe(),
                "history": self.history.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore the history; the files are rewritten at the next ``configure``/write."""
        if not state:
            return
        if state.get("version", _STATE_VERSION) > _STATE_VERSION:
            raise ValueError(f"state version {state.get('version')} is newer than this "
                             f"ww_callbacks understands ({_STATE_VERSION})")
        self.history.load_state_dict(state.get("history", {}))
        last = state.get("last_step")
        self.last_step = int(last) if last is not None else self.history.last_step
        self.num_analyses = int(state.get("num_analyses", len(self.history.steps)))
        self.finished = False
        if self.configured and self.is_global_zero:
            self._guard("writing the history files", self.history.sync)

    def __repr__(self) -> str:
        return (f"WeightWatcherController({self.schedule!r}, layers={self.layers!r}, "
                f"output_dir={self.output_dir!r}, analyses={self.num_analyses})")
