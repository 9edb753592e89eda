"""``ww-analyze``: spectral analysis of a saved model from the command line.

Example:
    Shell commands::

        ww-analyze model.safetensors
        ww-analyze checkpoint_dir/ --layers 'attention' --types dense --csv layers.csv --plots plots/
        ww-analyze lora_adapter_dir/ --peft          # each LoRA update B·A (WeightWatcher's peft=True)
        ww-analyze finetuned/ --base-model sentence-transformers/all-MiniLM-L6-v2   # W − W₀
        python -m ww_core.cli model.pt --randomize --seed 0
        ww-analyze model.safetensors --json baseline.json           # save the analysis
        ww-analyze retrained/ --compare-to baseline.json --format markdown   # exit 3: regression
        ww-analyze ckpt-100/ ckpt-200/ ckpt-300/                    # rank several models

        torchrun --nproc-per-node 4 -m ww_core.cli checkpoint_dir/ --csv layers.csv

Under ``torchrun`` (``WORLD_SIZE`` > 1) the layers are sharded across the processes (gloo) with
:func:`ww_core.distributed.analyze_distributed`; only rank 0 prints and writes files.

Prints one row per analysed layer (an aligned table) and the summary; with ``--compare-to``
the differences from a baseline, worst first (:mod:`ww_core.cli_modes`); with several PATHs one
row per model and a ranking. Exit codes: 0 success, 1 error (missing file, unknown or corrupt
format, missing optional dependency), 2 bad arguments or no analysable layer in the file, 3 the
candidate regressed against the ``--compare-to`` baseline (and only that).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import io
import math
import os
import sys
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, TextIO

from . import cli_modes
from .analyze import analyze
from .model_source import resolve_path
from .selection import LAYER_TYPES, check_layer_patterns

PROG = "ww-analyze"

#: Columns of the printed table (the CSV has all of ``ww_core.result.COLUMNS``).
TABLE_COLUMNS = ("name", "type", "N", "M", "alpha", "alpha_hill", "D", "xmin", "num_pl_spikes",
                 "log_norm", "stable_rank", "warning", "flags")

_FLOAT_FORMATS = {"alpha": ".3f", "alpha_hill": ".3f", "D": ".4f", "xmin": ".4g",
                  "log_norm": ".3f", "stable_rank": ".2f"}
_TEXT_COLUMNS = {"name", "type", "warning", "flags"}
EXIT_OK, EXIT_ERROR, EXIT_NO_LAYERS = 0, 1, 2
EXIT_REGRESSION = cli_modes.EXIT_REGRESSION


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``ww-analyze: error: ...``), no usage dump."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(EXIT_NO_LAYERS, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Per-layer spectral (heavy-tailed self-regularisation) analysis of a saved "
                    "model: eigenvalues of each weight matrix, power-law alpha, norms and flags.",
        epilog="alpha: about 2-6 is the well-trained range (~2 vision, 3-4 NLP); > 6 suggests an "
               "under-trained layer, < 2 an over-fit layer or a correlation trap.",
    )
    p.add_argument("path", metavar="PATH", nargs="+",
                   help="a .safetensors / .pt / .pth / .bin file, a folder of shards, a Hugging "
                        "Face model id in the local cache (never downloaded), or an analysis saved "
                        "with --json; several PATHs: one row per model and a ranking")
    p.add_argument("--layers", metavar="REGEX", action="append",
                   help="analyse only layers whose name matches REGEX (re.search); repeatable")
    p.add_argument("--types", metavar="TYPE", nargs="+",
                   help=f"analyse only these layer types: {', '.join(LAYER_TYPES)} "
                        "(space- or comma-separated)")
    p.add_argument("--csv", metavar="FILE", help="also write every column to FILE as CSV")
    p.add_argument("--plots", metavar="DIR",
                   help="write alpha_by_layer.png and one ESD plot per layer to DIR "
                        "(needs matplotlib)")
    p.add_argument("--randomize", action="store_true",
                   help="compare with the ESD of the randomised weights (rand_distance, "
                        "correlation traps); one extra eigen-decomposition per layer")
    p.add_argument("--seed", type=int, metavar="N", help="seed for --randomize")
    p.add_argument("--fix-fingers", action="store_true",
                   help="refit with a few separated top eigenvalues clipped (WeightWatcher's "
                        "fix_fingers='clip_xmax')")
    p.add_argument("--peft", nargs="?", const=True, default=False, choices=("with_base", "peft_only"),
                   metavar="MODE",
                   help="analyse LoRA adapters as WeightWatcher 0.7.7: each update B·A "
                        "(lora_BA); 'with_base': every layer plus W + B·A; 'peft_only': the same "
                        "as no MODE (put PATH before a bare --peft)")
    p.add_argument("--base-model", metavar="PATH_OR_ID",
                   help="analyse W − W0 per layer against this base model (a path or a cached "
                        "Hugging Face model id)")
    p.add_argument("--min-evals", type=int, metavar="N",
                   help="skip layers with fewer eigenvalues (default 8)")
    p.add_argument("--max-evals", type=int, metavar="N",
                   help="skip layers with more eigenvalues (default 15000)")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="show a progress bar on stderr (default: when stderr is a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false",
                          help="never show a progress bar")
    cli_modes.add_arguments(p)
    return p


def _parse_types(values: Optional[List[str]], parser: argparse.ArgumentParser) -> Optional[List[str]]:
    if not values:
        return None
    types: List[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip().lower()
            if not item:
                continue
            if item not in LAYER_TYPES:
                parser.error(f"unknown layer type {item!r}; choose from {', '.join(LAYER_TYPES)}")
            types.append(item)
    if not types:
        parser.error("--types names no layer type; choose from " + ", ".join(LAYER_TYPES))
    return types


def _fmt(column: str, value: Any) -> str:
    if column in _TEXT_COLUMNS:
        if column == "flags" and not isinstance(value, str):
            value = ",".join(value)
        return str(value) if value else "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return format(value, _FLOAT_FORMATS.get(column, ".4g"))
    return str(value)


def format_table(result, columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The layers of ``result`` as an aligned text table (text left-, numbers right-aligned)."""
    rows = [[_fmt(c, getattr(layer, c)) for c in columns] for layer in result.layers]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        parts = [cell.ljust(w) if col in _TEXT_COLUMNS else cell.rjust(w)
                 for cell, w, col in zip(cells, widths, columns)]
        return "  ".join(parts).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def _reason_counts(skipped) -> List[str]:
    counts = Counter(s.reason for s in skipped)
    return [f"{n} x {reason}" if n > 1 else reason for reason, n in counts.most_common()]


