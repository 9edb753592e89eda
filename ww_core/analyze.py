"""``analyze()``: weights in, per-layer spectral diagnostics out."""

from __future__ import annotations

import collections
import sys
import zlib
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import peft as _peft
from . import precision as _precision
from .batching import with_eigenvalues
from .errors import in_layer
from .layer_analysis import SolvedLayer, finish_layer, solve_layer, solve_precision
from .layer_matrices import LayerMatrices
from .powerlaw import check_fit
from .result import AnalysisResult, SkippedLayer
from .selection import LayerSelector
from .sources import Snapshot, find_layers
from .spectrum import PRECISIONS, SOLVERS

#: WeightWatcher 0.7.7's defaults.
DEFAULT_MIN_EVALS = 8
DEFAULT_MAX_EVALS = 15000
DEFAULT_MAX_N = 50000
#: At most this many solved layers wait, weights loaded, for an earlier layer's float64 re-solve
#: (and at most ``batch_elements`` weight entries in all).
MAX_PENDING = 8


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one layer's shuffles, from the run seed and the layer name.

    Seeding each layer on its own makes ``randomize`` results independent of which other layers
    are analysed, and of how layers are spread over processes (``analyze_distributed``).
    """
    state = np.random.SeedSequence([int(seed) & (2**64 - 1), zlib.crc32(name.encode("utf-8"))])
    return int(state.generate_state(1, np.uint64)[0] >> np.uint64(1))


def check_options(min_evals: int, max_evals: int, max_N: int, fix_fingers: Optional[str],
                  precision: str, solver: str) -> None:
    """Validate :func:`analyze`'s bounds and solver options.

    Raises:
        ValueError: an invalid value.
    """
    if min_evals < 1:
        raise ValueError(f"min_evals must be >= 1, got {min_evals}")
    if max_evals < min_evals:
        raise ValueError(f"max_evals ({max_evals}) must be >= min_evals ({min_evals})")
    if max_N < 1:
        raise ValueError(f"max_N must be >= 1, got {max_N}")
    if fix_fingers not in (None, False, "clip_xmax"):
        raise ValueError(f"fix_fingers must be None or 'clip_xmax', got {fix_fingers!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


def skip_reason(lm: LayerMatrices, min_evals: int, max_evals: int, max_N: int) -> Optional[str]:
    """Why :func:`analyze` skips ``lm`` with these bounds (``None``: it is analysed)."""
    if lm.unusable:
        return lm.unusable
    if lm.num_evals < min_evals:
        return f"too few eigenvalues ({lm.num_evals} < min_evals={min_evals})"
    if lm.num_evals > max_evals:
        return f"too many eigenvalues ({lm.num_evals} > max_evals={max_evals})"
    if lm.N > max_N:
        return f"too large (N={lm.N} > max_N={max_N})"
    return None


class _Counter:
    """The progress shown without tqdm: ``ww analyze  k/n layers`` on stderr, rewritten in place
    (``\r``) after each layer and ended with a newline by :meth:`close`."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self._draw()

    def _draw(self, end: str = "") -> None:
        sys.stderr.write(f"\r{self.desc}  {self.n}/{self.total} layers{end}")
        sys.stderr.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw()

    def close(self) -> None:
        self._draw("\n")


