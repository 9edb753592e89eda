"""The detX, ``describe`` and ``distances`` part of the WeightWatcher agreement gate.

Imported by ``benchmarks/ww_agreement.py`` on both sides:

* reference side (``weightwatcher==0.7.7``): :func:`reference_extra` writes, per model,
  ``ww_describe_<model>.csv`` (``describe()``) and, for the models of :data:`DISTANCE_MODELS`,
  ``ww_distances_<model>.csv`` (``distances(model, perturbed(model), method)`` for the three
  methods); detX comes with the main ``analyze(detX=True)`` run's CSV;
* compare side (``ww_core``): :func:`compare_parity` runs ``ww_core.describe`` and
  ``ww_core.distances`` on the same sources, joins rows on the module path, and :func:`check`
  states how a model departs from :data:`PARITY_CLAIMS`; :func:`doc_lines` renders the section of
  docs/ww-agreement.md.

The second model of ``distances`` is :func:`perturbed`: every weight and bias multiplied by
``1 + 0.01·z``, ``z`` standard normal from a ``torch.Generator`` seeded by the CRC-32 of the
parameter's name, so both environments (same torch) build the same weights.
"""

from __future__ import annotations

import copy
import csv
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

#: Models whose ``distances`` are compared (modules and state dicts; not file paths or PEFT models).
DISTANCE_MODELS = ("minilm-l6", "crepe-full", "crepe-tiny", "efficientnet-lite0", "digit-cnn")
DISTANCE_METHODS = ("raw", "euclidean", "cka")
#: Methods left out per model: WW's cka forms W·Wᵀ of each matrix, 30522² for MiniLM's word
#: embedding (3.7 GB; it crashes the reference run).
DISTANCE_SKIP = {"minilm-l6": ("cka",)}
DETX_COLUMNS = ("detX_num", "detX_val", "ERG_gap")
DESCRIBE_FIELDS = ("N", "M", "rf", "num_evals")


@dataclass(frozen=True)
class ParityClaim:
    """What is claimed for one model beyond alpha.

    * detX (every layer both tools analyse): ``detX_num`` and ``ERG_gap`` equal and ``detX_val``
      within ``detx_rel`` (relative) with ``precision="float64"``; with the default precision at
      most ``detx_num_diffs`` layers may differ in ``detX_num`` (a float32 spectrum may tip the
      product one eigenvalue earlier or later; see the doc) and ``detX_val`` within ``detx_rel32``;
    * describe: every layer both list has the same N, M, rf and num_evals, except exactly the
      ``describe_swapped`` layers, where WW's even-kernel N/M toggle (an even kernel size with
      out < in) swaps N and M and counts ``num_evals`` on the wrong side; exactly
      ``describe_one_side`` layers are listed by one tool only (in ``distances`` too); on
      ``describe_lora_rank`` LoRA layers WW's ``describe()`` counts ``num_evals`` as M·rf while
      its ``analyze()`` (and ww_core in both) computes the adapter's r eigenvalues;
    * distances (:data:`DISTANCE_MODELS`): every layer both report has ``delta_W`` (and
      ``delta_b`` for ``raw``, where WW reports a bias) within ``dist_rel`` relative.
      WeightWatcher computes them in the weights' float32, ww_core in float64: measured ≤ 5.6e-5
      (the float32 sums over MiniLM's 11.7 M-entry word embedding), 3.4e-5 for cka; 1e-3 is 18
      times that.
    """

    detx_rel: float = 1e-9
    detx_rel32: float = 1e-3
    detx_num_diffs: int = 0
    describe_one_side: Dict[str, str] = None  # type: ignore[assignment]
    describe_swapped: Tuple[str, ...] = ()
    describe_lora_rank: int = 0
    dist_rel: float = 1e-3

    def one_side(self) -> Dict[str, str]:
        return dict(self.describe_one_side or {})


