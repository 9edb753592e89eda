"""How long the Keras callback makes training wait, per backend (torch, JAX, TensorFlow).

A 5-epoch fit of a 4 x Dense(256) MLP (32 steps per epoch, CPU) with an analysis every epoch
(asynchronous, the default; the local record as the tracker). Reported per backend: the time
training waited inside the callback's hooks in each epoch (the weight copy, and the recording
of the finished background analysis: history files and trackers), its median and maximum, the
one-off set-up at ``on_train_begin`` (engine warm-up) and the skipped analyses.

``--baseline`` turns off :func:`ww_callbacks.keras_utils.prepare_fit` (no warm-up, no thread
limit): the behaviour before it existed.

Usage (one interpreter per backend: Keras picks its backend at import)::

    python benchmarks/keras_backends.py --envs torch=.venv/bin/python \\
        jax=.tox/keras-jax/bin/python tensorflow=.tox/keras-tf/bin/python [--repeats 3]
    python benchmarks/keras_backends.py --backend jax [--baseline]     # one run, JSON out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(backend: str, baseline: bool, epochs: int) -> Dict[str, Any]:
    """One fit in this process (``KERAS_BACKEND`` must not have been imported yet)."""
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="keras-home-"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, REPO)
    import numpy as np

    t0 = time.perf_counter()
    import keras

    import_s = time.perf_counter() - t0
    import ww_callbacks.keras_utils as ku
    from ww_callbacks.keras import WeightWatcherCallback

    if baseline:
        ku.prepare_fit = lambda *a, **k: (lambda: None)

    waits: Dict[int, float] = {}
    setup: List[float] = []

    class Timed(WeightWatcherCallback):
        def _timed(self, hook: str, *args: Any) -> None:
            t = time.perf_counter()
            getattr(super(), hook)(*args)
            dt = time.perf_counter() - t
            if hook == "on_train_begin":
                setup.append(dt)
            elif hook != "on_train_end":
                waits[self.epoch] = waits.get(self.epoch, 0.0) + dt

        def on_train_begin(self, logs=None):
            self._timed("on_train_begin", logs)

        def on_epoch_begin(self, epoch, logs=None):
            self._timed("on_epoch_begin", epoch, logs)

        def on_train_batch_end(self, batch, logs=None):
            self._timed("on_train_batch_end", batch, logs)

        def on_epoch_end(self, epoch, logs=None):
            self._timed("on_epoch_end", epoch, logs)

        def on_train_end(self, logs=None):
            self._timed("on_train_end", logs)

    rng = np.random.default_rng(0)
    n, d, c = 2048, 64, 10
    x = rng.standard_normal((n, d)).astype("float32")
    y = rng.integers(0, c, n)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((d,))]
                             + [keras.layers.Dense(256, activation="relu", name=f"d{i}") for i in range(4)]
                             + [keras.layers.Dense(c, name="head")])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    cb = Timed(start_fraction=0.0, every_n_epochs=1, trackers=["local"], log_fn=lambda line: None,
               output_dir=tempfile.mkdtemp(prefix="ww-bench-"))
    t0 = time.perf_counter()
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0, callbacks=[cb])
    fit_s = time.perf_counter() - t0
    per_epoch = [round(waits.get(e, 0.0), 4) for e in range(epochs)]
    return {"backend": backend, "baseline": baseline, "import_s": round(import_s, 2),
            "setup_s": round(sum(setup), 3), "hook_s_per_epoch": per_epoch,
            "median_hook_s": round(statistics.median(per_epoch), 4), "max_hook_s": max(per_epoch),
            "skipped": cb.controller.skipped_analyses, "analyses": cb.controller.num_analyses,
            "fit_s": round(fit_s, 2)}


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), Python "
            f"{platform.python_version()}, load average {load:.1f} at the start")


def drive(envs: List[str], repeats: int, epochs: int) -> None:
    print(f"machine: {machine()}\n")
    print("| backend | mode | median hook s/epoch | max hook s/epoch | set-up s | skipped | fit s |")
    print("|---|---|---|---|---|---|---|")
    for spec in envs:
        backend, python = spec.split("=", 1)
        for baseline in (True, False):
            runs = []
            for _ in range(repeats):
                cmd = [python, os.path.abspath(__file__), "--backend", backend, "--epochs", str(epochs)]
                out = subprocess.run(cmd + (["--baseline"] if baseline else []), capture_output=True,
                                     text=True, cwd=REPO)
                if out.returncode:
                    print(f"| {backend} | failed: {out.stderr.strip().splitlines()[-1:]} |")
                    break
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            if not runs:
                continue
            med = statistics.median(r["median_hook_s"] for r in runs)
            mx = max(r["max_hook_s"] for r in runs)
            setup = statistics.median(r["setup_s"] for r in runs)
            skipped = "/".join(str(r["skipped"]) for r in runs)
            fit = statistics.median(r["fit_s"] for r in runs)
            mode = "before (no prepare_fit)" if baseline else "now"
            print(f"| {backend} | {mode} | {med:.3f} | {mx:.3f} | {setup:.2f} | {skipped} | {fit:.2f} |",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", help="run one fit on this backend and print JSON")
    p.add_argument("--baseline", action="store_true", help="without prepare_fit")
    p.add_argument("--envs", nargs="*", default=[], help="backend=python pairs to compare")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args()
    if args.backend:
        print(json.dumps(run_one(args.backend, args.baseline, args.epochs)))
    else:
        drive(args.envs or [f"{os.environ.get('KERAS_BACKEND', 'torch')}={sys.executable}"],
              args.repeats, args.epochs)


if __name__ == "__main__":
    main()
