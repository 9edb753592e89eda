"""``ww-analyze``'s model-level modes: ``--json`` (save the analysis), ``--compare-to`` (gate a
candidate against a baseline, exit 3 on a regression) and several PATHs (rank models).

Example:
    Shell commands::

        ww-analyze model.safetensors --json baseline.json
        ww-analyze retrained/ --compare-to baseline.json --fail-on default --format markdown
        ww-analyze run1/ run2/ run3/ --rank-by log_alpha_norm --format json
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional, TextIO

from .analyze import analysis_layers
from .compare import compare
from .compare_policy import RegressionPolicy
from .errors import SourceError
from .ranking import RANK_METRICS, rank_models
from .result import AnalysisResult
from .result_io import is_result_file, load_result
from .result_json import result_to_dict

__all__ = ["EXIT_REGRESSION", "add_arguments", "check_mode", "run"]

#: The exit code of ``--compare-to`` when the candidate regressed (and only then).
EXIT_REGRESSION = 3
_PROG = "ww-analyze"
_FORMATS = ("table", "markdown", "json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of these modes to ``ww-analyze``'s parser."""
    p.add_argument("--json", metavar="FILE",
                   help="write the analysis (one PATH: every column, options, engine version, "
                        "model identity; reload with ww_core.load_result), the comparison "
                        "(--compare-to) or the ranking (several PATHs) to FILE as JSON")
    p.add_argument("--compare-to", metavar="BASELINE",
                   help="compare PATH (the candidate) with BASELINE (a model path, a cached Hugging "
                        "Face id, or an analysis saved with --json) layer by layer, worst first; "
                        "exit 3 when the candidate regresses (see --fail-on). Not --base-model, "
                        "which analyses the weight deltas W - W0")
    p.add_argument("--fail-on", metavar="SPEC",
                   help="what is a regression for --compare-to, comma-separated: default (a newly "
                        "raised serious flag, |dalpha| > 1, or a spectrum change > 0.25: see "
                        "docs/model-gating.md), flags, a flag name (rank-collapse, "
                        "non-finite, correlation-trap, fit-failed, under-trained, over-trained), "
                        "alpha=X, spectrum=X, change=X, removed, added, none")
    p.add_argument("--format", choices=_FORMATS, default="table",
                   help="output: an aligned table (default), Markdown (e.g. for "
                        "$GITHUB_STEP_SUMMARY; with --compare-to or several PATHs) or JSON")
    p.add_argument("--top", type=int, metavar="N", default=20,
                   help="with --compare-to: show every regression and at most N rows in all "
                        "(table and Markdown; default 20, 0 = every layer)")
    p.add_argument("--rank-by", choices=RANK_METRICS, default="alpha_weighted",
                   help="with several PATHs: the metric that ranks the models (lower is better; "
                        "default alpha_weighted)")


def check_mode(args: argparse.Namespace) -> Optional[str]:
    """A one-line usage error for an option that does not fit the mode, else ``None``."""
    several, gate = len(args.path) > 1, bool(args.compare_to)
    if gate and several:
        return "--compare-to takes one candidate PATH (several PATHs rank models instead)"
    if (gate or several) and (args.csv or args.plots):
        return "--csv and --plots apply to the analysis of one PATH, not to --compare-to or a ranking"
    if args.fail_on is not None and not gate:
        return "--fail-on applies only with --compare-to"
    if args.format == "markdown" and not (gate or several):
        return "--format markdown applies with --compare-to or several PATHs"
    if args.top < 0:
        return "--top must be >= 0"
    if args.fail_on is not None:
        try:
            RegressionPolicy.parse(args.fail_on)
        except ValueError as exc:
            return str(exc)
    if args.base_model and args.compare_to:
        return ("--base-model (analyse W - W0) and --compare-to (compare two models) do not go "
                "together")
    return None


def is_saved_analysis(path: str) -> bool:
    """True when ``path`` is an analysis saved with ``--json``."""
    return path.lower().endswith(".json") or is_result_file(path)