#: Per model (models not listed: the defaults of :class:`ParityClaim`). LoRA models: the products
#: are formed in float32 before the float64 solve (see ``Claim`` in ww_agreement.py), so detX_val
#: agrees to 1e-6 rather than 1e-9 (measured 1.7e-9).
PARITY_CLAIMS: Dict[str, ParityClaim] = {
    "crepe-full": ParityClaim(describe_one_side={"conv2": "ww_core only"}),
    "crepe-tiny": ParityClaim(describe_swapped=("conv2",)),
    "minilm-l6-lora": ParityClaim(detx_rel=1e-6, describe_lora_rank=12),
    "minilm-l6-lora-with_base": ParityClaim(detx_rel=1e-6, describe_lora_rank=24),
}


def claim(model: str) -> ParityClaim:
    return PARITY_CLAIMS.get(model, ParityClaim())


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _write(path: Path, rows: List[Dict[str, Any]], cols) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(cols), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in cols})


def _read(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def perturbed(source: Any) -> Any:
    """A copy of a torch module or state dict with every float tensor scaled by ``1 + 0.01·z``."""
    import torch

    def scale(name: str, t: Any) -> Any:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        z = torch.randn(tuple(t.shape), generator=g, dtype=torch.float32)
        return t * (1 + 0.01 * z).to(t.dtype)

    if isinstance(source, dict):
        return {k: scale(k, v) if torch.is_floating_point(v) else v for k, v in source.items()}
    other = copy.deepcopy(source)
    with torch.no_grad():
        for name, p in other.named_parameters():
            p.copy_(scale(name, p))
    return other


# --------------------------------------------------------------------------------------------------
# reference side
# --------------------------------------------------------------------------------------------------

def reference_extra(ww: Any, name: str, source: Any, info: Dict[str, Any], out: Path) -> None:
    """WeightWatcher's ``describe()`` and ``distances()`` of one model, as CSVs in ``out``."""
    watcher = ww.WeightWatcher(model=source)
    desc = watcher.describe(**info.get("analyze", {}))
    rows = desc.to_dict(orient="records")
    _write(out / f"ww_describe_{name}.csv", rows, ("longname", "layer_type", "N", "M", "rf", "Q",
                                                     "num_evals"))
    if name not in DISTANCE_MODELS:
        return
    other = perturbed(source)
    rows = []
    for method in (m for m in DISTANCE_METHODS if m not in DISTANCE_SKIP.get(name, ())):
        _, _, df = ww.WeightWatcher().distances(source, other, method=method)
        for rec in df.to_dict(orient="records"):
            rows.append({"method": method, "longname": rec["longname"],
                         "delta_W": repr(float(rec["delta_W"])),
                         "delta_b": repr(float(rec["delta_b"])),
                         "b_shape": str(rec.get("b_shape", "unknown"))})
    _write(out / f"ww_distances_{name}.csv", rows,
           ("method", "longname", "delta_W", "delta_b", "b_shape"))


# --------------------------------------------------------------------------------------------------
# compare side
# --------------------------------------------------------------------------------------------------

def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def compare_detx(ww_rows: List[Dict[str, str]], ours: Dict[str, Any], ours64: Dict[str, Any],
                 alias=None) -> Dict[str, Any]:
    """detX columns of the layers both tools analysed (``ours``/``ours64``: name -> LayerResult)."""
    out = {"rows": 0, "num_diff": [], "num_diff64": [], "gap_diff64": [], "val_rel": 0.0,
           "val_rel64": 0.0}
    for w in ww_rows:
        name = w["longname"]
        o, o64 = ours.get(name), ours64.get(name)
        if o is None and alias is not None:
            o, o64 = ours.get(alias(name)), ours64.get(alias(name))
        if o is None or o64 is None or w.get("detX_num", "") == "":
            continue
        out["rows"] += 1
        n_w = int(_f(w["detX_num"]))
        if int(o.detX_num) != n_w:
            out["num_diff"].append(f"{name} ({int(o.detX_num)} vs WW {n_w})")
        else:
            out["val_rel"] = max(out["val_rel"], _rel(_f(w["detX_val"]), o.detX_val))
        if int(o64.detX_num) != n_w:
            out["num_diff64"].append(f"{name} ({int(o64.detX_num)} vs WW {n_w})")
        out["val_rel64"] = max(out["val_rel64"], _rel(_f(w["detX_val"]), o64.detX_val))
        g_w, g_o = _f(w["ERG_gap"]), _f(o64.ERG_gap)
        if not (g_w == g_o or (math.isnan(g_o) and _f(w["alpha"]) == -1)):
            out["gap_diff64"].append(f"{name} ({g_o} vs WW {g_w})")
    return out


def compare_describe(name: str, results: Path, source: Any, info: Dict[str, Any]) -> Dict[str, Any]:
    import ww_core

    ww_rows = {r["longname"]: r for r in _read(results / f"ww_describe_{name}.csv")}
    ours = {l.name: l for l in ww_core.describe(source, **info.get("analyze", {}))}
    mismatch, one_side, swapped, lora_rank = [], {}, [], []
    for lname in list(ww_rows) + [n for n in ours if n not in ww_rows]:
        w, o = ww_rows.get(lname), ours.get(lname)
        if w is not None and o is None and lname.endswith(".base_layer"):
            o = ours.get(lname[: -len(".base_layer")])    # PEFT's base_layer: see ww_agreement
        if w is None or o is None:
            one_side[lname] = "WW only" if o is None else "ww_core only"
            continue
        diff = [f"{k} {getattr(o, k)} vs WW {w[k]}" for k in DESCRIBE_FIELDS
                if int(_f(w[k])) != int(getattr(o, k))]
        if diff and ".lora_" in lname and len(diff) == 1 and diff[0].startswith("num_evals"):
            lora_rank.append(lname)
        elif diff and (o.N, o.M) == (int(_f(w["M"])), int(_f(w["N"]))):
            swapped.append(lname)
        elif diff:
            mismatch.append(f"{lname}: " + ", ".join(diff))
    return {"ww_rows": len(ww_rows), "our_rows": len(ours),
            "joined": sum(1 for n in ww_rows if n not in one_side),
            "mismatch": mismatch, "one_side": one_side, "swapped": swapped, "lora_rank": lora_rank}


def compare_distances(name: str, results: Path, source: Any) -> Dict[str, Any]:
    import ww_core

    path = results / f"ww_distances_{name}.csv"
    if not path.exists():
        return {}
    ww_rows = _read(path)
    other = perturbed(source)
    out: Dict[str, Any] = {}
    for method in (m for m in DISTANCE_METHODS if m not in DISTANCE_SKIP.get(name, ())):
        res = ww_core.distances(source, other, method)
        ours = {l.name: l for l in res}
        rows = [r for r in ww_rows if r["method"] == method]
        joined = [(r, ours[r["longname"]]) for r in rows if r["longname"] in ours]
        rel_w = max((_rel(_f(r["delta_W"]), o.delta_W) for r, o in joined), default=0.0)
        # WW compares the biases of dense layers only (of every layer in a state dict)
        with_b = [(r, o) for r, o in joined if r.get("b_shape", "unknown") != "unknown"]
        rel_b = max((_rel(_f(r["delta_b"]), o.delta_b) for r, o in with_b), default=0.0)
        out[method] = {"ww_rows": len(rows), "our_rows": len(ours), "joined": len(joined),
                       "rel_delta_W": rel_w, "rel_delta_b": rel_b, "bias_rows": len(with_b),
                       "bias_ours_only": sum(1 for r, o in joined if o.delta_b and
                                             r.get("b_shape", "unknown") == "unknown"),
                       "ww_only": sorted({r["longname"] for r in rows} - set(ours)),
                       "ours_only": sorted(set(ours) - {r["longname"] for r in rows})}
    return out


def compare_parity(name: str, results: Path, source: Any, info: Dict[str, Any],
                   ww_rows: List[Dict[str, str]], res: Any, res64: Any) -> Dict[str, Any]:
    """detX, describe and distances of one model (ww_core side)."""
    ours = {l.name: l for l in res.layers}
    ours64 = {l.name: l for l in res64.layers}
    def alias(n: str) -> str:          # PEFT's base_layer: the wrapper's row (see ww_agreement)
        return n[: -len(".base_layer")] if n.endswith(".base_layer") else n

    return {"detx": compare_detx(ww_rows, ours, ours64, alias),
            "describe": compare_describe(name, results, source, info),
            "distances": compare_distances(name, results, source)}


def check(model: str, parity: Dict[str, Any]) -> List[str]:
    """How one model's parity results depart from :data:`PARITY_CLAIMS` (empty: they hold)."""
    c, bad = claim(model), []
    d = parity["detx"]
    if d["num_diff64"]:
        bad.append(f"detX_num differs with precision='float64': {d['num_diff64'][:5]}")
    if d["gap_diff64"]:
        bad.append(f"ERG_gap differs with precision='float64': {d['gap_diff64'][:5]}")
    if d["val_rel64"] > c.detx_rel:
        bad.append(f"detX_val rel. difference {d['val_rel64']:.3g} > {c.detx_rel:g} (float64)")
    if len(d["num_diff"]) > c.detx_num_diffs:
        bad.append(f"detX_num differs on {len(d['num_diff'])} layers with the default precision "
                   f"(claimed at most {c.detx_num_diffs}): {d['num_diff'][:5]}")
    if d["val_rel"] > c.detx_rel32:
        bad.append(f"detX_val rel. difference {d['val_rel']:.3g} > {c.detx_rel32:g} (default precision)")
    desc = parity["describe"]
    if desc["mismatch"]:
        bad.append(f"describe() differs: {desc['mismatch'][:5]}")
    if sorted(desc["swapped"]) != sorted(c.describe_swapped):
        bad.append(f"describe(): WW swaps N and M on {desc['swapped'] or 'no layer'}; "
                   f"claimed: {list(c.describe_swapped) or 'none'}")
    if len(desc["lora_rank"]) != c.describe_lora_rank:
        bad.append(f"describe(): {len(desc['lora_rank'])} LoRA layers with WW's M·rf num_evals; "
                   f"claimed {c.describe_lora_rank}")
    if desc["one_side"] != c.one_side():
        bad.append(f"describe() layers on one side only: {desc['one_side'] or 'none'}; "
                   f"claimed: {c.one_side() or 'none'}")
    for method, s in parity["distances"].items():
        expected = c.one_side()
        if (s["ww_only"] != sorted(k for k, v in expected.items() if v == "WW only")
                or s["ours_only"] != sorted(k for k, v in expected.items() if v == "ww_core only")):
            bad.append(f"distances({method}): layers on one side only: WW {s['ww_only'][:3]}, "
                       f"ww_core {s['ours_only'][:3]}")
        if max(s["rel_delta_W"], s["rel_delta_b"]) > c.dist_rel:
            bad.append(f"distances({method}): rel. difference {max(s['rel_delta_W'], s['rel_delta_b']):.3g}"
                       f" > {c.dist_rel:g}")
    if model in DISTANCE_MODELS and not parity["distances"]:
        bad.append("no WeightWatcher distances() results")
    return bad


def doc_lines(summaries: List[Dict[str, Any]], table) -> List[str]:
    """The detX / describe / distances section of docs/ww-agreement.md."""
    lines = ["## detX, `describe()` and `distances()`", "",
             "Checked by the same gate (`benchmarks/ww_parity.py`, `PARITY_CLAIMS`), on the same "
             "models. **detX**: WeightWatcher runs `analyze(detX=True)`, ww_core "
             "`analyze(detX=True)` with its default precision and with `precision=\"float64\"`; "
             "`detX_num` and `ERG_gap` must be equal and `detX_val` within 1e-9 (relative) in "
             "float64 on every layer both analyse. **describe**: WW `describe()` against "
             "`ww_core.describe()`: same N, M, rf, num_evals per layer. **distances**: WW "
             "`distances(model, perturbed, method)` against `ww_core.distances` for the three "
             "methods, `perturbed` being the model with every parameter scaled by 1 + 0.01·z (seeded "
             "per parameter name); `delta_W` and `delta_b` within 1e-3 (relative; WW computes in "
             "the weights' float32, ww_core in float64). Without cka on `minilm-l6`: WW's cka "
             "forms W·Wᵀ of every matrix, 30522² for the word embedding, and crashes (ww_core "
             "forms the smaller Gram matrix).", ""]
    body = []
    for s in summaries:
        p = s.get("parity")
        if not p:
            continue
        d, desc = p["detx"], p["describe"]
        swapped = ", ".join(f"`{n}`" for n in desc["swapped"])
        dist = p["distances"]
        body.append([f"`{s['model']}`", d["rows"], len(d["num_diff64"]), f"{d['val_rel64']:.1e}",
                     len(d["gap_diff64"]), len(d["num_diff"]), f"{d['val_rel']:.1e}",
                     f"{desc['ww_rows']} / {desc['our_rows']}",
                     f"{len(desc['mismatch'])}" + (f" (WW swaps N/M: {swapped})" if swapped else "")
                     + (f" ({len(desc['lora_rank'])} LoRA rows: WW num_evals = M·rf)"
                        if desc["lora_rank"] else ""),
                     ", ".join(f"`{k}` ({v})" for k, v in desc["one_side"].items()) or "none",
                     "; ".join(f"{m} {v['joined']}: {max(v['rel_delta_W'], v['rel_delta_b']):.1e}"
                               for m, v in dist.items()) or "–"])
    lines += [table(["model", "detX rows", "detX_num ≠ (f64)", "detX_val rel. (f64)", "ERG_gap ≠ (f64)",
                     "detX_num ≠ (default)", "detX_val rel. (default)", "describe rows WW / ours",
                     "N/M/rf/num_evals ≠", "describe: one side only",
                     "distances: method joined-layers: max rel. diff"], body), ""]
    lines += [
        "What differs, on purpose:",
        "",
        "* **detX**: ww_core multiplies the rescaled eigenvalues as WW does (`numpy.prod` in "
        "float64), so it also reproduces WW where that product underflows on a spectrum of "
        "thousands of eigenvalues (`crepe-full` conv3–conv5, 8192 eigenvalues each: WW's "
        "`detX_num` is then an artefact of float64's range, e.g. 4809 where the exact tail has 5428 "
        "eigenvalues; `ww_core.detx.detx_constraint(evals, exact=True)` gives the exact one). With "
        "the default precision a layer solved in float32 could tip the product one eigenvalue "
        "earlier or later if the product sat within float32 rounding of 1. For a "
        "failed fit WW's `ERG_gap` uses its placeholder `num_pl_spikes = -1`; ww_core reports NaN. "
        "WW's `num_ERG_spikes` (= `detX_num`) and `detX_val_unrescaled` (which holds the rescaled "
        "value) are not repeated.",
        "* **describe**: the rows are the layers `analyze()` would analyse with the same options, "
        "with the numbers it would use: WW's `describe()` counts `num_evals` = M·rf for a LoRA "
        "layer, whose analysis computes its r eigenvalues (ww_core: r), and applies its even-kernel "
        "N/M toggle (`crepe-tiny` conv2 described as N 16, M 128, 8192 eigenvalues; ww_core: N 128, "
        "M 16, 1024, as WW's own analysis); `crepe-full` conv2 is skipped by WW on the same toggle. "
        "ww_core also lists the layers it skips, with the reason, and each layer's stack shape.",
        "* **distances**: layers are matched by name (WW zips the two layer lists by position, so "
        "one extra layer shifts every pair after it); layers of one model only are listed instead "
        "of failing; `delta_b` covers every layer with a bias (torch modules and state dicts), "
        "where WW compares the biases of dense layers only in a module (it reports 0 for a conv "
        "layer's bias), so `delta_b` is compared where WW reports a bias.",
        "* **`fit=\"TPL\"` / `\"E_TPL\"`** (truncated power laws) are refused with a `ValueError`: "
        "WeightWatcher 0.7.7 fits them only with `pl_package=\"powerlaw\"`, and with the powerlaw "
        "2.0.0 of the reference environment every such fit fails (alpha −1, status failed, on "
        "every layer of every model tried), so there is no reference value to agree with.",
        "",
    ]
    return lines
