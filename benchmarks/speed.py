#!/usr/bin/env python
"""Speed of ``ww_core.analyze`` against WeightWatcher 0.7.7 and against the bare eigensolver.

Run with the dev python (the one that imports ``ww_core``)::

    python benchmarks/speed.py                       # all models, median of 3, waits for a quiet machine
    python benchmarks/speed.py --models minilm-l6 --repeat 1 --no-wait --no-svd   # quick check

WeightWatcher runs in its own environment (``--wwref-python``, default ``$WWREF_PY``) in a
long-lived worker process (``benchmarks/ww_worker.py``): interpreter start, imports and model
loading happen once and are reported separately; only ``WeightWatcher(model).analyze()`` is timed
there, and only ``ww_core.analyze(model)`` here. Both sides load the same weights: the same loader
code (``benchmarks/ww_agreement.py``) reading the files shipped in the same pip packages, or, for the
4096-wide layer, the same ``.npy`` file written by this driver to a temporary folder.

Per model and per ``randomize`` setting the runs alternate (ours f64, ours f32, floor, WW)
``--repeat`` times and the medians are reported:

* **WW**: ``WeightWatcher(model=m).analyze(randomize=...)`` (its defaults otherwise, CPU).
* **ours**: ``ww_core.analyze(m, randomize=..., seed=0)`` (defaults: precision ``auto``,
  same-shaped layers batched).
* **ours f64**: the same with ``precision="float64"``.
* **floor**: what the engine must at least do: the Gram products ``WᵀW`` (or ``WWᵀ``, the smaller)
  plus ``torch.linalg.eigvalsh`` on them, in float32 and float64, on the matrices ``ww_core`` solves (same
  layers, same batches; with ``randomize`` also each layer's shuffled replicas, stacked into one
  call as the engine does; the shuffles themselves are not timed). ``ours / floor`` is against
  this. Its two parts are reported too (``Gram s``, ``eigvalsh s``; informative).
* **svd**: ``scipy.linalg.svdvals`` in float64 on every matrix slice (the eigensolver
  WeightWatcher uses on CPU), timed once, as a second reference.

Two synthetic layer sets time ``precision="auto"``'s prediction (no WeightWatcher run on them):
``llm-like`` (four trained-like layers: 2816×1024, 1024×2816 and two 1024×1024, each
``U·diag(s)·Vᵀ`` with a power-law profile plus 30 % Gaussian noise, as ``benchmarks/llm_scale.py``
builds them) and ``random`` (Gaussian 4096², 2048², 1024², entries 0.02). **ours prev** times
``ww_core.analyze(m, previous=r)`` with ``r`` an earlier (untimed) result of the same model, as a
training callback has it from the analysis before.

The float32-vs-float64 check runs ``ww_core.analyze`` with ``precision="float32"`` and
``"float64"`` and reports the largest |Δalpha| over the layers (the fitted tail exponent).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import ww_agreement as wa  # noqa: E402  (the model loaders shared with the agreement harness)
from llm_scale import trained_like  # noqa: E402  (the synthetic LLM layer)

DEFAULT_MODELS = ["minilm-l6", "efficientnet-lite0", "linear-4096", "llm-like", "random"]
SYNTHETIC = ("llm-like", "random")
KIND = {"llm-like": "4 trained-like LLM layers", "random": "Gaussian 4096², 2048², 1024²",
        "minilm-l6": "transformer", "efficientnet-lite0": "conv net (state dict)",
        "crepe-full": "conv net", "crepe-tiny": "conv net", "digit-cnn": "conv net",
        "linear-4096": "one 4096×4096 Linear"}
WIDE = 4096


# ----------------------------------------------------------------------------------- the machine

def machine() -> Dict[str, Any]:
    import scipy
    import torch
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except Exception:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "numpy": np.__version__,
            "scipy": scipy.__version__}


def loadavg() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(threshold: float, max_s: float, poll_s: float = 30.0) -> Tuple[bool, List[float]]:
    """Poll the 1-minute load average until it is below ``threshold`` (or ``max_s`` passed)."""
    seen = [loadavg()]
    t0 = time.time()
    while seen[-1] >= threshold and time.time() - t0 < max_s:
        print(f"[speed] load average {seen[-1]:.2f} >= {threshold}; waiting "
              f"({(time.time() - t0) / 60:.0f}/{max_s / 60:.0f} min)", flush=True)
        time.sleep(poll_s)
        seen.append(loadavg())
    return seen[-1] < threshold, seen


# ----------------------------------------------------------------------------------- the models

def write_linear_npy(folder: Path, n: int = WIDE, seed: int = 0) -> Path:
    """A heavy-tailed n×n matrix (Student-t, 3 d.o.f., entries / sqrt(n)) as float32 ``.npy``.

    Heavy-tailed entries give a heavy-tailed ESD like a trained layer's, so the power-law scan does
    real work; the spectrum's shape does not change the eigensolver's cost.
    """
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3.0, size=(n, n)) / math.sqrt(n)).astype(np.float32)
    path = folder / f"linear_{n}.npy"
    np.save(path, w)
    return path


def synthetic_set(name: str) -> Dict[str, Any]:
    """The ``llm-like`` or ``random`` layer set as a state dict (float32 tensors)."""
    import torch
    if name == "llm-like":
        shapes = [(2816, 1024), (1024, 2816), (1024, 1024), (1024, 1024)]
        return {f"layers.{i}.weight": trained_like(r, c, i) for i, (r, c) in enumerate(shapes)}
    g = torch.Generator().manual_seed(100)
    return {f"layers.{i}.weight": torch.randn(n, n, generator=g) * 0.02
            for i, n in enumerate((4096, 2048, 1024))}


def load_model(name: str, npy: Optional[Path]):
    if name in SYNTHETIC:
        return synthetic_set(name)
    if name == "linear-4096":
        from ww_worker import linear_from_npy  # the same builder the worker uses
        return linear_from_npy(str(npy))
    return wa.MODELS[name]()[0]


# ----------------------------------------------------------------------------------- WW worker

class Worker:
    def __init__(self, python: str, log: Path):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        self.log = open(log, "w")
        t0 = time.perf_counter()
        self.p = subprocess.Popen([python, str(HERE / "ww_worker.py")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
                                  cwd=str(REPO))
        self.hello = self._read()
        self.hello["startup_s"] = time.perf_counter() - t0

    def _read(self) -> Dict[str, Any]:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"WW worker died; see {self.log.name}")
        msg = json.loads(line)
        if not msg.get("ok"):
            raise RuntimeError(f"WW worker: {msg.get('error')}")
        return msg

    def ask(self, **req) -> Dict[str, Any]:
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.ask(op="quit")
        except Exception:
            pass
        self.p.wait(timeout=60)
        self.log.close()


# ----------------------------------------------------------------------------------- floor

def _gram(w):
    rows, cols = w.shape[-2:]
    return w.mT @ w if rows >= cols else w @ w.mT


class Floor:
    """The Gram matrices ww_core solves for one model, and the bare eigensolver timed on them."""

    def __init__(self, source: Any, randomize: bool):
        import torch

        from ww_core import rmt
        from ww_core.analyze import DEFAULT_MAX_EVALS, DEFAULT_MAX_N, DEFAULT_MIN_EVALS, skip_reason
        from ww_core.batching import group_layers
        from ww_core.sources import find_layers
        todo = [lm for lm in find_layers(source)
                if not skip_reason(lm, DEFAULT_MIN_EVALS, DEFAULT_MAX_EVALS, DEFAULT_MAX_N)]
        self.n_layers = len(todo)
        # one list of (rf, rows, cols) stacks per eigensolver call: the engine's groups, each
        # layer followed by its shuffled replicas with randomize (not timed: shuffling is ours)
        self.calls: List[List[Any]] = []
        rng = np.random.default_rng(0)
        with torch.no_grad():
            for group in group_layers(todo, 1 << 24):
                parts = []
                for lm in (todo[i] for i in group):
                    st = torch.as_tensor(lm.load()).detach().to(torch.float64)
                    parts.append(st)
                    if randomize:
                        k = rmt.num_replicas(lm.num_evals)
                        parts.append(rmt.shuffle_slices(st.repeat(k, 1, 1) if k > 1 else st, rng))
                self.calls.append(parts)
        self.n_solves = len(self.calls)

    def time_s(self, precision: str) -> Tuple[float, float]:
        """(Gram s, eigensolve s) for one pass over all matrices in ``precision``; the floor is
        their sum. The eigensolve is the engine's own (``spectrum._batched_eigvalsh``: small
        matrices split over the cores, large ones on LAPACK's threads)."""
        import torch

        from ww_core.spectrum import _batched_eigvalsh
        dtype = torch.float64 if precision == "float64" else torch.float32
        calls = [[p.to(dtype) for p in parts] for parts in self.calls]    # (conversion untimed)
        t_gram = t_eig = 0.0
        with torch.no_grad():
            for parts in calls:
                t0 = time.perf_counter()
                grams = [_gram(p) for p in parts]
                g = grams[0] if len(grams) == 1 else torch.cat(grams)
                t1 = time.perf_counter()
                _batched_eigvalsh(g)
                t_gram += t1 - t0
                t_eig += time.perf_counter() - t1
                del g, grams
        return t_gram, t_eig

    def svdvals_s(self) -> float:
        import scipy.linalg
        mats = [p.numpy() for parts in self.calls for p in parts]
        t0 = time.perf_counter()
        for st in mats:
            for w in st:
                scipy.linalg.svdvals(w, check_finite=False)
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------------- ours

