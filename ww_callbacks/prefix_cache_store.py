"""Per-example keys and the row store of :mod:`ww_callbacks.prefix_cache` (torch only).

A batch is cut into examples by its leading dimension. An example's key is a hash of every tensor
row of the batch (``input_ids``, ``attention_mask``, ``token_type_ids``, labels...), with the
padding of right-padded rows stripped (the ``attention_mask`` says where it starts), so that the
same example padded to another length in another batch has the same key. Rows whose mask is not
``1...1 0...0`` (left padding) are hashed whole: they match only at the same padded length.

:class:`RowStore` keeps one tensor per key, in RAM up to a byte budget, then appended to one file
on disk up to a second budget; beyond both a row is not stored (the example is recomputed).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["batch_keys", "RowStore", "MASK_KEY"]

#: The batch entry that marks real tokens (1) and padding (0).
MASK_KEY = "attention_mask"


def _tensors(batch: Any, prefix: str = "") -> List[Tuple[str, torch.Tensor]]:
    """The tensors of a (nested) dict / list / tuple batch with their paths, in a stable order."""
    if isinstance(batch, torch.Tensor):
        return [(prefix, batch)]
    if isinstance(batch, Mapping):
        return [pair for key in sorted(batch, key=str) for pair in _tensors(batch[key], f"{prefix}/{key}")]
    if isinstance(batch, (list, tuple)):
        return [pair for i, item in enumerate(batch) for pair in _tensors(item, f"{prefix}/{i}")]
    return []


def _right_padded_lengths(mask: torch.Tensor) -> List[Optional[int]]:
    """Per row of a 2-D 0/1 mask: the number of real tokens if the row is ``1...1 0...0``, else ``None``."""
    m = mask.detach().to("cpu") != 0
    n = m.sum(dim=1)
    pos = torch.arange(m.shape[1]).unsqueeze(0)
    right = ((pos < n.unsqueeze(1)) == m).all(dim=1)
    return [int(k) if ok else None for k, ok in zip(n.tolist(), right.tolist())]


def batch_keys(batch: Any) -> Tuple[List[bytes], List[Optional[int]], Optional[int]]:
    """Per-example keys of ``batch``.

    Args:
        batch: a tensor, or a dict / list / tuple of tensors sharing the leading (batch) dimension;
            other entries are ignored.

    Returns:
        ``(keys, lengths, seq_len)``: one 16-byte key per example; per example its number of real
        tokens when its padding was stripped (else ``None``); the padded length of a 2-D
        ``attention_mask`` (else ``None``).

    Raises:
        ValueError: no tensor in ``batch``, or tensors whose leading dimensions differ.

    Example:
        >>> import torch
        >>> a = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
        >>> b = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[1, 1]])}
        >>> batch_keys(a)[0] == batch_keys(b)[0], batch_keys(a)[1]
        (True, [2])
    """
    tensors = [(p, t) for p, t in _tensors(batch) if t.dim() >= 1]
    if not tensors:
        raise ValueError("the batch holds no tensor to key its examples by")
    size = int(tensors[0][1].shape[0])
    if any(int(t.shape[0]) != size for _, t in tensors):
        raise ValueError(f"the batch's tensors differ in their leading dimension: "
                         f"{[(p, tuple(t.shape)) for p, t in tensors]}")
    mask = batch.get(MASK_KEY) if isinstance(batch, Mapping) else None
    lengths: List[Optional[int]] = [None] * size
    seq_len = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        seq_len = int(mask.shape[1])
        lengths = _right_padded_lengths(mask)
    cpu = [(p, t.detach().to("cpu").contiguous()) for p, t in tensors]
    keys = []
    for i in range(size):
        h = hashlib.blake2b(digest_size=16)
        for path, t in cpu:
            row = t[i]
            if lengths[i] is not None and seq_len is not None and t.dim() >= 2 and t.shape[1] == seq_len:
                row = row[:lengths[i]]
            h.update(f"{path}|{row.dtype}|{tuple(row.shape)}|".encode())
            h.update(row.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if row.numel() else b"")
        keys.append(h.digest())
    return keys, lengths, seq_len


class RowStore:
    """One tensor per key: in RAM up to ``ram_bytes``, then on disk up to ``disk_bytes``.

    Args:
        ram_bytes: budget of the rows kept in memory.
        disk_bytes: budget of the rows appended to ``folder/rows.bin`` once RAM is full
            (0: no disk).
        folder: where the disk file goes (needed when ``disk_bytes > 0``).

    Raises:
        ValueError: a negative budget, or a disk budget without a folder.

    Example:
        >>> import torch
        >>> store = RowStore(ram_bytes=64, disk_bytes=0)
        >>> store.put(b"a", torch.ones(4)), store.put(b"b", torch.ones(20))   # 16 B, then 80 B > 64
        (True, False)
        >>> store.get(b"a").tolist(), store.ram_bytes, b"b" in store
        ([1.0, 1.0, 1.0, 1.0], 16, False)
    """

    def __init__(self, ram_bytes: int, disk_bytes: int = 0, folder: Optional[str] = None) -> None:
        if ram_bytes < 0 or disk_bytes < 0:
            raise ValueError(f"cache budgets must be >= 0, got ram={ram_bytes}, disk={disk_bytes}")
        if disk_bytes > 0 and not folder:
            raise ValueError("a disk budget needs a folder for the cache file")
        self.ram_budget, self.disk_budget, self.folder = int(ram_bytes), int(disk_bytes), folder
        self._ram: Dict[bytes, torch.Tensor] = {}
        self._disk: Dict[bytes, Tuple[int, Tuple[int, ...], torch.dtype]] = {}
        self.ram_bytes = 0
        self.disk_bytes = 0
        self._file: Any = None

    def __contains__(self, key: bytes) -> bool:
        return key in self._ram or key in self._disk

    def __len__(self) -> int:
        return len(self._ram) + len(self._disk)

    def put(self, key: bytes, row: torch.Tensor) -> bool:
        """Keep a copy of ``row`` (on the CPU) under ``key``; ``False`` when both budgets are spent."""
        if key in self:
            return True
        nbytes = row.numel() * row.element_size()
        if self.ram_bytes + nbytes <= self.ram_budget:
            self._ram[key] = row.detach().to("cpu", copy=True).contiguous()
            self.ram_bytes += nbytes
            return True
        if self.disk_bytes + nbytes <= self.disk_budget:
            f = self._open()
            f.seek(0, os.SEEK_END)
            offset = f.tell()
            cpu = row.detach().to("cpu").contiguous()
            f.write(cpu.view(-1).view(torch.uint8).numpy().tobytes() if nbytes else b"")
            self._disk[key] = (offset, tuple(cpu.shape), cpu.dtype)
            self.disk_bytes += nbytes
            return True
        return False

    def get(self, key: bytes) -> Optional[torch.Tensor]:
        """The row stored under ``key`` (a CPU tensor), or ``None``."""
        row = self._ram.get(key)
        if row is not None or key not in self._disk:
            return row
        offset, shape, dtype = self._disk[key]
        f = self._open()
        f.flush()
        f.seek(offset)
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        data = bytearray(f.read(size))
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape) if size else \
            torch.empty(shape, dtype=dtype)

    def _open(self) -> Any:
        if self._file is None:
            os.makedirs(self.folder, exist_ok=True)   # type: ignore[arg-type]
            self._file = open(os.path.join(self.folder, "rows.bin"), "w+b")   # type: ignore[arg-type]
        return self._file

    def clear(self) -> None:
        """Drop every row (and the disk file)."""
        self._ram.clear()
        self._disk.clear()
        self.ram_bytes = self.disk_bytes = 0
        if self._file is not None:
            name = self._file.name
            self._file.close()
            self._file = None
            try:
                os.remove(name)
            except OSError:
                pass

    def keys(self) -> Sequence[bytes]:
        return [*self._ram, *self._disk]