def format_summary(result) -> str:
    s = result.summary()
    lines = [
        f"summary: {s['num_layers']} layers analysed, {s['num_failed']} failed fits, "
        f"{s['num_flagged']} flagged, {len(result.skipped)} skipped",
        "  mean over successful fits: " + "  ".join(
            f"{k}={s[k]:.4g}" for k in ("alpha", "alpha_weighted", "log_alpha_norm", "log_norm",
                                        "log_spectral_norm", "stable_rank") if k in s),
    ]
    flag_counts = Counter(f for layer in result.layers for f in layer.flags)
    if flag_counts:
        lines.append("  flags: " + ", ".join(f"{f} ({n})" for f, n in flag_counts.most_common()))
    if 0 < len(result.skipped) <= 5:
        lines.append("  skipped: " + "; ".join(f"{s.name}: {s.reason}" for s in result.skipped))
    elif result.skipped:
        lines.append("  skipped: " + "; ".join(_reason_counts(result.skipped)))
    return "\n".join(lines)


def write_csv(result, path: str) -> None:
    """Write every column of :data:`ww_core.result.COLUMNS` (one row per layer) to ``path``."""
    from ww_core.result import COLUMNS

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        for record in result.to_records():
            writer.writerow(record)


def _no_layers_message(path: str, result) -> str:
    if not result.skipped:
        return (f"{PROG}: error: no analysable layer in {path}: no weight matrix (2-D or larger "
                f"tensor) matched the selection\n")
    lines = [f"{PROG}: error: no analysable layer in {path}: all {len(result.skipped)} "
             f"candidate layers were skipped:"]
    for s in result.skipped[:20]:
        lines.append(f"  {s.name} ({s.type}, N={s.N}, M={s.M}): {s.reason}")
    if len(result.skipped) > 20:
        lines.append(f"  ... and {len(result.skipped) - 20} more: "
                     + "; ".join(_reason_counts(result.skipped[20:])))
    return "\n".join(lines) + "\n"


def _error(message: Any, stderr: TextIO) -> int:
    text = " ".join(str(message).split())  # one line, whatever the exception text looks like
    stderr.write(f"{PROG}: error: {text}\n")
    return EXIT_ERROR


def _world() -> tuple:
    """``(rank, world_size)`` from torchrun's environment variables (``(0, 1)`` otherwise)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _analyze_torchrun(path: str, **kwargs: Any):
    """Initialise gloo from torchrun's environment, analyse sharded, tear the group down."""
    import torch.distributed as dist

    from ww_core.distributed import analyze_distributed

    owned = not dist.is_initialized()
    if owned:
        try:
            dist.init_process_group("gloo")
        except (RuntimeError, ValueError) as exc:
            raise OSError(f"cannot initialise torch.distributed (gloo): {exc}") from None
    try:
        return analyze_distributed(path, **kwargs)
    finally:
        if owned:
            dist.destroy_process_group()