def ours_s(source: Any, randomize: bool, precision: str = "auto", previous: Any = None,
           predict: bool = True) -> float:
    """Seconds of one ``ww_core.analyze``; ``predict=False``: ``auto`` as it was without the
    float64 prediction (every layer solved in float32 first, rejected ones solved again)."""
    import ww_core
    from ww_core import precision as prec
    real = prec.predict_float64
    if not predict:
        prec.predict_float64 = lambda *a, **k: ""
    try:
        t0 = time.perf_counter()
        ww_core.analyze(source, randomize=randomize, seed=0, precision=precision, previous=previous)
        return time.perf_counter() - t0
    finally:
        prec.predict_float64 = real


def precision_check(source: Any) -> Dict[str, Dict[str, Any]]:
    """Default ("auto") and plain float32 against float64: alpha, xmin, fit status, re-solves."""
    import ww_core
    r64 = {l.name: l for l in ww_core.analyze(source, precision="float64").layers}
    out: Dict[str, Dict[str, Any]] = {}
    for prec in ("auto", "float32"):
        worst, worst_name, n, one_failed, dxmin_rel, dother = 0.0, "", 0, 0, 0.0, 0.0
        layers = ww_core.analyze(source, precision=prec).layers
        for l32 in layers:
            l64 = r64.get(l32.name)
            if l64 is None:
                continue
            ok32, ok64 = math.isfinite(l32.alpha), math.isfinite(l64.alpha)
            if ok32 != ok64:
                one_failed += 1
                continue
            if not ok32:
                continue
            n += 1
            d = abs(l32.alpha - l64.alpha)
            if d > worst:
                worst, worst_name = d, l32.name
            if l64.xmin:
                dxmin_rel = max(dxmin_rel, abs(l32.xmin - l64.xmin) / abs(l64.xmin))
            for key in ("log_norm", "log_spectral_norm", "stable_rank", "alpha_hill"):
                a, b = getattr(l32, key), getattr(l64, key)
                if math.isfinite(a) and math.isfinite(b) and b:
                    dother = max(dother, abs(a - b) / abs(b))
        out[prec] = {"layers": n, "max_dalpha": worst, "worst_layer": worst_name,
                     "one_side_failed": one_failed, "max_rel_dxmin": dxmin_rel, "max_rel_dother": dother,
                     "resolved_f64": sum(l.precision == "float64" for l in layers),
                     "solved_twice": sum(getattr(l, "solves", 1) == 2 for l in layers),
                     "predicted_f64": sum(getattr(l, "precision_reason", "").startswith("predicted")
                                          for l in layers),
                     "rank_differs": sum(l.matrix_rank != r64[l.name].matrix_rank
                                         for l in layers if l.name in r64)}
    return out