def load_saved(path: str, options: Dict[str, Any], args: argparse.Namespace) -> AnalysisResult:
    """Load a saved analysis to print it; analysis options cannot apply to it.

    Raises:
        ValueError: analysis options were given (one line).
    """
    if options:
        raise ValueError(f"{path} is a saved analysis: options that change the analysis "
                         f"({', '.join(sorted(options))}) cannot apply to it")
    return load_result(path)


def _record_model(result: AnalysisResult, path: str, label: str) -> None:
    result.meta["source"] = label
    if not is_saved_analysis(path) and "model_layers" not in result.meta:
        opts = result.options
        layers = analysis_layers(path, opts.get("conv2d_norm", True), opts.get("split_qkv", True),
                                 opts.get("peft", False), None, opts.get("trainable"))
        result.meta["model_layers"] = [[lm.name, lm.type, int(lm.N), int(lm.M), int(lm.rf)]
                                       for lm in layers]


def save_analysis(result: AnalysisResult, path: str, label: str, out: str) -> None:
    """Record the model's identity and write ``result`` to ``out`` (``--json``).

    Raises:
        OSError: ``out`` cannot be written.
    """
    _record_model(result, path, label)
    result.save(out)


def result_json_text(result: AnalysisResult, label: str) -> str:
    """The saved-analysis document of ``result`` as text (``--format json``)."""
    result.meta.setdefault("source", label)
    return json.dumps(result_to_dict(result), indent=1, allow_nan=False)


def _write(text: str, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")


def _error(message: Any, stderr: TextIO) -> int:
    stderr.write(f"{_PROG}: error: {' '.join(str(message).split())}\n")
    return 1


def run(args: argparse.Namespace, paths: List[str], options: Dict[str, Any], progress: bool,
        stdout: TextIO, stderr: TextIO) -> int:
    """Run ``--compare-to`` (one PATH) or the ranking (several PATHs); returns the exit code."""
    try:
        if args.compare_to:
            return _gate(args, paths[0], options, progress, stdout, stderr)
        return _rank(args, paths, options, progress, stdout, stderr)
    except (FileNotFoundError, SourceError, ValueError, ImportError, OSError, RuntimeError) as exc:
        return _error(exc, stderr)
    except KeyboardInterrupt:
        stderr.write(f"{_PROG}: interrupted\n")
        return 130


def _gate(args: argparse.Namespace, candidate: str, options: Dict[str, Any], progress: bool,
          stdout: TextIO, stderr: TextIO) -> int:
    policy = RegressionPolicy.parse(args.fail_on) if args.fail_on else RegressionPolicy()
    cmp = compare(args.compare_to, candidate, policy=policy, labels=(args.compare_to, args.path[0]),
                  progress=progress, **options)
    if not cmp.candidate.layers:
        stderr.write(f"{_PROG}: error: no analysable layer in {args.path[0]}\n")
        return 2
    top = args.top or None
    if args.format == "json":
        stdout.write(cmp.to_json() + "\n")
    elif args.format == "markdown":
        stdout.write(cmp.to_markdown(top=top) + "\n")
    else:
        stdout.write(cmp.to_text(top=top) + "\n")
    if args.json:
        try:
            _write(cmp.to_json(), args.json)
        except OSError as exc:
            return _error(f"cannot write {args.json}: {exc}", stderr)
    stdout.flush()
    return EXIT_REGRESSION if cmp.regressed() else 0


def _rank(args: argparse.Namespace, paths: List[str], options: Dict[str, Any], progress: bool,
          stdout: TextIO, stderr: TextIO) -> int:
    ranking = rank_models(paths, by=args.rank_by, labels=list(args.path), progress=progress,
                          **options)
    empty = [row["model"] for row in ranking.rows if row["num_layers"] == 0]
    if empty:
        stderr.write(f"{_PROG}: error: no analysable layer in {', '.join(empty)}\n")
        return 2
    doc = json.dumps(ranking.to_dict(), indent=1, allow_nan=False)
    if args.format == "json":
        stdout.write(doc + "\n")
    else:
        stdout.write(ranking.to_text(markdown=args.format == "markdown") + "\n")
    if args.json:
        try:
            _write(doc, args.json)
        except OSError as exc:
            return _error(f"cannot write {args.json}: {exc}", stderr)
    stdout.flush()
    return 0
