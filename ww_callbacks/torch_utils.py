"""PyTorch side of the actions: per-layer parameter groups, mid-training freezing, LR factors.

torch is imported inside the functions only, so importing this module costs nothing.

Layer names are ``ww_core`` names: the ``named_modules()`` path of the module that owns the weight
(``encoder.layer.0.attention.self.query``; the root module is named by its class). Names are
matched after stripping the wrapper prefixes ``module.`` (DDP/DataParallel) and ``_orig_mod.``
(``torch.compile``). ``nn.MultiheadAttention``'s split projections (``attn.in_proj_q/_k/_v``)
share one parameter, so they share one group (``"name": "attn.in_proj"``, ``"ww_layers"`` lists
the three) whose factor is the mean of theirs.

Freezing mid-training: ``requires_grad_(False)`` **and**
``p.grad = None``. With a ``None`` grad every torch optimizer skips the parameter, so neither
momentum nor (decoupled) weight decay can move it; the parameter stays in its group so the
optimizer/scheduler layout and checkpoints are unchanged. ``requires_grad`` is not saved in
checkpoints: re-freeze after a resume. Under DDP the set of parameters that get gradients changes,
which needs ``find_unused_parameters=True`` (Lightning ``DDPStrategy(find_unused_parameters=True)``,
HF ``TrainingArguments(ddp_find_unused_parameters=True)``), and every rank must freeze the same
layers (use :func:`broadcast_object` on the decision).

LR factors (:func:`apply_lr_factors`) are relative to each group's original LR, stored once in the
group as ``group["ww_base_lr"]``; the factor in force is ``group["ww_lr_factor"]``. Both live in the
optimizer's ``state_dict``, ``scheduler.base_lrs`` in the scheduler's, so a resume restores them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ww_callbacks.distributed import broadcast_object  # re-exported: one broadcast for all
from ww_core import unwrap_model  # (in __all__: the one unwrapper, re-exported)

__all__ = ["model_layer_names", "model_param_groups", "layer_param_groups", "resolve_layer_params",
           "prefix_parameters", "freeze_layers", "unfreeze_layers", "apply_lr_factors", "group_factor",
           "broadcast_object", "unwrap_model", "unwrap_optimizer"]

#: ``ww_core`` names of a LoRA adapter's update (``peft=True``): ``<module>.lora_BA.<adapter>``.
_LORA_SUFFIX = re.compile(r"\.lora_(BA|W_plus_AB)\.([^.]+)$")
_MHA_SUFFIX = re.compile(r"\.(in_proj(_[qkv])?|([qkv])_proj)$")
#: The prefixes wrappers add to parameter names (DDP/DataParallel, ``torch.compile``), repeated.
_WRAPPER_PREFIXES = re.compile(r"^(?:module\.|_orig_mod\.)+")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The raw ``torch.optim.Optimizer`` under accelerate's ``AcceleratedOptimizer``
    (``.optimizer``) and Lightning's ``LightningOptimizer`` (``._optimizer``)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _strip(name: str) -> str:
    return _WRAPPER_PREFIXES.sub("", name)


def has_lora_adapters(model: Any) -> bool:
    """Whether ``model`` (a torch module, wrappers unwrapped) holds PEFT LoRA adapters."""
    mods = getattr(unwrap_model(model), "named_modules", None)
    return callable(mods) and any(".lora_A" in name for name, _ in mods())


def resolve_layer_params(model: Any, names: Iterable[str]) -> Dict[str, Tuple[str, List[Tuple[str, Any]]]]:
    """Map ``ww_core`` layer names to ``(group name, [(param name, parameter), ...])``.

    The parameters are those the layer's module owns directly (weight and bias; for
    ``MultiheadAttention`` the projection it names plus its bias).

    Raises:
        ValueError: a name that matches no module of ``model``.
    """
    model = unwrap_model(model)
    modules = {_strip(path): mod for path, mod in model.named_modules()}
    root_name = type(model).__name__
    out: Dict[str, Tuple[str, List[Tuple[str, Any]]]] = {}
    missing = []
    for raw in names:
        name = _strip(str(raw))
        path, mod = name, modules.get(name)
        if mod is None and name == root_name:
            path, mod = "", model
        params: List[Tuple[str, Any]] = []
        group = name
        lora = _LORA_SUFFIX.search(name) if mod is None else None
        if lora is not None:     # the adapter's own parameters: lora_A.<adapter> and lora_B.<adapter>
            base, adapter = name[: lora.start()], lora.group(2)
            pairs = [(f"{base}.lora_{ab}.{adapter}", modules.get(f"{base}.lora_{ab}.{adapter}"))
                     for ab in ("A", "B")]
            if all(m is not None for _, m in pairs):
                path, mod = "", model
                params = [(f"{p}.{n}", t) for p, m in pairs for n, t in m.named_parameters(recurse=False)]
        if mod is None:
            m = _MHA_SUFFIX.search(name)
            owner = modules.get(name[: m.start()]) if m else None
            if owner is not None:
                path, mod = name[: m.start()], owner
                if m.group(3):                      # q_proj / k_proj / v_proj: separate weights
                    params = [(f"{m.group(3)}_proj_weight",
                               getattr(owner, f"{m.group(3)}_proj_weight"))]
                else:                               # fused in_proj, shared by q, k and v
                    params = [(n, getattr(owner, n)) for n in ("in_proj_weight", "in_proj_bias")
                              if getattr(owner, n, None) is not None]
                    group = f"{path}.in_proj"
        if mod is None:
            missing.append(raw)
            continue
        if not params:
            params = [(n, p) for n, p in mod.named_parameters(recurse=False)]
        prefix = f"{path}." if path else ""
        out[str(raw)] = (group, [(prefix + n, p) for n, p in params if p is not None])
    if missing:
        raise ValueError(f"{len(missing)} layer name(s) match no module of the model: "
                         f"{missing[:5]}; names must be ww_core layer names (module paths)")
    return out


def model_layer_names(model: Any, layers: Any = None) -> List[str]:
    """The ``ww_core`` names of every analysable layer of ``model`` (no analysis is run).

    Args:
        model: the ``nn.Module`` (wrappers are unwrapped).
        layers: optional regex or list of regexes (``re.search`` on the name), as the callbacks'
            ``layers`` argument.
    """
    import ww_core

    model = unwrap_model(model)
    # a PEFT model's layers that train are its adapters, named as the analysis names them
    found = ww_core.analysis_layers(model, peft=has_lora_adapters(model))
    return [lm.name for lm in ww_core.LayerSelector(layers).select(found)]


def tied_head_layers(model: Any, names: Optional[Iterable[str]] = None) -> List[str]:
    """Layer names whose parameters are the model's output head (``get_output_embeddings()``
    of HF models, e.g. a word embedding tied to ``lm_head``); ``[]`` when there is none."""
    model = unwrap_model(model)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return []
    ids = {id(p) for p in head.parameters()}
    names = list(names) if names is not None else model_layer_names(model)
    out = []
    for name, (_, plist) in resolve_layer_params(model, names).items():
        if any(id(p) in ids for _, p in plist):
            out.append(name)
    return out


def model_param_groups(model: Any, base_lr: Optional[float] = None, layers: Any = None,
                       rest_name: str = "rest", **group_kwargs: Any) -> List[Dict[str, Any]]:
    """:func:`layer_param_groups` over every analysable layer of ``model`` (:func:`model_layer_names`).

    The groups ``balance_lr=True`` needs: pass them to the optimizer instead of
    ``model.parameters()``.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> [g["name"] for g in model_param_groups(model, base_lr=0.1)]
        ['0', '2']
    """
    return layer_param_groups(model, model_layer_names(model, layers), base_lr=base_lr,
                              rest_name=rest_name, **group_kwargs)


def layer_param_groups(model: Any, layer_names: Sequence[str], base_lr: Optional[float] = None,
                       rest_name: str = "rest", **group_kwargs: Any) -> List[Dict[str, Any]]:
    """One optimizer param group per analysed layer, plus one for every other parameter.

    Works with any ``torch.optim`` optimizer: each group is a plain dict with ``"params"``,
    ``"name"`` (the layer name; ``rest_name`` for the rest), ``"ww_layers"`` (the ``ww_core``
    names it covers) and the extra keys. Every parameter appears exactly once (tied weights go to
    the first layer that owns them); frozen parameters are included so that they can be unfrozen.

    Args:
        model: the ``nn.Module`` (DDP/compiled wrappers are unwrapped).
        layer_names: ``ww_core`` layer names, e.g. ``ww_core.analyze(model).names``.
        base_lr: ``"lr"`` of every group; ``None`` leaves it to the optimizer's default.
        rest_name: name of the final group (left out when empty).
        **group_kwargs: further keys for every group (``weight_decay=...``, ``momentum=...``).

    Returns:
        The list of groups, layer groups in the order of ``layer_names``, then the rest.

    Raises:
        ValueError: bad ``base_lr``, a duplicate/unknown name, or ``rest_name`` clashing.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> groups = layer_param_groups(model, ["0", "2"], base_lr=0.1)
        >>> opt = torch.optim.SGD(groups, momentum=0.9)
        >>> [g["name"] for g in opt.param_groups], [len(g["params"]) for g in opt.param_groups]
        (['0', '2'], [2, 2])
    """
    if base_lr is not None and (isinstance(base_lr, bool) or not isinstance(base_lr, (int, float))
                                or not math.isfinite(base_lr) or base_lr < 0):
        raise ValueError(f"base_lr must be a finite number >= 0 or None, got {base_lr!r}")
    if isinstance(layer_names, str):
        raise ValueError("layer_names must be a sequence of names, not one string")
    if len(set(layer_names)) != len(layer_names):
        raise ValueError("layer_names contains duplicates")
    if rest_name in layer_names:
        raise ValueError(f"rest_name {rest_name!r} is also a layer name; pick another")
    model = unwrap_model(model)
    resolved = resolve_layer_params(model, layer_names)
    extra = dict(group_kwargs)
    if base_lr is not None:
        extra["lr"] = float(base_lr)
    groups: Dict[str, Dict[str, Any]] = {}
    seen: set = set()
    for name in layer_names:
        group_name, params = resolved[name]
        group = groups.get(group_name)
        if group is None:
            group = groups[group_name] = {"params": [], "name": group_name, "ww_layers": [], **extra}
        group["ww_layers"].append(name)
        for _, p in params:
            if id(p) not in seen:
                seen.add(id(p))
                group["params"].append(p)
    out = [g for g in groups.values() if g["params"]]
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:
        out.append({"params": rest, "name": rest_name, "ww_layers": [], **extra})
    return out


def _layer_params(model: Any, names: Iterable[str]) -> List[Any]:
    params, seen = [], set()
    for _, plist in resolve_layer_params(model, names).values():
        for _, p in plist:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def freeze_layers(model: Any, names: Iterable[str], optimizers: Iterable[Any] = (),
                  drop_state: bool = False, whole_prefix: bool = False) -> List[str]:
    """Freeze layers mid-training so that nothing can move their weights any more.

    ``requires_grad_(False)`` stops new gradients and ``p.grad = None`` makes every optimizer skip
    the parameter (with a zero-but-present grad, SGD momentum and AdamW's decoupled weight decay
    would still move it). The parameters stay in their param groups.

    Args:
        model: the ``nn.Module`` (wrappers are unwrapped).
        names: ``ww_core`` layer names.
        optimizers: optimizers (raw, accelerate or Lightning wrappers) whose per-parameter state
            is dropped when ``drop_state`` (frees e.g. Adam's two moment buffers).
        drop_state: pop the parameters' optimizer state. Off by default: keeping it lets an
            unfrozen layer resume with its momentum.
        whole_prefix: also freeze every parameter registered before the last parameter of
            ``names`` (norms, biases, embeddings the analysis does not cover; also an input
            embedding tied to the head, which ``FreezePolicy`` never lets a prefix pass). Use it
            when ``names`` end a frozen prefix (``FreezePolicy(order="prefix")``): only when
            nothing before a layer trains does autograd skip the input gradients and record no
            graph through the prefix. Registration order is taken as execution order (true of
            Hugging Face, timm and torchvision models).

    Returns:
        The parameter names frozen (``module.path.weight``...).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> freeze_layers(model, ["0"])
        ['0.weight', '0.bias']
    """
    if isinstance(names, str):
        raise ValueError("names must be a sequence of layer names, not one string")
    resolved = resolve_layer_params(model, names)
    opts = [unwrap_optimizer(o) for o in optimizers]
    frozen: List[str] = []
    pairs = [pair for _, plist in resolved.values() for pair in plist]
    if whole_prefix and pairs:
        pairs = prefix_parameters(unwrap_model(model), [p for _, p in pairs])  # up to the furthest
    for pname, p in pairs:
        p.requires_grad_(False)
        p.grad = None
        if drop_state:
            for opt in opts:
                opt.state.pop(p, None)
        if pname not in frozen:
            frozen.append(pname)
    return frozen


def prefix_parameters(model: Any, last: Sequence[Any]) -> List[Tuple[str, Any]]:
    """``(name, parameter)`` of ``model`` in registration order, up to the last of ``last``.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2), torch.nn.Linear(2, 1))
        >>> [n for n, _ in prefix_parameters(m, [m[2].weight])]
        ['0.weight', '0.bias', '1.weight', '1.bias', '2.weight']
    """
    wanted = {id(p) for p in last}
    out: List[Tuple[str, Any]] = []
    for name, p in model.named_parameters():
        out.append((name, p))
        wanted.discard(id(p))
        if not wanted:
            return out
    return out


def unfreeze_layers(model: Any, names: Iterable[str]) -> List[str]:
    """Make the layers' parameters trainable again (``requires_grad_(True)``).

    They must still be in an optimizer param group to be updated: true for groups from
    :func:`layer_param_groups` and for Lightning optimizers built over ``model.parameters()``,
    not for HF's default optimizer when the layer was frozen *before* it was created.

    Returns:
        The parameter names unfrozen.
    """
    if isinstance(names, str):
        raise ValueError("names must be a sequence of layer names, not one string")
    out: List[str] = []
    for _, plist in resolve_layer_params(model, names).values():
        for pname, p in plist:
            p.requires_grad_(True)
            if pname not in out:
                out.append(pname)
    return out


def group_factor(group: Mapping[str, Any], factors: Mapping[str, float]) -> float:
    """The factor for one param group: by its ``"name"``, else the mean over its ``"ww_layers"``
    present in ``factors``, else 1.0."""
    name = group.get("name")
    if name is not None and name in factors:
        return float(factors[name])
    hits = [float(factors[n]) for n in group.get("ww_layers", ()) if n in factors]
    return sum(hits) / len(hits) if hits else 1.0


def _schedulers_of(schedulers: Iterable[Any]) -> List[Any]:
    """Flatten ``SequentialLR``/``ChainedScheduler`` and Lightning ``LRSchedulerConfig``s."""
    out: List[Any] = []
    for s in schedulers:
        if s is None:
            continue
        s = getattr(s, "scheduler", s)          # Lightning LRSchedulerConfig
        out.append(s)
        inner = getattr(s, "_schedulers", None)
        if inner:
            out.extend(_schedulers_of(inner))
    return out


def apply_lr_factors(optimizer: Any, schedulers: Iterable[Any] = (),
                     factors: Optional[Mapping[str, float]] = None,
                     base: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """Set each named param group's LR to ``factor × its original LR``, durably and idempotently.

    For every group with a ``"name"``:

    * the original LR is stored once as ``group["ww_base_lr"]`` (``base[name]`` when given, else
      the group's ``"initial_lr"`` (set by schedulers), else its current ``"lr"``), so applying the
      same factors twice changes nothing and new factors replace old ones instead of compounding;
    * ``group["lr"]`` is rescaled by ``factor / previous factor`` for immediate effect (it holds
      ``original × schedule multiplier × previous factor``);
    * every scheduler's ``base_lrs[i]`` (LambdaLR and HF's default schedulers recompute
      ``lr = base_lrs[i] × lambda(step)`` each step, which would erase a bare ``lr`` edit) and
      ``group["initial_lr"]`` become ``original × factor``. Chainable schedulers (StepLR,
      ExponentialLR, CosineAnnealingLR, ...) multiply the current ``lr``, so the rescale persists;
    * ``OneCycleLR``: ``group["max_lr"]``/``["min_lr"]`` are rescaled too (it recomputes from them);
      ``CyclicLR``: ``max_lrs[i]`` too. ``ReduceLROnPlateau`` needs nothing (its ``min_lrs``
      floor is not scaled, so a factor cannot push a group below it).

    Groups without a ``"name"`` (e.g. HF's two default groups) are left alone: build groups with
    :func:`layer_param_groups`. A layer name missing from ``factors`` goes back to factor 1.

    Args:
        optimizer: raw or wrapped (accelerate, Lightning) optimizer.
        schedulers: the schedulers stepping this optimizer (any on another optimizer are ignored).
        factors: ``{layer or group name: factor}`` (e.g. ``LRDecision.factors``).
        base: optional ``{group name: original lr}``, overriding the stored original.

    Returns:
        ``{group name: lr now in force}``.

    Raises:
        ValueError: a non-finite or non-positive factor or base LR.
    """
    factors = dict(factors or {})
    for key, f in list(factors.items()) + list((base or {}).items()):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
            raise ValueError(f"factors and base LRs must be finite numbers > 0; {key!r}: {f!r}")
    opt = unwrap_optimizer(optimizer)
    scheds = [s for s in _schedulers_of(schedulers)
              if unwrap_optimizer(getattr(s, "optimizer", opt)) is opt]
    out: Dict[str, float] = {}
    for i, group in enumerate(opt.param_groups):
        name = group.get("name")
        if name is None:
            continue
        if base and name in base:
            group["ww_base_lr"] = float(base[name])
        elif "ww_base_lr" not in group:
            group["ww_base_lr"] = float(group.get("initial_lr", group["lr"]))
        original = group["ww_base_lr"]
        f = group_factor(group, factors)
        ratio = f / float(group.get("ww_lr_factor", 1.0))
        group["ww_lr_factor"] = f
        group["lr"] = _scaled(group["lr"], ratio)
        if "initial_lr" in group:
            group["initial_lr"] = original * f
        for key in ("max_lr", "min_lr"):           # OneCycleLR recomputes from these
            if key in group:
                group[key] = _scaled(group[key], ratio)
        for s in scheds:
            base_lrs = getattr(s, "base_lrs", None)
            if base_lrs is not None and i < len(base_lrs):
                base_lrs[i] = original * f
            max_lrs = getattr(s, "max_lrs", None)  # CyclicLR
            if max_lrs is not None and i < len(max_lrs):
                max_lrs[i] = _scaled(max_lrs[i], ratio)
            last = getattr(s, "_last_lr", None)     # what get_last_lr() / LR monitors report
            if isinstance(last, list) and i < len(last):
                last[i] = group["lr"]
        out[name] = float(group["lr"])
    return out


def _scaled(value: Any, ratio: float) -> Any:
    # lr may be a 0-d tensor (capturable/fused optimizers): scale in place to keep its identity
    if hasattr(value, "mul_"):
        value.mul_(ratio)
        return value
    return float(value) * ratio
