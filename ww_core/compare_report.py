"""Reports of a :class:`~ww_core.compare.Comparison`: aligned text, Markdown (CI job summaries)
and JSON (pipelines). Every report lists the layers worst first."""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Sequence

from .compare_policy import RegressionPolicy
from .result_json import plain

__all__ = ["comparison_to_dict", "to_json", "to_markdown", "to_text"]

_HEADER = ("layer", "status", "alpha", "Δalpha", "Δlog_norm", "Δstable_rank", "flags raised",
           "flags cleared", "regression")


def _num(x: float, fmt: str = "+.3f") -> str:
    return format(x, fmt) if math.isfinite(x) else ("nan" if math.isnan(x) else str(x))


def _side(result: Any) -> str:
    source = result.meta.get("source") or "?"
    version = result.meta.get("engine_version")
    return f"{source} (identity {result.identity[:12]}" + (f", ww_core {version})" if version else ")")


def _rows(cmp: Any, policy: RegressionPolicy, top: Optional[int]) -> List[List[str]]:
    regressions = {r.layer: r for r in cmp.regressions(policy)}
    rows = []
    for c in cmp.worst_first(policy):
        if top is not None and len(rows) >= top and c.name not in regressions:
            break
        if c.status == "compared":
            alpha = f"{_num(c.baseline.alpha, '.2f')} -> {_num(c.candidate.alpha, '.2f')}"
            cells = [alpha, _num(c.d_alpha), _num(c.d_log_norm), _num(c.d_stable_rank, '+.2f'),
                     ",".join(c.flags_raised) or "-", ",".join(c.flags_cleared) or "-"]
        else:
            status = f"{c.status} in {c.missing_in}" if c.missing_in else c.status
            cells = ["-", "-", "-", "-", "-", "-"]
            c = type(c)(**{**c.__dict__, "status": status})
        reg = regressions.get(c.name)
        rows.append([c.name, c.status] + cells + ["; ".join(reg.reasons) if reg else "-"])
    return rows


def _verdict(cmp: Any, policy: RegressionPolicy) -> str:
    n = len(cmp.regressions(policy))
    return (f"REGRESSION: {n} layer{'s' if n != 1 else ''} regressed" if n
            else "no regression")


def _counts(cmp: Any) -> str:
    s = cmp.summary()
    return (f"{s['compared']} layers compared, {s['newly_flagged']} newly flagged, "
            f"{s['cleared']} with flags cleared, {s['added']} added, {s['removed']} removed, "
            f"{s['not_analysed']} not analysed; largest |Δalpha| "
            f"{_num(s['max_abs_delta_alpha'], '.3f')}"
            + (f" ({s['max_delta_alpha_layer']})" if s["max_abs_delta_alpha"] > 0 else ""))


def to_text(cmp: Any, policy: Optional[RegressionPolicy] = None, top: Optional[int] = 20) -> str:
    """An aligned text table, worst first: every regression plus up to ``top`` rows in all
    (``None``: every layer), with the two sides, notes, counts and the verdict."""
    policy = policy or cmp.policy
    rows = _rows(cmp, policy, top)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(_HEADER)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [f"baseline:  {_side(cmp.baseline)}", f"candidate: {_side(cmp.candidate)}"]
    out += [f"note: {n}" for n in cmp.notes]
    out += ["", line(_HEADER), line(["-" * w for w in widths])] + [line(r) for r in rows]
    hidden = len(cmp.layers) - len(rows)
    if hidden > 0:
        out.append(f"... {hidden} more layers (all in --format json)")
    out += ["", _counts(cmp), policy.describe(), _verdict(cmp, policy)]
    return "\n".join(out)


def _md(cell: str) -> str:
    return cell.replace("|", "\\|")


def to_markdown(cmp: Any, policy: Optional[RegressionPolicy] = None, top: Optional[int] = 20) -> str:
    """GitHub-flavoured Markdown (e.g. for ``$GITHUB_STEP_SUMMARY``), worst first."""
    policy = policy or cmp.policy
    verdict = _verdict(cmp, policy)
    out = [f"### Spectral comparison: {'❌ ' if cmp.regressed(policy) else '✅ '}{verdict}", "",
           f"- baseline: `{_side(cmp.baseline)}`", f"- candidate: `{_side(cmp.candidate)}`",
           f"- {_counts(cmp)}", f"- {policy.describe()}"]
    out += [f"- note: {n}" for n in cmp.notes]
    rows = _rows(cmp, policy, top)
    out += ["", "| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    out += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    hidden = len(cmp.layers) - len(rows)
    if hidden > 0:
        out += ["", f"{hidden} more layers not shown."]
    return "\n".join(out)


def comparison_to_dict(cmp: Any, policy: Optional[RegressionPolicy] = None) -> Dict[str, Any]:
    """Strict-JSON data: sides, notes, policy, verdict, summary, regressions and every layer
    (worst first); non-finite numbers are ``null``."""
    policy = policy or cmp.policy

    def side(result: Any) -> Dict[str, Any]:
        return {"source": result.meta.get("source"), "identity": result.identity,
                "engine_version": result.meta.get("engine_version"),
                "summary": result.summary()}

    summary = cmp.summary(policy)
    doc = {
        "baseline": side(cmp.baseline), "candidate": side(cmp.candidate), "notes": list(cmp.notes),
        "policy": policy.to_dict(), "regressed": cmp.regressed(policy), "summary": summary,
        "regressions": [r.to_dict() for r in cmp.regressions(policy)],
        "layers": [c.to_dict() for c in cmp.worst_first(policy)],
    }
    return _nulls(plain(doc))


def _nulls(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return None
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nulls(v) for v in value]
    return value


def to_json(cmp: Any, policy: Optional[RegressionPolicy] = None) -> str:
    """:func:`comparison_to_dict` as an indented JSON string."""
    return json.dumps(comparison_to_dict(cmp, policy), indent=1, allow_nan=False)