def _progress(total: int, enabled: bool, desc: str = "ww analyze") -> Any:
    """A tqdm bar over ``total`` layers (a plain counter when tqdm is not installed), or ``None``
    when disabled."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Counter(total, desc)
    return tqdm(total=total, desc=desc, unit="layer", leave=False)


def analyze(
    source: Any,
    *,
    layers: Union[None, str, Sequence[str]] = None,
    layer_types: Optional[Iterable[str]] = None,
    min_evals: int = DEFAULT_MIN_EVALS,
    max_evals: int = DEFAULT_MAX_EVALS,
    max_N: int = DEFAULT_MAX_N,
    fix_fingers: Optional[str] = None,
    max_fingers: int = 10,
    finger_thresh: float = 1.0,
    mp_fit: bool = False,
    randomize: bool = False,
    seed: Optional[int] = None,
    conv2d_norm: bool = True,
    split_qkv: bool = True,
    precision: str = "auto",
    solver: str = "gram",
    keep_evals: bool = False,
    batch_elements: int = 1 << 24,
    progress: bool = False,
    rank_tol: float = 1e-6,
    rank_collapse_share: float = 0.1,
    hill_xmin_pos: float = 2.0,
    peft: Union[bool, str] = False,
    base_model: Any = None,
    trainable: Optional[bool] = None,
    fit: str = "PL",
    detX: bool = False,
    previous: Optional[AnalysisResult] = None,
) -> AnalysisResult:
    """Spectral diagnostics of every analysable layer of ``source``.

    Args:
        source: a torch ``nn.Module``, a Keras 3 model, a state dict (name → tensor/array), or a
            path to a ``.safetensors`` / ``.pt`` / ``.bin`` file or a folder of shards. Files are
            streamed: one layer's weights in memory at a time; pickles are loaded only with
            ``weights_only=True``.
        layers: regex (or list of regexes) searched in layer names; only matching layers are kept.
        layer_types: keep only these types (``dense``, ``conv1d``, ``conv2d``, ``conv3d``,
            ``embedding``).
        min_evals, max_evals, max_N: WeightWatcher's bounds on the number of eigenvalues and on the
            larger side (defaults 8, 15000, 50000). Layers outside go to ``result.skipped``.
        fix_fingers: ``"clip_xmax"`` to refit without a few outlying top eigenvalues.
        max_fingers, finger_thresh: parameters of ``clip_xmax``.
        mp_fit: also fit the Marchenko–Pastur bulk (``num_spikes``, ``sigma_mp``, ``mp_softrank``).
        randomize: also analyse each layer with its entries shuffled (``rand_distance``,
            ``max_rand_eval``, ``num_traps``: correlation traps).
        seed: seed of the shuffles, for reproducible ``randomize`` results; each layer is seeded
            from ``(seed, layer name)``, so a layer's result does not depend on the others.
        conv2d_norm: multiply convolution eigenvalues by 0.5, as WeightWatcher does.
        split_qkv: split fused ``in_proj_weight`` into q, k, v (WeightWatcher skips it).
        precision: ``"auto"`` (default): solve in float32 and keep it only where the checks of
            :mod:`ww_core.precision` show float64 would report the same fit (alpha within
            ~1e-3, same flags), else re-solve that layer in float64 (``LayerResult.precision``
            says which); layers predicted to fail the checks are solved in float64 directly;
            ``"float64"``: WeightWatcher's values to rounding; ``"float32"``: float32
            throughout, unchecked.
        solver: ``"gram"`` (eigvalsh of the smaller Gram matrix, default) or ``"svd"``.
        keep_evals: keep each layer's eigenvalues on ``LayerResult.evals`` (for plots).
        batch_elements: consecutive in-memory layers whose matrices have the same shape share one
            eigensolver call, up to this many weight entries (0 disables). Layers read from files
            are never batched, so one layer at a time is in memory. Up to this many weight
            entries of later in-memory layers are also solved ahead, on the solver pool, while
            earlier ones are fitted (without ``randomize``). In-memory layers solved after one
            whose float32 spectrum was rejected wait, loaded, for its float64 re-solve (which
            runs meanwhile), up to this many weight entries and ``MAX_PENDING`` layers. So up
            to about three times this many entries of in-memory layers (mostly views of the
            model's own weights) are held at once.
        progress: show a tqdm progress bar on stderr (without tqdm: a ``k/n layers`` counter).
        rank_tol, rank_collapse_share: a layer is flagged ``rank-collapse`` when more than
            ``rank_collapse_share`` of its eigenvalues are at most ``rank_tol × λ_max``.
        hill_xmin_pos: ``alpha_hill`` uses the top ``1/hill_xmin_pos`` of the spectrum.
        peft: LoRA adapters as WeightWatcher 0.7.7 (:mod:`ww_core.peft`): ``True`` (same as
            ``"peft_only"``): only each adapter's update ``B·A``, named ``….lora_BA.<adapter>``,
            its ``r`` non-zero eigenvalues; ``"with_base"``: every layer, plus
            ``….lora_W_plus_AB.<adapter>`` (``W + s·B·A``, top ``r`` eigenvalues) and ``B·A``.
        base_model: a module, state dict or path: analyse ``W − W₀`` per layer, matched by name
            (a missing or differently shaped counterpart makes the layer a skip, with reason).
        trainable: ``True``: only layers whose weights require grad, or whose state is unknown
            (state dicts, files); ``False``: only layers known to be frozen; ``None``: all.
        fit: ``"PL"`` (the power law; WeightWatcher's truncated ``"TPL"`` / ``"E_TPL"``
            are refused: see :func:`ww_core.powerlaw.check_fit`).
        detX: also compute WeightWatcher's detX / ERG columns (``detX_num``, ``detX_val``,
            ``ERG_gap``; :mod:`ww_core.detx`).
        previous: an earlier result of the same model: with ``precision="auto"``, a layer whose
            previous spectrum failed the float32 check is solved in float64 directly, and one
            that passed it in float32 (see :func:`ww_core.precision.first_precision`).

    Returns:
        An :class:`~ww_core.result.AnalysisResult`.

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ww_core.errors.SourceError: ``source`` cannot be read (unknown format, corrupt file, …).
        ValueError: an invalid option.

    An exception raised while one layer is loaded or analysed (numerical trouble is a flag, not
    an exception) carries that layer's name: :func:`ww_core.errors.failing_layer`.

    Example:
        >>> import torch, ww_core
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        >>> res = ww_core.analyze(model)
        >>> res.names
        ['0', '2']
    """
    check_options(min_evals, max_evals, max_N, fix_fingers, precision, solver)
    check_fit(fit)
    selector = LayerSelector(layers, layer_types)
    if hill_xmin_pos <= 1.0:
        raise ValueError(f"hill_xmin_pos must be > 1, got {hill_xmin_pos}")
    if not 0.0 <= rank_collapse_share <= 1.0:
        raise ValueError(f"rank_collapse_share must be in [0, 1], got {rank_collapse_share}")
    if isinstance(source, Snapshot):          # these were fixed when the snapshot was taken
        conv2d_norm, split_qkv = source.conv2d_norm, source.split_qkv
    options: Dict[str, Any] = dict(
        layers=layers, layer_types=sorted(selector.types) if selector.types is not None else None,
        min_evals=min_evals, max_evals=max_evals, max_N=max_N, fix_fingers=fix_fingers,
        max_fingers=max_fingers, finger_thresh=finger_thresh, mp_fit=mp_fit,
        randomize=randomize, seed=seed, conv2d_norm=conv2d_norm, split_qkv=split_qkv,
        precision=precision, solver=solver, rank_tol=rank_tol,
        rank_collapse_share=rank_collapse_share, hill_xmin_pos=hill_xmin_pos,
        peft=_peft.check_peft(peft), base_model=_peft.describe_base(base_model),
        trainable=_peft.check_trainable(trainable), fit="PL", detX=bool(detX))
    result = AnalysisResult(options=options)
    todo: List[LayerMatrices] = []
    for lm in selector.select(analysis_layers(source, conv2d_norm, split_qkv, peft, base_model, trainable)):
        reason = skip_reason(lm, min_evals, max_evals, max_N)
        if reason:
            result.skipped.append(SkippedLayer(lm.name, lm.type, lm.N, lm.M, reason))
        else:
            todo.append(lm)
    shared_rng = np.random.default_rng() if randomize and seed is None else None

    def rng_for(lm: LayerMatrices) -> Optional[np.random.Generator]:
        if not randomize:
            return None
        return np.random.default_rng(layer_seed(seed, lm.name)) if seed is not None else shared_rng

    bar = _progress(len(todo), progress)
    before = {l.name: l for l in previous.layers} if previous is not None else {}

    def plan_for(lm: LayerMatrices, batch: Any) -> Tuple[str, str]:
        return _precision.first_precision(precision, fix_fingers, lm.N, lm.M, batch,
                                          before.get(lm.name))

    layers = with_eigenvalues(todo, solve_precision(precision, fix_fingers), solver,
                              batch_elements, rng_for if randomize else None, plan_for)
    fit_options = dict(fix_fingers=fix_fingers or None, max_fingers=max_fingers,
                       finger_thresh=finger_thresh)
    # Solved layers wait here, in model order, while a float64 re-solve runs on the solver pool
    # (in-memory layers only: a streamed layer is finished before the next one is read); each is
    # finished once those before it are, so results and errors come in model order.
    waiting: Deque[Tuple[int, SolvedLayer, Any, bool]] = collections.deque()

    def finish(i: int, solved: SolvedLayer, rand_raw: Any, batched: bool) -> None:
        with in_layer(solved.lm.name):
            result.layers[i] = finish_layer(
                solved, rand_raw=rand_raw, mp_fit=mp_fit, randomize=randomize,
                rng=rng_for(solved.lm) if not batched else None, precision=precision,
                solver=solver, keep_evals=keep_evals, rank_tol=rank_tol,
                rank_collapse_share=rank_collapse_share, hill_xmin_pos=hill_xmin_pos, detX=detX,
                **fit_options)
        if bar is not None:
            bar.update(1)

    try:
        for lm, batch, raw, rand_raw, plan in layers:
            with in_layer(lm.name):
                solved = solve_layer(lm, batch=batch, raw_evals=raw, plan=plan,
                                     precision=precision, solver=solver, rank_tol=rank_tol,
                                     rank_collapse_share=rank_collapse_share,
                                     later=not lm.streamed, **fit_options)
            result.layers.append(solved.res)              # (replaced when finished)
            waiting.append((len(result.layers) - 1, solved, rand_raw, raw is not None))
            while waiting and (not waiting[0][1].pending or lm.streamed or len(waiting) > MAX_PENDING
                               or sum(job[1].lm.size for job in waiting) > max(batch_elements, 0)):
                finish(*waiting.popleft())
        while waiting:
            finish(*waiting.popleft())
    finally:                     # release the loaded batches and the bar even on an error
        for _, solved, _, _ in waiting:
            solved.cancel()
        layers.close()
        if bar is not None:
            bar.close()
    return result


def analysis_layers(source: Any, conv2d_norm: bool = True, split_qkv: bool = True, peft: Any = False,
                    base_model: Any = None, trainable: Optional[bool] = None) -> List[LayerMatrices]:
    """The layers of ``source`` that :func:`analyze` with these options looks at, under the names
    its result gives them, without analysing anything (weights are not loaded).

    Unlike :func:`ww_core.find_layers` (every weight-carrying layer), this applies ``peft``
    (LoRA pairs become ``….lora_BA.<adapter>`` layers), ``base_model`` (each layer as its delta)
    and ``trainable``; ``layers`` / ``layer_types`` (:class:`ww_core.LayerSelector`) and the size
    bounds (``min_evals``, …) are left to the caller. Use it to list, before training, the names
    ``layers=`` regexes and per-layer actions will see.

    Args:
        source, conv2d_norm, split_qkv, peft, base_model, trainable: as :func:`analyze`.

    Returns:
        :class:`~ww_core.LayerMatrices` in model order; a layer that cannot be analysed at all
        (a quantized base, an unmatched ``base_model`` layer, ...) carries the reason in
        ``unusable``.

    Raises:
        ValueError: an invalid ``peft`` or ``trainable``.
        FileNotFoundError, ww_core.SourceError: as :func:`ww_core.find_layers`.

    Example:
        >>> import numpy as np, ww_core
        >>> rng = np.random.default_rng(0)
        >>> sd = {"fc.weight": rng.standard_normal((64, 32)),
        ...       "fc.lora_A.default.weight": rng.standard_normal((8, 32)),
        ...       "fc.lora_B.default.weight": rng.standard_normal((64, 8))}
        >>> [lm.name for lm in ww_core.analysis_layers(sd, peft=True)]
        ['fc.lora_BA.default']
    """
    _peft.check_peft(peft)              # (raises; a warning names ``peft`` as it was given)
    trainable = _peft.check_trainable(trainable)
    found = find_layers(source, conv_norm=conv2d_norm, split_qkv=split_qkv)
    if peft or base_model is not None:
        found = _peft.adapt_layers(found, source, peft, base_model, lambda base: find_layers(
            base, conv_norm=conv2d_norm, split_qkv=split_qkv))
    if trainable is not None:         # unknown (None) counts as trainable: it may change
        found = [lm for lm in found if (lm.trainable is False) != bool(trainable)]
    return found
