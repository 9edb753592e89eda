#!/usr/bin/env python
"""Time ``ww_core.analyze`` of this checkout against an earlier revision, side by side.

The earlier revision's ``ww_core`` is extracted with ``git archive`` into a temporary folder.
Each round runs one subprocess per side (order alternating from round to round: ABBA...), which
imports that side's ``ww_core``, loads the models, analyses each once untimed, then times
``--runs`` analyses per precision and reports their median. The ratio *this / base* is taken per
round (the two sides ran seconds apart) and summarised as the median over rounds with a bootstrap
95 % interval. Nothing else should run on the machine.

::

    python benchmarks/engine_ab.py --base HEAD~1                       # MiniLM-L6, EfficientNet-Lite0
    python benchmarks/engine_ab.py --base HEAD~3 --models llm-like --rounds 4 --out ''
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

WORKER = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[2])
import ww_core, ww_agreement, speed
models, runs, precisions = sys.argv[3].split(","), int(sys.argv[4]), sys.argv[5].split(",")
out = {"engine": ww_core.__file__}
for name in models:
    m = speed.synthetic_set(name) if name in speed.SYNTHETIC else ww_agreement.MODELS[name]()[0]
    for p in precisions:
        ww_core.analyze(m, seed=0, precision=p)
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            ww_core.analyze(m, seed=0, precision=p)
            ts.append(time.perf_counter() - t0)
        out[f"{name}/{p}"] = statistics.median(ts)
print(json.dumps(out))
"""


def side(engine: Path, args: argparse.Namespace) -> Dict[str, Any]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", WORKER, str(engine), str(HERE), ",".join(args.models),
                           str(args.runs), ",".join(args.precisions)], capture_output=True,
                          text=True, env=env, cwd=str(engine))
    if proc.returncode:
        raise SystemExit(f"worker for {engine} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interval(ratios: List[float], seed: int = 0) -> List[float]:
    x = np.asarray(ratios)
    boots = np.median(np.random.default_rng(seed).choice(x, (10000, x.size)), axis=1)
    return [float(v) for v in np.quantile(boots, [0.025, 0.975])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare with (e.g. HEAD~1)")
    ap.add_argument("--models", nargs="*", default=["minilm-l6", "efficientnet-lite0"])
    ap.add_argument("--precisions", nargs="*", default=["auto", "float32"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5, help="timed analyses per side and round")
    ap.add_argument("--out", default=str(HERE / "results" / "engine_ab.json"), help="'' = none")
    args = ap.parse_args()

    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", base_rev, "ww_core"], cwd=REPO, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        engines = {"base": Path(tmp), "this": REPO}
        rounds: List[Dict[str, Dict[str, float]]] = []
        for r in range(args.rounds):
            order = ["base", "this"] if r % 2 == 0 else ["this", "base"]
            got = {name: side(engines[name], args) for name in order}
            rounds.append(got)
            print(f"[engine_ab] round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {got['this'][k] / got['base'][k]:.2f}" for k in got["this"] if "/" in k),
                flush=True)
    keys = [k for k in rounds[0]["this"] if "/" in k]
    summary = {}
    for k in keys:
        ratios = [rd["this"][k] / rd["base"][k] for rd in rounds]
        summary[k] = dict(base_s=statistics.median(rd["base"][k] for rd in rounds),
                          this_s=statistics.median(rd["this"][k] for rd in rounds),
                          ratio=statistics.median(ratios), ci95=interval(ratios), ratios=ratios)
    print(f"\nthis checkout against {base_rev}: median over {args.rounds} rounds of this / base "
          f"(each side the median of {args.runs} analyses), bootstrap 95 % interval")
    print("| model / precision | base s | this s | this / base | 95 % interval |")
    print("|---|---|---|---|---|")
    for k, v in summary.items():
        print(f"| {k} | {v['base_s']:.3f} | {v['this_s']:.3f} | {v['ratio']:.2f} | "
              f"[{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}] |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            when=_dt.datetime.now().isoformat(timespec="seconds"), base=base_rev,
            machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                         python=platform.python_version()),
            rounds=args.rounds, runs=args.runs, summary=summary, raw=rounds), indent=1))
        print(f"[engine_ab] wrote {args.out}")


if __name__ == "__main__":
    main()
