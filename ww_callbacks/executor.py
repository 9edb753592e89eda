"""How an analysis is executed: in the training thread or in the background, alone or sharded.

* **Synchronous**: the engine reads the live weights one layer at a time; training waits for the
  whole analysis.
* **Asynchronous**: training waits only for the weight copy (:func:`ww_core.snapshot`); the
  spectra are computed in one ``ww-analysis`` worker thread, at most one analysis in flight, and
  the result is collected later, stamped with the step it belongs to. The copy is bounded by
  ``snapshot_budget`` (on the weights' device, then pinned host memory from CUDA); when it would
  not fit, that step is analysed **synchronously**, layer by layer from the live weights
  (:attr:`Finished.fallback` says so), and the next steps try the copy again.
* **Sharded** (``world_size > 1``, an initialised ``torch.distributed``, the default engine):
  each rank analyses its share of the layers and receives the others'
  (:func:`ww_core.analyze_distributed` over a gloo group), so every rank gets the same result.

Sharded models (FSDP1 units, FSDP2 / ZeRO-3 layers) are gathered piece by piece into a CPU
copy by :func:`ww_core.gather_snapshot` first (that copy is the snapshot: not copied again).
A framework that wraps the model from outside (Lightning's ``FSDPStrategy`` wraps the
LightningModule, whose hooks get the module itself) passes the wrapper to :meth:`configure`
(``outer=``); the root unit is then gathered from it (:func:`sharding_root`). Nothing here knows
a training framework.

Example:
    >>> import numpy as np
    >>> ex = AnalysisExecutor()
    >>> ex.configure(world_size=1, asynchronous=True)
    >>> weights = {"fc.weight": np.random.default_rng(0).standard_normal((200, 100))}
    >>> ex.start(weights, step=10, epoch=0) is None        # submitted
    True
    >>> done = ex.collect(wait=True)
    >>> done.step, done.result.names, ex.busy
    (10, ['fc'], False)
    >>> ex.shutdown()
"""

from __future__ import annotations

import inspect
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

#: The factors of a LoRA adapter, analysed as their product ``lora_BA`` instead.
_LORA_FACTOR = r"\.lora_(A|B|embedding_A|embedding_B)\."

__all__ = ["AnalysisExecutor", "Finished", "default_analyze", "check_analyze_options",
           "sharding_root"]


def default_analyze(*args: Any, **kwargs: Any) -> Any:
    """:func:`ww_core.analyze` (imported when first used)."""
    import ww_core

    return ww_core.analyze(*args, **kwargs)


#: Keywords removed in 0.2.0, and what replaces them.
_REMOVED = {"freeze_options": "use freeze=Freeze(mode=..., <option>=...)",
            "lr_options": "use balance_lr=BalanceLR(mode=..., <option>=...)",
            "early_stop_options": "use early_stop=EarlyStop(mode=..., <option>=...)"}
#: Options of the tracker objects (W&B, MLflow, TensorBoard), not of the callbacks.
_TRACKER_OPTIONS = {"alert_on_flagged", "log_metrics", "step_metric", "log_esd_images", "max_images",
                    "heatmap_steps", "prefix", "project", "open_run"}


def check_analyze_options(analyze_fn: Optional[Callable[..., Any]], options: Dict[str, Any]) -> None:
    """Check ``options`` against the analysis function's keywords (before training starts).

    Raises:
        ValueError: an option the function does not accept.
    """
    if not options:
        return
    removed = sorted(set(options) & set(_REMOVED))
    if removed:
        raise ValueError("; ".join(f"{k} was removed in 0.2.0: {_REMOVED[k]}" for k in removed))
    trackers = sorted(set(options) & _TRACKER_OPTIONS)
    if trackers:
        raise ValueError(f"{trackers} are tracker options: give them to the tracker object, e.g. "
                         f"trackers=[WandbTracker({trackers[0]}=...)]")
    if analyze_fn is None:
        import ww_core

        analyze_fn = ww_core.analyze
    try:
        params = inspect.signature(analyze_fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"unknown analysis option(s) {unknown}; ww_core.analyze accepts "
                         f"{sorted(p for p in params if p not in ('source', 'layers'))}")