# ----------------------------------------------------------------------------------- main

def _med(xs: List[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def _f(x: float, d: int = 2) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{d}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS,
                    help=f"from {list(wa.MODELS) + ['linear-4096']}")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per side (median reported)")
    ap.add_argument("--randomize", choices=["both", "off", "on"], default="both")
    ap.add_argument("--wwref-python", default=os.environ.get("WWREF_PY"),
                    help="python of a venv with weightwatcher==0.7.7 (default: $WWREF_PY, "
                         "which tox -e bench sets)")
    ap.add_argument("--no-ww", action="store_true", help="skip WeightWatcher (quick engine checks)")
    ap.add_argument("--no-svd", action="store_true", help="skip the scipy svdvals reference column")
    ap.add_argument("--no-precision", action="store_true", help="skip the float32/float64 check")
    ap.add_argument("--unpredicted", action="store_true",
                    help="also time auto without the float64 prediction (float32 first everywhere)")
    ap.add_argument("--wait-load", type=float, default=2.5,
                    help="wait until the 1-min load average is below this before starting")
    ap.add_argument("--wait-max", type=float, default=1200.0, help="give up waiting after this many s")
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "speed.md"), help="markdown report ('' = none)")
    args = ap.parse_args(argv)
    if not args.no_ww and not args.wwref_python:
        ap.error("WeightWatcher's python is not set: pass --wwref-python or set WWREF_PY "
                 "(the python of a venv with weightwatcher==0.7.7), or --no-ww")

    waited: List[float] = []
    quiet = None
    if not args.no_wait:
        quiet, waited = wait_for_quiet(args.wait_load, args.wait_max)
    mach = machine()
    load_start = loadavg()
    started = _dt.datetime.now().isoformat(timespec="seconds")
    print(f"[speed] {mach}", flush=True)
    print(f"[speed] load average at start {load_start:.2f}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="ww-speed-"))
    npy = write_linear_npy(tmp) if "linear-4096" in args.models else None
    worker = None
    if not args.no_ww:
        worker = Worker(args.wwref_python, tmp / "ww_worker.log")
        print(f"[speed] WW worker: {worker.hello}", flush=True)
    # Untimed warm-up of both sides (first-call costs: lazy imports, LAPACK/OpenMP start-up).
    from ww_worker import _tiny

    import ww_core
    for rnd in (False, True):
        ww_core.analyze(_tiny(), randomize=rnd, seed=0)
    if worker:
        worker.ask(op="warmup")
    settings = {"both": [False, True], "off": [False], "on": [True]}[args.randomize]

    rows: List[Dict[str, Any]] = []
    prec: Dict[str, Dict[str, Any]] = {}
    loads: List[float] = [load_start]
    for name in args.models:
        t0 = time.perf_counter()
        src = load_model(name, npy)
        our_load = time.perf_counter() - t0
        ww_load = math.nan
        use_ww = worker is not None and name not in SYNTHETIC
        if use_ww:
            npy_arg = str(npy) if npy and name == "linear-4096" else None
            ww_load = worker.ask(op="load", model=name, npy=npy_arg)["load_s"]
        for rnd in settings:
            floor = Floor(src, rnd)
            prev = ww_core.analyze(src, randomize=rnd, seed=0)          # (untimed)
            t_ours, t_f64, t_gram, t_eig, t_floor, t_floor64, t_ww, ww_rows = [], [], [], [], [], [], [], None
            t_prev: List[float] = []
            t_old: List[float] = []
            for k in range(max(1, args.repeat)):
                t_ours.append(ours_s(src, rnd))
                t_prev.append(ours_s(src, rnd, previous=prev))
                if args.unpredicted:
                    t_old.append(ours_s(src, rnd, predict=False))
                t_f64.append(ours_s(src, rnd, precision="float64"))
                g, e = floor.time_s("float32")
                t_gram.append(g)
                t_eig.append(e)
                t_floor.append(g + e)
                t_floor64.append(sum(floor.time_s("float64")))
                if use_ww:
                    r = worker.ask(op="analyze", model=name, randomize=rnd)
                    t_ww.append(r["s"])
                    ww_rows = r["rows"]
                loads.append(loadavg())
                print(f"[speed] {name} randomize={rnd} run {k + 1}: ours {t_ours[-1]:.2f} s, "
                      f"prev {t_prev[-1]:.2f} s, " + (f"unpredicted {t_old[-1]:.2f} s, " if t_old else "")
                      + f"f64 {t_f64[-1]:.2f} s, floor f32 {t_floor[-1]:.2f} s, f64 {t_floor64[-1]:.2f} s"
                      + (f", WW {t_ww[-1]:.2f} s" if t_ww else "") + f" (load {loads[-1]:.2f})", flush=True)
            svd = math.nan if args.no_svd else floor.svdvals_s()
            row = {"model": name, "kind": KIND.get(name, ""), "randomize": rnd,
                   "layers": floor.n_layers, "solves": floor.n_solves, "ww_rows": ww_rows,
                   "ww_s": _med(t_ww), "ours_s": _med(t_ours), "ours_f64_s": _med(t_f64),
                   "ours_prev_s": _med(t_prev), "runs_ours_prev": t_prev,
                   "ours_unpredicted_s": _med(t_old), "runs_ours_unpredicted": t_old,
                   "solved_twice": sum(l.solves == 2 for l in prev.layers),
                   "predicted_f64": sum(l.precision_reason.startswith("predicted") for l in prev.layers),
                   "floor_s": _med(t_floor), "floor_f64_s": _med(t_floor64), "gram_s": _med(t_gram),
                   "eigvalsh_s": _med(t_eig), "svd_s": svd, "runs_ours": t_ours, "runs_ours_f64": t_f64,
                   "runs_ww": t_ww, "runs_floor": t_floor, "runs_floor_f64": t_floor64,
                   "our_load_s": our_load, "ww_load_s": ww_load}
            row["ratio"] = row["ww_s"] / row["ours_s"]
            row["ratio_f64"] = row["ww_s"] / row["ours_f64_s"]
            row["over_floor"] = row["ours_s"] / row["floor_s"]
            row["over_floor_f64"] = row["ours_f64_s"] / row["floor_f64_s"]
            row["over_f64"] = row["ours_s"] / row["ours_f64_s"]
            row["prev_over_f64"] = row["ours_prev_s"] / row["ours_f64_s"]
            row["prev_over_floor"] = row["ours_prev_s"] / row["floor_s"]
            row["unpredicted_over_f64"] = row["ours_unpredicted_s"] / row["ours_f64_s"]
            row["unpredicted_over_floor"] = row["ours_unpredicted_s"] / row["floor_s"]
            rows.append(row)
            del floor
        if not args.no_precision:
            prec[name] = precision_check(src)
            print(f"[speed] {name} float32 vs float64: {prec[name]}", flush=True)
        del src
    if worker:
        worker.close()
    load_end = loadavg()
    loads.append(load_end)

    report = render(rows, prec, mach, worker.hello if worker else None, args, started,
                    load_start, load_end, loads, quiet, waited)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"rows": rows, "precision": prec, "machine": mach, "ww": worker.hello if worker else None,
             "loadavg": {"start": load_start, "end": load_end, "samples": loads, "waited": waited}},
            indent=2, default=str))
        print(f"[speed] wrote {args.out}")
    return 0


