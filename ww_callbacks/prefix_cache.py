"""Skip the forward pass of a frozen model prefix by replaying its cached output per example.

Once auto-freeze has frozen the front of a model (the input embeddings and the first ``k`` blocks
of its block list), the output of that prefix depends only on the example, provided

* the frozen part runs in eval mode: **while the cache is on, dropout is off (and BatchNorm uses
  its running statistics) in the frozen prefix**, on every batch, whether replayed or computed;
* the inputs are deterministic: the same example gives the same tensors every epoch (tokenised
  text without augmentation; not random crops, not masked-language-model masking).

:class:`PrefixCache` then keys each example (:func:`~ww_callbacks.prefix_cache_store.batch_keys`),
stores the input of block ``k`` per example on the first pass (RAM, then disk, within budgets)
and, on a batch whose examples are all stored, replaces the frozen modules' forwards by no-ops and
feeds block ``k`` the stored rows. Anything else computes as usual: an example not stored yet, a
budget spent, a shape that does not match, more distinct inputs than the data set has examples
(augmentation: the cache turns itself off), or a first replay whose check against a real
forward disagrees (the cache turns itself off, with a warning).

The block list is the model's largest ``nn.ModuleList`` of same-class modules (BERT's
``encoder.layer``, Llama's ``layers``, GPT-2's ``h``, EfficientNet's ``_blocks``); the modules
with parameters registered before it on its path (``embeddings``; ``wte`` and ``wpe``;
``_conv_stem`` and ``_bn0``) are the entry. Models whose blocks pass more than one tensor from
block to block (a separate residual stream) are not supported. Padding rows of a replayed batch
hold zeros at the padded positions, which attention masks out; outputs at padding positions
therefore differ from a recompute, outputs at real tokens do not.

Example:
    >>> import torch
    >>> net = torch.nn.Module()
    >>> net.stem = torch.nn.Linear(4, 8)
    >>> net.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])
    >>> net.forward = lambda x: net.blocks[2](net.blocks[1](net.blocks[0](net.stem(x))))
    >>> _ = [p.requires_grad_(False) for m in (net.stem, net.blocks[0]) for p in m.parameters()]
    >>> cache = PrefixCache(net)
    >>> x = torch.randn(5, 4)
    >>> for epoch in range(3):
    ...     _ = cache.begin_batch(x); y = net(x); cache.end_batch()
    >>> cache.depth, cache.stats.hits, cache.stats.misses   # epoch 2 checks, epoch 3 replays
    (1, 5, 10)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ww_callbacks.prefix_cache_store import RowStore, batch_keys
from ww_callbacks.warnings import warn

__all__ = ["PrefixCache", "PrefixCacheStats", "find_prefix_layout"]


@dataclasses.dataclass
class PrefixCacheStats:
    """Counters of a :class:`PrefixCache` (examples and batches of training forwards).

    Attributes:
        hits: examples whose prefix output was replayed.
        misses: examples whose prefix ran.
        stored: rows stored; ``rejected``: rows not stored because both budgets were spent.
        replayed_batches, computed_batches: batches replayed / computed with the cache on.
        ram_bytes, disk_bytes: bytes held (after :meth:`PrefixCache.close`: before it).
        fallbacks: reason -> batches computed for it (``"not-stored"``, ``"check"``,
            ``"shape"``, ``"keys"``...).
        depth: frozen blocks skipped (0: nothing cached yet).
        disabled: why the cache turned itself off, else ``None``.
    """

    hits: int = 0
    misses: int = 0
    stored: int = 0
    rejected: int = 0
    replayed_batches: int = 0
    computed_batches: int = 0
    ram_bytes: int = 0
    disk_bytes: int = 0
    fallbacks: Dict[str, int] = dataclasses.field(default_factory=dict)
    depth: int = 0
    disabled: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def find_prefix_layout(model: nn.Module) -> Tuple[str, List[Tuple[str, nn.Module]]]:
    """The block list of ``model`` and the entry modules that run before it.

    Returns:
        ``(blocks_path, [(entry_path, module), ...])``.

    Raises:
        ValueError: no ``nn.ModuleList`` of at least two modules of one class.

    Example:
        >>> import torch
        >>> net = torch.nn.Module()
        >>> net.embed = torch.nn.Embedding(10, 4)
        >>> net.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
        >>> find_prefix_layout(net)[0], [n for n, _ in find_prefix_layout(net)[1]]
        ('layers', ['embed'])
    """
    best, best_size = None, -1
    for name, mod in model.named_modules():
        kids = list(mod.children())
        if isinstance(mod, nn.ModuleList) and len(kids) >= 2 and len({type(k) for k in kids}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no block list (an nn.ModuleList of at least "
                         f"two modules of one class) to cache a frozen prefix of")
    entry: List[Tuple[str, nn.Module]] = []
    parts = best.split(".")
    for depth in range(len(parts)):   # siblings registered before each module on the path
        parent_path = ".".join(parts[:depth])
        parent = model.get_submodule(parent_path) if parent_path else model
        for child_name, child in parent.named_children():
            if child_name == parts[depth]:
                break
            if _has_params(child):
                entry.append((f"{parent_path}.{child_name}" if parent_path else child_name, child))
    return best, entry


class PrefixCache:
    """Replay a frozen prefix's output per example instead of recomputing it.

    Call :meth:`begin_batch` with each training batch before the forward (or let
    :meth:`hook_inputs` do it from the model's inputs) and :meth:`end_batch` after.

    Args:
        model: the module holding the block list.
        ram_mb, disk_mb: budgets of the stored rows in memory and in ``folder`` on disk.
        folder: where the disk tier writes (needed when ``disk_mb > 0``).
        check: compare the first replay at each depth with a real forward (one extra batch
            computed); a mismatch turns the cache off with a warning.
        expected_examples: the data set's size: more distinct inputs than that means the inputs
            change between epochs, and the cache turns itself off.
        rtol, atol: the check's tolerance.
        warn_fn: Lightning's ``rank_zero_warn`` or another ``warn(message, category=...)``.

    Raises:
        ValueError: no block list in ``model``, or a negative budget.
    """

    def __init__(self, model: nn.Module, ram_mb: float = 1024.0, disk_mb: float = 0.0,
                 folder: Optional[str] = None, check: bool = True,
                 expected_examples: Optional[int] = None, rtol: float = 1e-4, atol: float = 1e-5,
                 warn_fn: Optional[Callable[..., Any]] = None) -> None:
        self.blocks_path, self.entry = find_prefix_layout(model)
        self.blocks = list(model.get_submodule(self.blocks_path).children())
        self.store = RowStore(int(ram_mb * 2 ** 20), int(disk_mb * 2 ** 20), folder)
        self.check, self.expected = check, expected_examples
        self.rtol, self.atol, self.warn_fn = rtol, atol, warn_fn
        self.stats = PrefixCacheStats()
        self._depth = 0
        self._checked = False
        self._mode = "off"
        self._keys: List[bytes] = []
        self._lengths: List[Optional[int]] = []
        self._seq_len: Optional[int] = None
        self._replay: Optional[torch.Tensor] = None
        self._seen: set = set()
        self._out_len: Dict[int, int] = {}   # block index -> tuple length of its output (0: tensor)
        self._handles: List[Any] = []
        self._closed = False
        self._wrapped: List[nn.Module] = []
        for _, mod in self.entry:
            self._wrap(mod, self._entry_forward)
        for i, block in enumerate(self.blocks):
            self._wrap(block, lambda orig, *a, _i=i, **k: self._block_forward(_i, orig, *a, **k))
            self._handles.append(block.register_forward_pre_hook(
                lambda m, a, k, _i=i: self._before_block(_i, a, k), with_kwargs=True))

    # ------------------------------------------------------------------ public
    @property
    def depth(self) -> int:
        """Blocks of the frozen prefix whose output is cached (0: none)."""
        return self._depth

    @property
    def enabled(self) -> bool:
        return self.stats.disabled is None

    def hook_inputs(self, model: nn.Module) -> None:
        """Key every training forward of ``model`` by its inputs (``model(**batch)``, the Hugging
        Face Trainer's call); evaluation forwards (``model.training`` false) are left alone."""
        def before(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            if module.training:
                self.begin_batch({**{str(i): a for i, a in enumerate(args)}, **kwargs})
            else:
                self.end_batch()
        self._handles.append(model.register_forward_pre_hook(before, with_kwargs=True))
        self._handles.append(model.register_forward_hook(lambda *_: self.end_batch()))

    def begin_batch(self, batch: Any) -> str:
        """Key ``batch`` and choose how the next forward runs: ``"replay"``, ``"check"``,
        ``"compute"`` (store what is missing) or ``"off"``."""
        self._mode, self._replay = "off", None
        if not self.enabled or self._closed:
            return self._mode
        depth = self._frozen_depth()
        if depth != self._depth:
            self.store.clear()
            self._depth, self._checked, self._out_len = depth, False, {}
            self.stats.depth = depth
        if depth == 0:
            return self._mode
        for _, mod in self.entry:
            mod.eval()
        for block in self.blocks[:depth]:
            block.eval()
        try:
            self._keys, self._lengths, self._seq_len = batch_keys(batch)
        except ValueError:
            self._fallback("keys")
            self._mode = "off"
            return self._mode
        self._seen.update(self._keys)
        if self.expected is not None and len(self._seen) > self.expected:
            self._disable(f"{len(self._seen)} distinct inputs from a data set of {self.expected} "
                          f"examples: the inputs change between epochs (augmentation)")
            return self._mode
        if all(k in self.store for k in self._keys):
            rows = self._assemble()
            if rows is None:
                self._fallback("shape")
                self._mode = "compute"
            elif not self._checked and self.check:
                self._replay, self._mode = rows, "check"
                self._fallback("check")
            else:
                self._replay, self._mode = rows, "replay"
        else:
            self._fallback("not-stored")
            self._mode = "compute"
        if self._mode == "replay":
            self.stats.hits += len(self._keys)
            self.stats.replayed_batches += 1
        else:
            self.stats.misses += len(self._keys)
            self.stats.computed_batches += 1
        return self._mode

    def end_batch(self) -> None:
        """The batch's forward is over: later forwards run unchanged until the next :meth:`begin_batch`."""
        self._mode, self._replay = "off", None

    def summary(self) -> str:
        """One line: hits, misses, bytes held, fallbacks."""
        s = self.stats
        line = (f"prefix cache: {s.hits} examples replayed, {s.misses} computed, depth {s.depth} blocks, "
                f"{s.stored} rows stored ({(s.ram_bytes + s.disk_bytes) / 2 ** 20:.1f} MiB, "
                f"{s.disk_bytes / 2 ** 20:.1f} on disk), {s.rejected} over budget")
        return line + (f"; off: {s.disabled}" if s.disabled else "")

    def close(self) -> bool:
        """Give the modules their own forwards back, remove the hooks, drop the stored rows.
        Returns ``False`` when already closed."""
        if self._closed:
            return False
        self._closed = True
        self._mode, self._replay = "off", None
        for h in self._handles:
            h.remove()
        self._handles = []
        for mod in self._wrapped:
            mod.__dict__.pop("forward", None)
        self._wrapped = []
        self.store.clear()   # the stats keep the bytes held before closing
        return True

    # ------------------------------------------------------------------ internals
    def _wrap(self, mod: nn.Module, fn: Callable[..., Any]) -> None:
        orig = mod.forward
        mod.forward = lambda *a, **k: fn(orig, *a, **k)   # instance attribute: nn.Module calls it
        self._wrapped.append(mod)

    def _frozen_depth(self) -> int:
        if any(p.requires_grad for _, mod in self.entry for p in mod.parameters()):
            return 0
        depth = 0
        for block in self.blocks[:-1]:   # block k must exist to receive the replayed rows
            if any(p.requires_grad for p in block.parameters()):
                break
            depth += 1
        return depth

    def _entry_forward(self, orig: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._mode == "replay" and self._same_batch([*args, *kwargs.values()]):
            return self._replay
        return orig(*args, **kwargs)

    def _same_batch(self, inputs: List[Any]) -> bool:
        """Whether an entry's inputs can belong to the keyed batch (another forward in the same
        training step, on other inputs, computes: the whole forward then runs as usual)."""
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.dim() >= 1:
                if t.shape[0] not in (1, len(self._keys)) or (
                        self._seq_len is not None and t.dim() >= 2 and t.shape[1] != self._seq_len):
                    self._fallback("shape")
                    self._mode, self._replay = "off", None
                    return False
        return True

    def _block_forward(self, i: int, orig: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._mode == "replay" and i < self._depth and i in self._out_len:
            hidden = args[0] if args else kwargs.get("hidden_states")
            n = self._out_len[i]
            return hidden if n == 0 else (hidden,) + (None,) * (n - 1)
        out = orig(*args, **kwargs)
        if i < self._depth:
            self._out_len[i] = len(out) if isinstance(out, tuple) else 0
        return out

    def _before_block(self, i: int, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if i != self._depth or self._mode == "off":
            return None
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor) or hidden.shape[0] != len(self._keys):
            self._fallback("shape")
            self._mode = "off"
            return None
        if self._mode == "replay":
            rows = self._replay.to(hidden.device)   # type: ignore[union-attr]
            return ((rows,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": rows})
        if self._mode == "check":
            self._compare(hidden)
        elif self._mode == "compute":
            self._store(hidden)
        return None

    def _row(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        n = self._lengths[i]
        if n is not None and hidden.dim() >= 2 and hidden.shape[1] == self._seq_len:
            return hidden[i, :n]
        return hidden[i]

    def _store(self, hidden: torch.Tensor) -> None:
        if all(key in self.store for key in self._keys):
            return
        cpu = hidden.detach().to("cpu")   # one copy off the device, not one per row
        for i, key in enumerate(self._keys):
            if key in self.store:
                continue
            if self.store.put(key, self._row(cpu, i)):
                self.stats.stored += 1
            else:
                self.stats.rejected += 1
        self._sync_bytes()

    def _assemble(self) -> Optional[torch.Tensor]:
        rows = [self.store.get(k) for k in self._keys]
        if any(r is None for r in rows):
            return None
        targets = []
        for n, row in zip(self._lengths, rows):
            if n is not None and self._seq_len is not None and row.dim() >= 1 and row.shape[0] == n:
                targets.append((self._seq_len,) + tuple(row.shape[1:]))   # padding stripped
            else:
                targets.append(tuple(row.shape))
        if len(set(targets)) != 1:
            return None
        out = rows[0].new_zeros((len(rows),) + targets[0])   # type: ignore[union-attr]
        for i, row in enumerate(rows):
            if row.dim() == 0:   # type: ignore[union-attr]
                out[i] = row
            else:
                out[i, :row.shape[0]] = row   # type: ignore[union-attr]
        device = next((p.device for p in self.blocks[self._depth].parameters()), out.device)
        return out.to(device)

    def _compare(self, hidden: torch.Tensor) -> None:
        cached = self._replay.to(hidden.device)   # type: ignore[union-attr]
        if tuple(hidden.shape) != tuple(cached.shape):
            self._disable(f"the stored rows make a {tuple(cached.shape)} batch where a real forward "
                          f"gives {tuple(hidden.shape)}")
            return
        worst = 0.0
        for i in range(len(self._keys)):
            real, kept = self._row(hidden, i).detach().float(), self._row(cached, i).float()
            if not torch.allclose(real, kept, rtol=self.rtol, atol=self.atol):
                worst = max(worst, float((real - kept).abs().max()))
        if worst > 0.0:
            self._disable(f"the first replayed batch differs from a real forward by up to {worst:.3g}: "
                          f"the inputs or the frozen prefix are not deterministic")
        else:
            self._checked = True

    def _fallback(self, reason: str) -> None:
        self.stats.fallbacks[reason] = self.stats.fallbacks.get(reason, 0) + 1

    def _disable(self, reason: str) -> None:
        self.stats.disabled = reason
        self._mode, self._replay = "off", None
        self.store.clear()
        self._sync_bytes()
        warn(f"prefix cache turned off: {reason}; the frozen prefix is recomputed", stacklevel=4,
             warn_fn=self.warn_fn)

    def _sync_bytes(self) -> None:
        self.stats.ram_bytes, self.stats.disk_bytes = self.store.ram_bytes, self.store.disk_bytes
