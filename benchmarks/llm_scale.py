#!/usr/bin/env python
"""LLM-scale timing and peak memory: ``ww_core.analyze`` against WeightWatcher 0.7.7.

Two model shapes, built from synthetic "trained-like" weights (no real weights are downloaded)::

    tinyllama      TinyLlama-1.1B: 22 blocks of q/o 2048×2048, k/v 256×2048 (grouped k/v),
                   gate/up 5632×2048, down 2048×5632; plus embed_tokens and lm_head (32000×2048,
                   untied), both analysed (156 matrices, 1.1 G weights).
    llama7b-block  one Llama-7B block: q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008.

Each matrix is ``U·diag(s)·Vᵀ + noise``: random orthonormal ``U``, ``V`` (QR of Gaussians), a
power-law profile ``s_k ∝ k^(-1/(2(α-1)))`` (rank-ordered eigenvalues of a density ∝ λ^-α) with
α drawn from [3, 4], plus i.i.d. Gaussian noise holding 30 % of the Frobenius norm (a bulk);
seed = matrix index, so both sides read identical float32 ``.npy`` files (``--data``, default
``/tmp/ww-llm``).

Every timed run is a fresh process (``--child``; the dev python for ours, ``--wwref-python`` for
WW), so ``ru_maxrss`` is that run's peak resident memory; the weights are loaded (not timed),
one untimed warm-up on a tiny model, then one ``analyze`` is timed. Runs alternate
(ours default, ours float64, WW) per repeat::

    python benchmarks/llm_scale.py     # 7B block: 3 runs each; TinyLlama: ours 2 per precision, WW once
    python benchmarks/llm_scale.py --models llama7b-block --repeat 1 --ww-repeat 1
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SHAPES: Dict[str, List[Tuple[str, Tuple[int, int], str]]] = {}


def _block(prefix: str, d: int, kv: int, ff: int) -> List[Tuple[str, Tuple[int, int], str]]:
    a, m = f"{prefix}.self_attn", f"{prefix}.mlp"
    return [(f"{a}.q_proj", (d, d), "linear"), (f"{a}.k_proj", (kv, d), "linear"),
            (f"{a}.v_proj", (kv, d), "linear"), (f"{a}.o_proj", (d, d), "linear"),
            (f"{m}.gate_proj", (ff, d), "linear"), (f"{m}.up_proj", (ff, d), "linear"),
            (f"{m}.down_proj", (d, ff), "linear")]


SHAPES["tinyllama"] = ([("model.embed_tokens", (32000, 2048), "embedding")]
                       + [x for i in range(22) for x in _block(f"model.layers.{i}", 2048, 256, 5632)]
                       + [("lm_head", (32000, 2048), "linear")])
SHAPES["llama7b-block"] = _block("model.layers.0", 4096, 4096, 11008)


def loadavg() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------------- weights

def trained_like(rows: int, cols: int, seed: int):
    """A synthetic trained LLM layer: ``U·diag(s)·Vᵀ`` (power-law profile, alpha in [3, 4]) plus
    30 % Gaussian noise, scaled to entries ~0.02 (an init-like scale); a float32 torch tensor."""
    import torch

    g = torch.Generator().manual_seed(seed)
    alpha = 3.0 + float(torch.rand((), generator=g))
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    s = torch.arange(1, k + 1, dtype=torch.float32).pow(-1.0 / (2.0 * (alpha - 1.0)))
    w = (u * s) @ v.T
    w *= 0.7 / w.norm()
    noise = torch.randn(rows, cols, generator=g)
    w += noise * (0.3 / noise.norm())
    return w * ((rows * cols) ** 0.5 * 0.02 / w.norm())


def generate(folder: Path, name: str) -> float:
    """Write the synthetic weights of ``name`` (skips files already there); seconds taken."""
    import numpy as np

    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for idx, (lname, (rows, cols), _) in enumerate(SHAPES[name]):
        path = out / f"{lname}.npy"
        if path.exists():
            continue
        np.save(path, trained_like(rows, cols, idx).numpy())
    return time.perf_counter() - t0


def build(folder: Path, name: str, blocks: int = -1):
    """An ``nn.Module`` holding the saved weights (no copies: parameters share the arrays)."""
    import numpy as np
    import torch
    from torch import nn

    root = nn.Module()
    for lname, (rows, cols), kind in SHAPES[name]:
        if blocks >= 0 and ".layers." in lname and int(lname.split(".layers.")[1].split(".")[0]) >= blocks:
            continue
        w = torch.from_numpy(np.load(folder / name / f"{lname}.npy"))
        if kind == "embedding":
            mod = nn.Embedding(rows, cols, _weight=w)
        else:                                   # no throw-away init of the weight
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


def _tiny():
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 300)).eval()


# ----------------------------------------------------------------------------------- one run

def child(args) -> Dict[str, Any]:
    """One timed analysis in this process: time, RSS after loading, peak RSS, alphas."""
    import psutil
    import torch

    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    model = build(Path(args.data), args.model, args.blocks)
    load_s = time.perf_counter() - t0
    rss_loaded = proc.memory_info().rss
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.side == "ww":
        import logging
        import warnings

        import weightwatcher as ww
        logging.getLogger("weightwatcher").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        ww.WeightWatcher(model=_tiny()).analyze()                 # untimed warm-up
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        la0 = loadavg()
        t0 = time.perf_counter()
        details = ww.WeightWatcher(model=model).analyze()
        dt = time.perf_counter() - t0
        alphas = {str(n): float(a) for n, a in zip(details["longname"], details["alpha"])}
        version = ww.__version__
    else:
        sys.path.insert(0, str(REPO))
        import ww_core
        ww_core.analyze(_tiny())                                   # untimed warm-up
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        la0 = loadavg()
        t0 = time.perf_counter()
        res = ww_core.analyze(model, precision=args.precision)
        dt = time.perf_counter() - t0
        alphas = {la.name: float(la.alpha) for la in res.layers}
        version = "ww_core"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    prec = args.precision if args.side == "ours" else "ww"
    return {"side": args.side, "model": args.model, "precision": prec,
            "blocks": args.blocks, "s": dt, "load_s": load_s, "layers": len(alphas), "weights_bytes": weights,
            "rss_start": rss0, "rss_loaded": rss_loaded, "peak_rss_before_analyze": peak_before,
            "peak_rss": peak, "peak_over_loaded": peak - rss_loaded, "loadavg_start": la0,
            "loadavg_end": loadavg(), "torch_threads": torch.get_num_threads(), "version": version,
            "alphas": alphas}


def run_child(python: str, side: str, model: str, precision: str, blocks: int, data: str,
              log) -> Dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "--child", "--side", side, "--models", model,
           "--precision", precision, "--blocks", str(blocks), "--data", data]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=str(REPO))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{cmd} failed (rc {p.returncode}); see the log")
    return json.loads(lines[-1])


def machine() -> Dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    kb = int(Path("/proc/meminfo").read_text().split()[1])
    import numpy
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(kb / 2**20, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "numpy": numpy.__version__, "gpu": "not measured (no GPU on the machine)",
            "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                   "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}


def _max_dalpha(a: Dict[str, float], b: Dict[str, float]) -> float:
    common = [k for k in a if k in b and a[k] == a[k] and b[k] == b[k]]
    return max((abs(a[k] - b[k]) for k in common), default=float("nan"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["llama7b-block", "tinyllama"], choices=list(SHAPES))
    ap.add_argument("--repeat", type=int, nargs="*", default=[3, 2],
                    help="timed runs of ours per precision and model (same order as --models)")
    ap.add_argument("--ww-repeat", type=int, nargs="*", default=[3, 1],
                    help="WW runs per model (same order as --models; 0 skips WW)")
    ap.add_argument("--blocks", type=int, default=-1, help="only the first N blocks (-1: all)")
    ap.add_argument("--data", default="/tmp/ww-llm")
    ap.add_argument("--wwref-python", default=os.environ.get("WWREF_PY", str(REPO / ".tox/wwref/bin/python")))
    ap.add_argument("--out", default=str(HERE / "results" / "llm_scale.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side", default="ours", choices=["ours", "ww"], help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.model = args.models[0]
        print(json.dumps(child(args)), flush=True)
        return 0

    data = Path(args.data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.with_suffix(".log"), "a")
    report: Dict[str, Any] = {"started": _dt.datetime.now().isoformat(timespec="seconds"),
                              "machine": machine(), "loadavg_start": os.getloadavg(), "models": {}}
    if out.exists():                    # keep the other models' results (one file for all runs)
        old = json.loads(out.read_text())
        report["models"] = old.get("models", {})
        report["earlier"] = old.get("earlier", []) + [{k: old.get(k) for k in ("started", "loadavg_start",
                                                                               "loadavg_end")}]
    for mi, name in enumerate(args.models):
        key = name if args.blocks < 0 else f"{name} (first {args.blocks} blocks)"
        gen_s = generate(data, name)
        print(f"[llm] {name}: weights ready ({gen_s:.0f} s generating)", flush=True)
        ww_n = args.ww_repeat[mi] if mi < len(args.ww_repeat) else 1
        n = args.repeat[mi] if mi < len(args.repeat) else 1
        runs: List[Dict[str, Any]] = []
        prev = report["models"].get(key, {})           # an earlier invocation's runs of this model
        for k in range(max(n, ww_n)):
            plan = []
            if k < n:
                plan += [(sys.executable, "ours", "auto"), (sys.executable, "ours", "float64")]
            if k < ww_n:
                plan.append((args.wwref_python, "ww", "-"))
            for py, side, prec in plan:
                r = run_child(py, side, name, prec, args.blocks, str(data), log)
                runs.append(r)
                print(f"[llm] {name} run {k + 1} {side} {prec}: {r['s']:.1f} s, peak RSS "
                      f"{r['peak_rss'] / 2**30:.2f} GiB (loaded {r['rss_loaded'] / 2**30:.2f}), "
                      f"{r['layers']} layers, load {r['loadavg_start']:.2f}->{r['loadavg_end']:.2f}",
                      flush=True)
                report["models"][key] = merge(prev, summarize(runs))
                out.write_text(json.dumps(report, indent=1))
    report["loadavg_end"] = os.getloadavg()
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps({m: {k: v for k, v in s.items() if k != "runs"} for m, s in report["models"].items()},
                     indent=1))
    return 0


def merge(prev: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """``new`` over an earlier summary of the same model (precisions it lacks are kept)."""
    out = {**{k: v for k, v in prev.items() if k != "runs"}, **new}
    out["runs"] = prev.get("runs", []) + new["runs"]
    if "ww" in out:
        for key in ("auto", "float64"):
            if key in out:
                out[key]["ww_over_ours"] = out["ww"]["median_s"] / out[key]["median_s"]
    return out


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["precision"], []).append(r)
    s: Dict[str, Any] = {"runs": [{k: v for k, v in r.items() if k != "alphas"} for r in runs]}
    for key, rs in by.items():
        s[key] = {"median_s": statistics.median(r["s"] for r in rs), "runs_s": [r["s"] for r in rs],
                  "peak_rss_gib": max(r["peak_rss"] for r in rs) / 2**30,
                  "rss_loaded_gib": statistics.median(r["rss_loaded"] for r in rs) / 2**30,
                  "peak_over_loaded_gib": max(r["peak_over_loaded"] for r in rs) / 2**30,
                  "layers": rs[0]["layers"], "weights_gib": rs[0]["weights_bytes"] / 2**30,
                  "loadavg": [r["loadavg_start"] for r in rs]}
    if "ww" in by:
        ww_alpha = by["ww"][0]["alphas"]
        for key in ("auto", "float64"):
            if key in by:
                s[key]["ww_over_ours"] = s["ww"]["median_s"] / s[key]["median_s"]
                s[key]["max_dalpha_vs_ww"] = _max_dalpha(by[key][0]["alphas"], ww_alpha)
    return s


if __name__ == "__main__":
    sys.exit(main())