def render(rows, prec, mach, ww_hello, args, started, load_start, load_end, loads, quiet, waited) -> str:
    L = ["# ww_core speed vs WeightWatcher 0.7.7", "",
         f"Generated by `benchmarks/speed.py` on {started}; median of {args.repeat} alternating runs "
         "per side (ours, ours f64, floor f32, floor f64, WW). Times in seconds, wall clock, "
         "weights already in memory.", "",
         f"* Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory']} RAM, {mach['platform']}, "
         "no GPU.",
         f"* Dev side: python {mach['python']}, torch {mach['torch']} ({mach['torch_threads']} threads), "
         f"numpy {mach['numpy']}, scipy {mach['scipy']}.",
         ]
    if ww_hello:
        L.append(f"* WW side: weightwatcher {ww_hello['weightwatcher']}, torch {ww_hello['torch']} "
                 f"({ww_hello['threads']} threads), numpy {ww_hello['numpy']}, scipy {ww_hello['scipy']}; "
                 f"worker start + imports {ww_hello['startup_s']:.1f} s (not in the table).")
    L.append(f"* 1-min load average: {load_start:.2f} at start, {load_end:.2f} at end, "
             f"max {max(loads):.2f} during the runs"
             + ("" if quiet is None else
                (f" (waited {30 * (len(waited) - 1)} s for < {args.wait_load})" if quiet else
                 f" — **the machine never got below {args.wait_load} in {args.wait_max / 60:.0f} min; "
                 "run anyway, numbers are noisy**")) + ".")
    L += ["", "| model | randomize | layers | WW s | ours s (default) | WW / ours | ours / floor | "
          "floor s (f32) | ours f64 s | WW / ours f64 | ours f64 / floor f64 | floor f64 s | "
          "Gram s (f32) | eigensolve s (f32) | scipy svdvals f64 s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| `{r['model']}` ({r['kind']}) | {'on' if r['randomize'] else 'off'} | {r['layers']} "
                 f"| {_f(r['ww_s'])} | {_f(r['ours_s'])} | **{_f(r['ratio'], 1)}×** | {_f(r['over_floor'])} "
                 f"| {_f(r['floor_s'])} | {_f(r['ours_f64_s'])} | {_f(r['ratio_f64'], 1)}× "
                 f"| {_f(r['over_floor_f64'])} | {_f(r['floor_f64_s'])} | {_f(r['gram_s'])} "
                 f"| {_f(r['eigvalsh_s'])} | {_f(r['svd_s'])} |")
    L += ["", "*ours (default)*: `ww_core.analyze(m, randomize=..., seed=0)`, precision `auto` (float32, "
          "layers the float32 checks reject re-solved in float64). *ours f64*: `precision=\"float64\"` "
          "(WeightWatcher's numbers to rounding). *floor*: what the engine must at least do: the Gram "
          "products plus the engine's eigensolve (`torch.linalg.eigvalsh`, small matrices split over "
          "the cores) on the very matrices ww_core solves, in the same groups (with randomize each "
          "layer's shuffled replicas in the same call; the shuffling itself is not in the floor), in "
          "float32 (for the default) or float64; *Gram s* and *eigensolve s* are the float32 floor's "
          "two parts. *scipy svdvals*: float64 singular values of every slice, the solver "
          "WeightWatcher uses on CPU, timed once.", ""]
    L += ["## `precision=\"auto\"`: first solve predicted", "",
          "| model | randomize | ours s | ours prev s | ours f64 s | floor f32 s | ours / ours f64 | "
          "prev / ours f64 | ours / floor f32 | prev / floor f32 | unpredicted / ours f64 | "
          "unpredicted / floor f32 | predicted f64 | solved twice |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| `{r['model']}` | {'on' if r['randomize'] else 'off'} | {_f(r['ours_s'])} "
                 f"| {_f(r['ours_prev_s'])} | {_f(r['ours_f64_s'])} | {_f(r['floor_s'])} "
                 f"| **{_f(r['over_f64'])}** | {_f(r['prev_over_f64'])} | **{_f(r['over_floor'])}** "
                 f"| {_f(r['prev_over_floor'])} | {_f(r['unpredicted_over_f64'])} "
                 f"| {_f(r['unpredicted_over_floor'])} | {r['predicted_f64']} of {r['layers']} "
                 f"| {r['solved_twice']} |")
    L += ["", "*ours prev*: `analyze(m, previous=r)` with `r` an earlier result (what a training "
          "callback has). *unpredicted*: `auto` without the prediction (`--unpredicted`: every "
          "layer solved in float32 first, rejected ones solved again). *predicted f64*, "
          "*solved twice*: layers of one default analysis solved in "
          "float64 directly, and solved in float32, rejected and solved again in float64.", ""]
    L += ["Individual runs (s):", ""]
    for r in rows:
        L.append(f"* `{r['model']}` randomize={'on' if r['randomize'] else 'off'}: ours "
                 + ", ".join(f"{x:.2f}" for x in r["runs_ours"]) + "; ours prev "
                 + ", ".join(f"{x:.2f}" for x in r["runs_ours_prev"]) + "; ours f64 "
                 + ", ".join(f"{x:.2f}" for x in r["runs_ours_f64"]) + "; floor f32 "
                 + ", ".join(f"{x:.2f}" for x in r["runs_floor"]) + "; floor f64 "
                 + ", ".join(f"{x:.2f}" for x in r["runs_floor_f64"])
                 + ("; WW " + ", ".join(f"{x:.2f}" for x in r["runs_ww"]) if r["runs_ww"] else ""))
    if prec:
        L += ["", "## Default (auto) and plain float32 against float64", "",
              "| model | precision | layers fitted | f64 (predicted, solved twice) | "
              "max \\|Δalpha\\| | worst layer | "
              "max rel. Δxmin | max rel. Δ(log_norm, log_spectral_norm, stable_rank, alpha_hill) | "
              "fit failed on one side only | matrix_rank differs |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for name, per in prec.items():
            for p_name, p in per.items():
                L.append(f"| `{name}` | {p_name} | {p['layers']} | {p['resolved_f64']} "
                         f"({p['predicted_f64']}, {p['solved_twice']}) | "
                         f"{p['max_dalpha']:.1e} | `{p['worst_layer']}` | {p['max_rel_dxmin']:.1e} | "
                         f"{p['max_rel_dother']:.1e} | {p['one_side_failed']} | {p['rank_differs']} |")
    L.append("")
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