def sharding_root(model: Any, outer: Any = None) -> Any:
    """The FSDP1 root unit wrapping ``model`` from outside, else ``model``.

    ``outer`` is the framework's wrapper of ``model`` (given by the adapter). Lightning's
    ``FSDPStrategy`` wraps the LightningModule in ``FullyShardedDataParallel`` and its callbacks
    receive the module itself, whose root-owned parameters are then flat shards that only the
    root unit can gather; its adapter passes ``trainer.strategy.model``.
    """
    from ww_core import unwrap_model

    outer = unwrap_model(outer) if outer is not None else None
    if outer is None or outer is model or getattr(outer, "module", None) is not model:
        return model
    return outer if _holds_fsdp1_unit(outer) else model


def _holds_fsdp1_unit(model: Any) -> bool:
    """Whether ``model`` is or holds an FSDP1 unit; looks only when ``torch.distributed.fsdp`` is
    already imported (FSDP cannot be in use otherwise)."""
    fsdp_class = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    modules = getattr(model, "modules", None)
    return fsdp_class is not None and callable(modules) and any(isinstance(m, fsdp_class) for m in modules())


@dataclass
class Finished:
    """One executed analysis.

    Attributes:
        step: the training step the weights belong to.
        epoch: the epoch they belong to.
        started: Unix time of the start (of the copy, when asynchronous).
        hook_seconds: how long training waited for it (everything when synchronous; the copy
            plus any wait in :meth:`AnalysisExecutor.collect` when asynchronous).
        waited: the part of ``hook_seconds`` spent waiting in ``collect``.
        result: the ``AnalysisResult`` (``None`` when it raised).
        error: the exception it raised, else ``None``.
        fallback: why an asynchronous analysis ran synchronously (the copy would have exceeded
            ``snapshot_budget``), else ``None``.
        work_seconds: the analysis' own cost on the executor's clocks (:attr:`AnalysisExecutor.
            thread_clock` in the worker thread, :attr:`~AnalysisExecutor.process_clock` when
            synchronous), without the copy.
        num_layers: how many layers it was asked to cover (``None``: every selected layer).
        copy_seconds: the background copy's cost on :attr:`~AnalysisExecutor.process_clock`.
    """

    step: int
    epoch: int
    started: float
    hook_seconds: float
    waited: float = 0.0
    result: Any = None
    error: Optional[Exception] = None
    fallback: Optional[str] = None
    work_seconds: float = 0.0
    num_layers: Optional[int] = None
    copy_seconds: float = 0.0

    def failure(self) -> str:
        """What failed, naming the layer the engine was working on (when it says)."""
        from ww_core import failing_layer

        layer = failing_layer(self.error) if self.error is not None else None
        where = f" in layer {layer!r}" if layer else ""
        return f"analysis at step {self.step} (epoch {self.epoch}) failed{where}"


