#!/usr/bin/env python
"""How far float32 rounding moves the power-law fit's KS distances, and which layers it matters for.

For every layer of the pretrained models that are installed (MiniLM-L6, EfficientNet-Lite0,
CREPE full and tiny, the MNIST digit CNN) and of a synthetic set (trained-like LLM layers,
Student-t and Gaussian matrices up to 4096²), the layer is solved in float32 and in float64 as
``ww_core.analyze`` solves it, both spectra are fitted, and per *resolved* ``xmin`` candidate
(at least ``10·ν``, see ``ww_core.precision``) the KS distance and alpha are compared:

* ``max_dD``: the largest KS-distance shift of any resolved candidate;
* ``near_dD``: the largest shift among candidates within ``--near`` (0.01) of the best KS
  distance, the only ones that could win the scan in float64 (``KS_SLACK`` must cover two of them);
* for layers the float32 check rejects as a KS near-tie: the KS gap to the nearest resolved
  candidate whose alpha differs by more than ``ALPHA_TOL`` (the tie that forces float64);
* for layers it accepts: whether a slack scaled by each candidate's first-order error bound
  (``SCALED·(α−1)·ν/xmin``, winner's and rival's) would have rejected them;
* the cheap fact the float64 prediction uses (stable-rank share against a random matrix's), to
  see whether it separates the near-tie layers from the others.

::

    python benchmarks/ks_shift.py                     # ~5 min on 2 cores
    python benchmarks/ks_shift.py --quick --out /tmp/ks.json    # small synthetic set only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

#: The alternative slack measured: this fraction of the candidates' first-order error bounds
#: ``(alpha - 1)·ν/xmin`` (winner's plus rival's), where larger than ``KS_SLACK``.
SCALED = 0.5
PRETRAINED = ["minilm-l6", "efficientnet-lite0", "crepe-full", "crepe-tiny", "digit-cnn"]


def synthetic(quick: bool) -> Dict[str, Any]:
    import torch
    from llm_scale import trained_like
    shapes = [(512, 256), (256, 256)] if quick else [
        (2816, 1024), (1024, 2816), (1024, 1024), (1024, 1024), (2048, 2048), (5632, 2048)]
    sd = {f"trained_like.{i}.weight": trained_like(r, c, i) for i, (r, c) in enumerate(shapes)}
    g = torch.Generator().manual_seed(1)
    student = torch.distributions.StudentT(3.0)
    torch.manual_seed(1)
    for n in ((256,) if quick else (1024, 4096)):
        sd[f"student_t.{n}.weight"] = student.sample((n, n)) / math.sqrt(n)
    for n in ((256,) if quick else (384, 1024, 2048)):
        sd[f"gaussian.{n}.weight"] = torch.randn(n, n, generator=g) * 0.02
    return sd


def models(quick: bool) -> Iterator[Tuple[str, Any]]:
    if not quick:
        import ww_agreement
        for name in PRETRAINED:
            try:
                yield name, ww_agreement.MODELS[name]()[0]
            except Exception as exc:           # (its weights package is not installed)
                print(f"[ks_shift] {name} left out: {exc}", file=sys.stderr)
    yield "synthetic", synthetic(quick)


def layer_row(lm: Any, near: float) -> Dict[str, Any]:
    from ww_core import precision as P
    from ww_core.layer_analysis import layer_spectrum
    from ww_core.powerlaw import fit_powerlaw
    from ww_core.spectrum import eigenvalues

    batch = lm.load()
    ev = {p: layer_spectrum(eigenvalues(batch, p), lm)
          for p in ("float32", "float64")}
    f32, f64 = fit_powerlaw(ev["float32"]), fit_powerlaw(ev["float64"])
    row: Dict[str, Any] = dict(layer=lm.name, N=lm.N, M=lm.M, fitted=bool(f32.ok and f64.ok))
    row["check"] = P.float32_disagreement(ev["float32"], f32, lm.N, lm.M, rank_tol=1e-6,
                                          rank_collapse_share=0.1) or ""
    row["share_vs_random"] = P.stable_rank_share(batch) / P.mp_stable_rank_share(lm.N, lm.M)
    if not row["fitted"] or f32.small_n:
        return row
    nu = P.resolution(ev["float32"][-1], lm.N, lm.M)
    k = min(f32.candidate_D.size, f64.candidate_D.size)      # aligned from the top of the spectrum
    D, D64 = f32.candidate_D[-k:], f64.candidate_D[-k:]
    a, x = f32.candidate_alpha[-k:], f32.candidate_x[-k:]
    resolved = (x >= 10.0 * nu) & np.isfinite(a) & np.isfinite(f64.candidate_alpha[-k:])
    if not resolved.any():
        return row
    shift = np.abs(D - D64)
    close = resolved & (D <= D.min() + near)
    row.update(max_dD=float(shift[resolved].max()), alpha32=f32.alpha, alpha64=f64.alpha,
               near_dD=float(shift[close].max()) if close.any() else None)   # (best unresolved)
    rivals = resolved & (np.abs(a - f32.alpha) > P.ALPHA_TOL)
    if row["check"].startswith("KS near-tie") and rivals.any():
        row["tie_gap"] = float((D[rivals] - D.min()).min())
    if not row["check"]:    # would a slack of SCALED x each side's first-order bound reject it?
        bound = np.where(np.isfinite(a) & (a > 1.0), (a - 1.0) * nu / x, np.inf)
        w = int(np.argmin(D))
        row["scaled_slack_rejects"] = bool(np.any(
            rivals & (D - D[w] <= np.maximum(P.KS_SLACK, SCALED * (bound + bound[w])))))
    return row


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    from ww_core import precision as P
    measured = [r for r in rows if "max_dD" in r]
    ties = [r for r in rows if r["check"].startswith("KS near-tie")]
    passed = [r for r in rows if not r["check"]]
    wrong = [r["layer"] for r in measured if not r["check"]
             and abs(r["alpha32"] - r["alpha64"]) > P.ALPHA_TOL]
    # the stable-rank share's best single threshold for telling near-tie layers from passed ones
    best: Tuple[int, int, Any] = (0, 0, None)
    for t in sorted({r["share_vs_random"] for r in ties + passed}):
        caught = sum(r["share_vs_random"] <= t for r in ties)
        false = sum(r["share_vs_random"] <= t for r in passed)
        if caught - false > best[0] - best[1]:
            best = (caught, false, t)
    return dict(layers=len(rows), measured=len(measured),
                max_dD=max((r["max_dD"] for r in measured), default=math.nan),
                near_dD=max((r["near_dD"] for r in measured if r["near_dD"] is not None),
                            default=math.nan),
                ks_slack=P.KS_SLACK, near_tie_layers=len(ties), passed_layers=len(passed),
                tie_gaps=sorted(r["tie_gap"] for r in ties if "tie_gap" in r),
                accepted_but_off=wrong,
                scaled_slack_would_reject=sum(bool(r.get("scaled_slack_rejects")) for r in rows),
                share_threshold=dict(caught=best[0], of=len(ties), false_alarms=best[1],
                                     threshold=best[2]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small synthetic set only")
    ap.add_argument("--near", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ks_shift.json")
    args = ap.parse_args()

    import torch

    from ww_core.sources import find_layers
    per_set: Dict[str, List[Dict[str, Any]]] = {}
    for name, source in models(args.quick):
        per_set[name] = [layer_row(lm, args.near) for lm in find_layers(source) if lm.M >= 8]
        s = summarise(per_set[name])
        print(f"{name}: {s['layers']} layers, max shift {s['max_dD']:.2g}, near the best "
              f"{s['near_dD']:.2g}, {s['near_tie_layers']} KS near-ties", flush=True)
    everything = [r for rows in per_set.values() for r in rows]
    report = dict(
        when=_dt.datetime.now().isoformat(timespec="seconds"),
        machine=dict(cpu=platform.processor() or platform.machine(), python=platform.python_version(),
                     torch=torch.__version__, numpy=np.__version__),
        near=args.near, summary=summarise(everything),
        pretrained=summarise([r for k, rows in per_set.items() if k != "synthetic" for r in rows]),
        per_set={k: summarise(v) for k, v in per_set.items()}, layers=per_set)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    main()