def _analysis_options(args: argparse.Namespace, parser: argparse.ArgumentParser,
                      stderr: TextIO) -> Any:
    """The :func:`ww_core.analyze` keywords the options ask for, or an exit code (an int)."""
    try:
        check_layer_patterns(args.layers, option="--layers")
    except ValueError as exc:
        return _error(exc, stderr) + 1
    try:
        types = _parse_types(args.types, parser)
    except SystemExit as exc:
        return int(exc.code or 0)
    for opt in ("min_evals", "max_evals"):
        value = getattr(args, opt)
        if value is not None and value < 1:
            stderr.write(f"{PROG}: error: --{opt.replace('_', '-')} must be >= 1\n")
            return EXIT_NO_LAYERS
    defaults = inspect.signature(analyze).parameters
    lo = args.min_evals if args.min_evals is not None else defaults["min_evals"].default
    hi = args.max_evals if args.max_evals is not None else defaults["max_evals"].default
    if hi < lo:
        stderr.write(f"{PROG}: error: max_evals ({hi}) must be >= min_evals ({lo})\n")
        return EXIT_NO_LAYERS
    kwargs: Dict[str, Any] = {}
    if args.layers:
        kwargs["layers"] = args.layers[0] if len(args.layers) == 1 else list(args.layers)
    if types:
        kwargs["layer_types"] = types
    for opt in ("min_evals", "max_evals", "seed"):
        if getattr(args, opt) is not None:
            kwargs[opt] = getattr(args, opt)
    if args.fix_fingers:
        kwargs["fix_fingers"] = "clip_xmax"
    if args.randomize:
        kwargs["randomize"] = True
    if args.plots:
        kwargs["keep_evals"] = True
    if args.peft:
        kwargs["peft"] = args.peft
    return kwargs


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``ww-analyze`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: return the code instead of exiting
        return int(exc.code or 0)
    stdout, stderr = sys.stdout, sys.stderr
    rank, world = _world()
    if rank != 0:                      # under torchrun only rank 0 prints and writes files
        stdout, stderr = io.StringIO(), io.StringIO()

    kwargs = _analysis_options(args, parser, stderr)
    if isinstance(kwargs, int):
        return kwargs
    mode_error = cli_modes.check_mode(args)
    if mode_error:
        stderr.write(f"{PROG}: error: {mode_error}\n")
        return EXIT_NO_LAYERS
    try:
        paths = [resolve_path(p) for p in args.path]
        base_model = resolve_path(args.base_model) if args.base_model else None
    except FileNotFoundError as exc:
        return _error(exc, stderr)
    if base_model:
        kwargs["base_model"] = base_model
    progress = args.progress if args.progress is not None else stderr.isatty()
    if args.compare_to or len(paths) > 1:
        return cli_modes.run(args, paths, kwargs, progress, stdout, stderr)
    path = paths[0]

    plots = None
    if args.plots:
        try:
            from ww_core import plots
            plots.require_matplotlib()
        except ImportError as exc:
            return _error(exc, stderr)

    try:
        import ww_core
        from ww_core.errors import SourceError
    except ImportError as exc:  # pragma: no cover - broken install
        return _error(exc, stderr)

    try:
        if cli_modes.is_saved_analysis(path):
            result = cli_modes.load_saved(path, kwargs, args)
        elif world > 1:
            result = _analyze_torchrun(path, progress=progress, **kwargs)
        else:
            result = ww_core.analyze(path, progress=progress, **kwargs)
    except FileNotFoundError as exc:
        return _error(exc, stderr)
    except (SourceError, ValueError, ImportError, OSError, RuntimeError) as exc:
        return _error(exc, stderr)
    except KeyboardInterrupt:
        stderr.write(f"{PROG}: interrupted\n")
        return 130

    if len(result.layers) == 0:
        stderr.write(_no_layers_message(args.path[0], result))
        return EXIT_NO_LAYERS

    if args.format == "json":
        stdout.write(cli_modes.result_json_text(result, args.path[0]) + "\n")
    else:
        stdout.write(format_table(result) + "\n\n" + format_summary(result) + "\n")
    if rank != 0:
        return EXIT_OK

    if args.json:
        try:
            cli_modes.save_analysis(result, path, args.path[0], args.json)
        except OSError as exc:
            return _error(f"cannot write {args.json}: {exc}", stderr)
        if args.format != "json":
            stdout.write(f"wrote {args.json}\n")
    if args.csv:
        try:
            write_csv(result, args.csv)
        except OSError as exc:
            return _error(f"cannot write {args.csv}: {exc}", stderr)
        stdout.write(f"wrote {args.csv}\n")
    if plots is not None:
        try:
            written = plots.save_plots(result, args.plots)
        except (OSError, ValueError) as exc:     # ValueError: no layer has a spectrum to plot
            return _error(f"cannot write plots to {args.plots}: {exc}", stderr)
        stdout.write(f"wrote {len(written)} plots to {args.plots}\n")
    stdout.flush()
    return EXIT_OK


if __name__ == "__main__":  # python -m ww_core.cli
    sys.exit(main())