class AnalysisExecutor:
    """Runs analyses for the controller.

    Args:
        analyze_fn: the analysis function (default :func:`ww_core.analyze`).
        layers: the checked ``layers=`` patterns.
        options: ``ww_core.analyze`` options.
        snapshot_budget: bytes the asynchronous weight copy may take (``"auto"``: the smaller of
            2 GB and 10 % of the weights' device memory; ``None``: no limit); see
            :func:`ww_core.snapshot`.
    """

    def __init__(self, analyze_fn: Optional[Callable[..., Any]] = None, layers: Any = None,
                 options: Optional[Dict[str, Any]] = None, snapshot_budget: Any = "auto") -> None:
        from ww_core import check_budget

        self.analyze_fn = analyze_fn or default_analyze
        self.layers = layers
        self.options = dict(options or {})
        self.snapshot_budget = check_budget(snapshot_budget)
        #: Asynchronous analyses run synchronously because the copy would not fit the budget.
        self.sync_fallbacks = 0
        self.asynchronous = False
        #: The framework's wrapper of the model the hooks pass, if any (:func:`sharding_root`).
        self.outer: Any = None
        self._group: Any = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[tuple] = None     # (future, step, epoch, started, hook s, copy cost)
        self._peft: Optional[bool] = None         # the model has LoRA adapters (found at first use)
        #: The last result of the default engine: passed back as ``previous=`` so that
        #: ``precision="auto"`` solves a layer whose float32 spectrum failed last time in float64
        #: directly (:func:`ww_core.analyze`).
        self.previous: Any = None
        #: Clocks of an analysis' cost: in the worker thread, and while training waits.
        self.thread_clock: Callable[[], float] = time.thread_time
        self.process_clock: Callable[[], float] = time.process_time
        #: Called once in the worker thread before its first analysis (priority, threads).
        self.worker_setup: Optional[Callable[[], Any]] = None
        self._setup_done = False

    @property
    def default_engine(self) -> bool:
        return self.analyze_fn is default_analyze

    @property
    def busy(self) -> bool:
        """Whether a background analysis was submitted and not yet collected."""
        return self._pending is not None

    @property
    def group(self) -> Any:
        """The gloo process group of sharded analyses, else ``None``."""
        return self._group

    def configure(self, world_size: int, asynchronous: bool, outer: Any = None) -> None:
        """Choose the mode; with ``world_size > 1`` and the default engine, make the gloo group
        (``new_group`` is a collective: every rank must call this). ``outer``: the framework's
        wrapper of the model its hooks pass (:func:`sharding_root`)."""
        self.asynchronous = bool(asynchronous)
        self.outer = outer
        if world_size > 1 and self.default_engine and self._group is None:
            self._group = self._make_group()

    @staticmethod
    def _make_group() -> Any:
        # gloo whatever the training backend: the exchange is small pickled results on the CPU,
        # which keeps NCCL's device and stream rules out of it
        try:
            import torch.distributed as dist
        except ImportError:  # pragma: no cover - torch without distributed
            return None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return dist.new_group(backend="gloo")

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank of the sharding group (``obj`` when not sharded)."""
        if self._group is None:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def snapshot(self, model: Any, layers: Any = None) -> Any:
        """What the engine analyses: the unwrapped model, or a CPU copy gathered piece by piece
        from a sharded one (:func:`ww_core.gather_snapshot`; every rank must call this).
        ``layers``: a narrower selection than ``layers=`` (:meth:`start`)."""
        import ww_core

        opts = self.options
        return ww_core.gather_snapshot(sharding_root(model, self.outer), layers=layers or self.layers,
                                       layer_types=opts.get("layer_types"),
                                       conv2d_norm=opts.get("conv2d_norm", True),
                                       split_qkv=opts.get("split_qkv", True))

    def plan(self, model: Any, analyze_frozen: str = "once", first: bool = True) -> List[Dict[str, Any]]:
        """The extra ``ww_core.analyze`` options of each call of the next analysis.

        ``analyze_frozen="once"``: the first analysis looks at every layer (on a PEFT model the
        adapters' updates, then the frozen base), later ones only at layers that may train
        (``trainable=True``); ``"always"``: every layer each time; ``"never"``: what trains.
        Options the user set (``peft``, ``trainable``) win; custom engines get ``[{}]``.
        """
        opts = self.options
        if not self.default_engine:
            return [{}]
        if self._peft is None:
            from ww_callbacks.torch_utils import has_lora_adapters

            self._peft = has_lora_adapters(model)
        if "peft" in opts or not self._peft:
            plan: List[Dict[str, Any]] = [{}]
        else:   # the adapters' updates, and every other layer (head, base) without the factors
            plan = [{"peft": True}, {"drop_layers": _LORA_FACTOR}]
        if "trainable" in opts or analyze_frozen == "always" or (first and analyze_frozen == "once"):
            return plan
        return [{**extra, "trainable": True} for extra in plan]

    def candidates(self, model: Any, plan: List[Dict[str, Any]]) -> List[Tuple[str, bool]]:
        """``(name, trainable)`` of every layer the analysis of ``plan`` could cover, in model
        order, under the names of its result (nothing is loaded; layers outside the size bounds
        left out): what :class:`~ww_callbacks.rotation.LayerRotation` rotates over."""
        import ww_core

        keys = ("layer_types", "min_evals", "max_evals", "max_N", "conv2d_norm", "split_qkv", "peft",
                "base_model", "trainable")
        seen: Dict[str, bool] = {}
        for extra in plan:
            merged = {**self.options, **extra}
            drop = re.compile(merged["drop_layers"]) if "drop_layers" in merged else None
            described = ww_core.describe(model, layers=self.layers,
                                         **{k: merged[k] for k in keys if k in merged})
            for layer in described.layers:
                if drop is None or not drop.search(layer.name):
                    seen.setdefault(layer.name, layer.trainable is not False)
        return list(seen.items())

    def _analyze(self, model: Any, options: Dict[str, Any], plan: List[Dict[str, Any]],
                 layers: Any = None) -> Any:
        return self._run_plan(self.snapshot(model, layers), options, plan, layers)

    def _run_plan(self, source: Any, options: Dict[str, Any], plan: List[Dict[str, Any]],
                  layers: Any = None) -> Any:
        """One analysis per plan entry (extra options; ``drop_layers``: a regex of names to
        leave out of that entry's result), merged into one result in plan order. ``layers``:
        a narrower selection than ``layers=`` (the exact names of :meth:`start`)."""
        import ww_core

        layers = layers or self.layers
        results = []
        for extra in plan:
            extra = dict(extra)
            drop = re.compile(extra.pop("drop_layers")) if "drop_layers" in extra else None
            if self._group is None:
                if self.analyze_fn is default_analyze and "previous" not in options:
                    extra.setdefault("previous", self.previous)
                res = self.analyze_fn(source, layers=layers, **options, **extra)
            else:   # every rank gets here at the same step (the schedule is a pure function of it)
                res = ww_core.analyze_distributed(source, group=self._group, layers=layers,
                                                  **options, **extra)
            if drop is not None:
                res = ww_core.AnalysisResult(layers=[la for la in res.layers if not drop.search(la.name)],
                                             skipped=[s for s in res.skipped if not drop.search(s.name)])
            results.append(res)
        merged = results[0] if len(results) == 1 else ww_core.AnalysisResult(
            layers=[la for r in results for la in r.layers], skipped=[s for r in results for s in r.skipped])
        now = set(merged.names)        # (a subset of the layers: the others keep their last result)
        self.previous = ww_core.AnalysisResult(layers=[
            *(la for la in getattr(self.previous, "layers", ()) if la.name not in now), *merged.layers])
        return merged

    def _copy(self, model: Any, trainable: Optional[bool] = None, layers: Any = None) -> Any:
        """A private copy within ``snapshot_budget`` (raises ``SnapshotBudgetError`` before
        copying anything when it would not fit)."""
        import ww_core

        source = self.snapshot(model, layers)
        if isinstance(source, ww_core.Snapshot) and source is not model:
            return source                 # gathered from a sharded model: already a CPU copy
        opts = self.options
        return ww_core.snapshot(source, layers=layers or self.layers, layer_types=opts.get("layer_types"),
                                conv2d_norm=opts.get("conv2d_norm", True),
                                split_qkv=opts.get("split_qkv", True),
                                budget=self.snapshot_budget, trainable=trainable)

    def start(self, model: Any, step: int, epoch: int, keep_evals: bool = False,
              plan: Optional[List[Dict[str, Any]]] = None,
              layers: Optional[List[str]] = None) -> Optional[Finished]:
        """Analyse ``model``: the :class:`Finished` analysis when synchronous (or when the copy
        failed), ``None`` once submitted to the background.

        Args:
            model: the training model.
            step, epoch: what the result is stamped with.
            keep_evals: keep the eigenvalues (a tracker draws ESDs).
            plan: extra ``ww_core.analyze`` options per analysis call, merged into one result
                (default one call, ``[{}]``); e.g. the adapters of a PEFT model, then its frozen
                base once (:meth:`WeightWatcherController.plan`).
            layers: the exact names to analyse (a part of the selected layers, e.g. the
                rotation's, :mod:`ww_callbacks.rotation`); ``None``: every selected layer.

        Raises:
            RuntimeError: asynchronous and an analysis is still pending (check :attr:`busy`).
        """
        if self.asynchronous and self._pending is not None:
            raise RuntimeError("an analysis is already in flight")
        from ww_core import SnapshotBudgetError

        options = dict(self.options, **({"keep_evals": True} if keep_evals else {}))
        plan = plan or [{}]
        # copy only what the plan analyses: every call on trainable layers -> frozen weights stay
        # (except W + B·A, which needs the frozen base)
        only_trainable = all(e.get("trainable") is True and dict(options, **e).get("peft") != "with_base"
                             for e in plan)
        copy_trainable = True if only_trainable else None
        from ww_callbacks.rotation import exact_names_regex

        # the adapters' factors are read under other names than the result's: copy them whole
        subset = exact_names_regex(layers) if layers is not None else None
        copy_subset = None if self._peft else subset
        count = len(layers) if layers is not None else None
        started, t0, c0 = time.time(), time.perf_counter(), self.process_clock()
        fallback = None
        try:
            if self.asynchronous:
                try:
                    snap = self._copy(model, copy_trainable, copy_subset)
                except SnapshotBudgetError as exc:     # nothing was copied: analyse it now
                    self.sync_fallbacks += 1
                    fallback = f"analysed synchronously: {exc}"
            if fallback and self.default_engine:
                options.setdefault("batch_elements", 0)        # one layer at a time
            if not self.asynchronous or fallback:
                c0 = self.process_clock()
                result = self._analyze(model, options, plan, subset)
                return Finished(step, epoch, started, time.perf_counter() - t0, result=result,
                                fallback=fallback, work_seconds=self.process_clock() - c0,
                                num_layers=count)
        except Exception as exc:
            return Finished(step, epoch, started, time.perf_counter() - t0, error=exc,
                            fallback=fallback, num_layers=count)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ww-analysis")
        copy = self.process_clock() - c0          # before the worker starts (its clock may be ours)
        future: Future = self._pool.submit(self._work, snap, options, plan, subset, count)
        self._pending = (future, step, epoch, started, time.perf_counter() - t0, copy)
        return None

    def collect(self, wait: bool = False) -> Optional[Finished]:
        """The finished background analysis (``wait=True`` waits for it), else ``None``."""
        if self._pending is None:
            return None
        future, step, epoch, started, hook, copy = self._pending
        waited = 0.0
        if not future.done():
            if not wait:
                return None
            t0 = time.perf_counter()
            futures_wait([future])
            waited = time.perf_counter() - t0
        self._pending = None
        done = Finished(step, epoch, started, hook + waited, waited, copy_seconds=copy)
        try:
            done.result, done.work_seconds, done.num_layers = future.result()
        except Exception as exc:
            done.error = exc
        return done

    def _work(self, snap: Any, options: Dict[str, Any], plan: List[Dict[str, Any]], layers: Any,
              count: Optional[int]) -> Tuple[Any, float, Optional[int]]:
        """The worker thread's job: ``(result, its cost on thread_clock, layers asked for)``."""
        if not self._setup_done:
            self._setup_done = True
            if self.worker_setup is not None:
                self.worker_setup()
        c0 = self.thread_clock()
        result = self._run_plan(snap, options, plan, layers)
        return result, self.thread_clock() - c0, count

    def shutdown(self) -> None:
        """Stop the worker thread (waits for a running analysis)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
