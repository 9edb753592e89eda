"""Documented ``ww_core.analyze`` options and ``AnalysisResult`` claims that no other test checks:
``max_N``, ``summary(how="median")``, ``split_qkv``, ``progress``, ``hill_xmin_pos``,
``conv2d_norm`` and ``finger_thresh`` (README "Quickstart", "Columns", "Reading the numbers",
``analyze``'s docstring).

Every test here but the ``nn.MultiheadAttention`` one uses numpy state dicts only (``core``).
"""

import math
import re
import sys
import warnings

import numpy as np
import pytest

import ww_core
from helpers import heavy_tailed, spec_matrices
from ww_core.result import SUMMARY_METRICS

CORE = pytest.mark.core


def _gaussian(rng, shape):
    return rng.standard_normal(shape) / math.sqrt(shape[0])


# ----------------------------------------------------------------------------------- max_N


@CORE
def test_max_n_skips_layers_whose_larger_side_exceeds_it_with_the_reason():
    rng = np.random.default_rng(0)
    sd = {"big.weight": _gaussian(rng, (300, 20)),       # N = 300
          "big_t.weight": _gaussian(rng, (20, 301)),     # N is the larger side, whatever the layout
          "edge.weight": _gaussian(rng, (200, 20)),      # N == max_N: kept
          "small.weight": _gaussian(rng, (100, 20))}
    res = ww_core.analyze(sd, max_N=200)
    assert res.names == ["edge", "small"]
    skipped = {s.name: s for s in res.skipped}
    assert sorted(skipped) == ["big", "big_t"]
    # the reason names the size and the bound ("too large (N=300 > max_N=200)")
    assert re.search(r"\bN=300 > max_N=200\b", skipped["big"].reason), skipped["big"].reason
    assert re.search(r"\bN=301 > max_N=200\b", skipped["big_t"].reason), skipped["big_t"].reason
    assert (skipped["big"].N, skipped["big"].M, skipped["big"].type) == (300, 20, "dense")
    assert res.options["max_N"] == 200
    # without the bound every layer is analysed
    assert ww_core.analyze(sd).names == ["big", "big_t", "edge", "small"]


@CORE
def test_max_n_defaults_to_50000():
    rng = np.random.default_rng(1)
    sd = {"at_limit.weight": rng.standard_normal((50000, 8)),   # 8 eigenvalues = min_evals
          "over.weight": rng.standard_normal((50001, 8))}
    res = ww_core.analyze(sd)
    assert res.names == ["at_limit"]
    (skip,) = res.skipped
    assert skip.name == "over" and re.search(r"\bN=50001 > max_N=50000\b", skip.reason), skip.reason


@CORE
def test_max_n_below_one_is_an_invalid_option():
    with pytest.raises(ValueError, match="max_N must be >= 1"):
        ww_core.analyze({"fc.weight": np.ones((20, 10))}, max_N=0)


# ----------------------------------------------------------------------------------- summary


def _mixed_layers():
    """Layers with clearly different alphas and norms, plus one whose weights are NaN (failed)."""
    rng = np.random.default_rng(2)
    nan_layer = _gaussian(rng, (120, 60))
    nan_layer[3, 4] = np.nan
    return {"gauss.weight": _gaussian(rng, (300, 100)),          # alpha > 6
            "heavy15.weight": heavy_tailed(rng, (300, 100), mu=1.5),
            "heavy25.weight": heavy_tailed(rng, (250, 120), mu=2.5),
            "heavy35.weight": 3.0 * heavy_tailed(rng, (200, 80), mu=3.5),
            "gauss_wide.weight": 0.1 * _gaussian(rng, (400, 50)),
            "broken.weight": nan_layer}


@CORE
def test_summary_median_is_the_numpy_median_of_the_per_layer_values():
    res = ww_core.analyze(_mixed_layers())
    assert len(res) == 6 and res["broken"].status == "failed"
    med, mean = res.summary(how="median"), res.summary()
    for metric in SUMMARY_METRICS:
        values = np.array([getattr(l, metric) for l in res.layers if l.ok], dtype=float)
        assert values.size == 5 and np.isfinite(values).all(), metric
        assert med[metric] == pytest.approx(float(np.median(values)), rel=1e-12), metric
        assert mean[metric] == pytest.approx(float(np.mean(values)), rel=1e-12), metric
    # the fixture separates median from mean, so a `how` that is ignored cannot pass
    alphas = [l.alpha for l in res.layers if l.ok]
    assert abs(np.median(alphas) - np.mean(alphas)) > 0.1
    # the counts do not depend on `how`
    for key in ("num_layers", "num_failed", "num_flagged"):
        assert med[key] == mean[key]
    assert (med["num_layers"], med["num_failed"]) == (6, 1)
    assert med["num_flagged"] == sum(1 for l in res.layers if set(l.flags) - {"too-few-evals"})


@CORE
def test_summary_rejects_an_unknown_reduction():
    res = ww_core.analyze({"fc.weight": _gaussian(np.random.default_rng(3), (200, 100))})
    with pytest.raises(ValueError, match="how must be 'mean' or 'median'"):
        res.summary(how="max")


@CORE
@pytest.mark.parametrize("how", ["mean", "median"])
def test_summary_excludes_failed_fits_from_every_metric(how):
    rng = np.random.default_rng(4)
    u, v = rng.standard_normal((64, 1)), rng.standard_normal((1, 32))
    sd = {"fc.weight": _gaussian(rng, (300, 100)),
          "gauss.weight": 0.01 * _gaussian(rng, (200, 100)),
          # exactly rank 1 (singular value 1): one eigenvalue above EVALS_THRESH, no fit possible
          "rank1.weight": (u @ v) / (np.linalg.norm(u) * np.linalg.norm(v))}
    res = ww_core.analyze(sd, precision="float64")
    assert res["rank1"].status == "failed" and "fit-failed" in res["rank1"].flags
    assert math.isfinite(res["rank1"].log_norm)          # what makes the difference below
    reduce = np.mean if how == "mean" else np.median
    summary = res.summary(how=how)
    for metric in SUMMARY_METRICS:
        ok = [getattr(l, metric) for l in res.layers if l.ok]
        assert summary[metric] == pytest.approx(float(reduce(ok)), rel=1e-12), metric
    assert (summary["num_layers"], summary["num_failed"]) == (3, 1)
    # with no successful fit there is nothing to average, whatever finite values the layer has
    only_failed = ww_core.analyze({"rank1.weight": sd["rank1.weight"]}, precision="float64")
    empty = only_failed.summary(how=how)
    assert all(math.isnan(empty[metric]) for metric in SUMMARY_METRICS), empty
    assert (empty["num_layers"], empty["num_failed"]) == (1, 1)


# ----------------------------------------------------------------------------------- split_qkv


def _fused_state_dict():
    rng = np.random.default_rng(5)
    return {"enc.self_attn.in_proj_weight": _gaussian(rng, (3 * 48, 48)),
            "enc.self_attn.out_proj.weight": _gaussian(rng, (48, 48)),
            "enc.qkv.weight": _gaussian(rng, (3 * 48, 48))}      # a fused Linear: not an in_proj


@CORE
def test_split_qkv_splits_a_fused_in_proj_weight_of_a_state_dict_and_false_ignores_it():
    sd = _fused_state_dict()
    w = sd["enc.self_attn.in_proj_weight"]
    res = ww_core.analyze(sd, precision="float64", keep_evals=True)
    parts = [n for n in res.names if n.startswith("enc.self_attn.") and re.search(r"in_proj_[qkv]$", n)]
    assert [n[-1] for n in parts] == ["q", "k", "v"]
    assert res.names == parts + ["enc.self_attn.out_proj", "enc.qkv"]
    for i, name in enumerate(parts):
        layer, block = res[name], w[i * 48:(i + 1) * 48]
        assert (layer.type, layer.N, layer.M, layer.num_evals) == ("dense", 48, 48, 48)
        np.testing.assert_allclose(layer.evals, np.linalg.eigvalsh(block.T @ block), rtol=1e-9, atol=1e-12)
    assert (res["enc.qkv"].N, res["enc.qkv"].M) == (144, 48)              # analysed whole

    off = ww_core.analyze(sd, split_qkv=False, precision="float64")
    assert off.options["split_qkv"] is False and res.options["split_qkv"] is True
    # WeightWatcher ignores the fused in-projection: no q/k/v (nor a whole in_proj) layer
    assert off.names == ["enc.self_attn.out_proj", "enc.qkv"]
    for name in off.names:
        assert off[name].alpha == pytest.approx(res[name].alpha, rel=1e-9)


@CORE
def test_split_qkv_names_from_a_state_dict_follow_the_documented_module_path():
    res = ww_core.analyze(_fused_state_dict())
    assert res.names[:3] == ["enc.self_attn.in_proj_q", "enc.self_attn.in_proj_k", "enc.self_attn.in_proj_v"]
    # a fused weight of an odd first dimension is analysed whole, as <path>.in_proj
    rng = np.random.default_rng(5)
    odd = ww_core.analyze({"enc.self_attn.in_proj_weight": _gaussian(rng, (100, 48))})
    assert odd.names == ["enc.self_attn.in_proj"]


def _encoder_layer(torch, seed=0):
    torch.manual_seed(seed)
    return torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64)


def test_split_qkv_names_are_the_same_from_a_module_its_state_dict_and_a_file(tmp_path):
    torch = pytest.importorskip("torch")
    layer = _encoder_layer(torch)
    qkv = ["self_attn.in_proj_q", "self_attn.in_proj_k", "self_attn.in_proj_v"]
    expected = qkv + ["self_attn.out_proj", "linear1", "linear2"]
    from_module = ww_core.analyze(layer, precision="float64")
    assert from_module.names == expected
    sd = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    from_sd = ww_core.analyze(sd, precision="float64")
    sources = {"module": from_module, "state dict": from_sd}
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(sd, tmp_path / "layer.pt")
        sources["file"] = ww_core.analyze(str(tmp_path / "layer.pt"), precision="float64")
    else:
        save_file(sd, str(tmp_path / "layer.safetensors"))
        sources["file"] = ww_core.analyze(str(tmp_path / "layer.safetensors"), precision="float64")
    for what, res in sources.items():
        # (a .safetensors file keeps its tensors sorted by name: same names, another order)
        assert sorted(res.names) == sorted(expected) and res.skipped == [], what
        for name in qkv:
            assert res[name].alpha == pytest.approx(from_module[name].alpha, rel=1e-9), (what, name)


def test_base_model_state_dict_matches_the_split_qkv_layers_of_a_module():
    torch = pytest.importorskip("torch")
    base = _encoder_layer(torch)
    tuned = _encoder_layer(torch)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    res = ww_core.analyze(tuned, base_model=base.state_dict(), precision="float64", keep_evals=True)
    assert res.names == ["self_attn.in_proj_q", "self_attn.in_proj_k", "self_attn.in_proj_v",
                         "self_attn.out_proj", "linear1", "linear2"]
    assert res.skipped == []                 # nothing left unmatched ("no layer of this name")
    delta = (tuned.self_attn.in_proj_weight - base.self_attn.in_proj_weight).detach().double().numpy()
    for i, part in enumerate("qkv"):
        block = delta[i * 32:(i + 1) * 32]
        np.testing.assert_allclose(res[f"self_attn.in_proj_{part}"].evals,
                                   np.linalg.eigvalsh(block.T @ block), rtol=1e-9, atol=1e-12)


def test_split_qkv_on_torch_multihead_attention():
    torch = pytest.importorskip("torch")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(embed_dim=32, num_heads=4)
            self.qkv = torch.nn.Linear(32, 96)           # timm-style fused projection, a plain Linear
            self.fc = torch.nn.Linear(32, 64)

    torch.manual_seed(0)
    block = Block()
    res = ww_core.analyze(block, precision="float64", keep_evals=True)
    assert res.names == ["attn.in_proj_q", "attn.in_proj_k", "attn.in_proj_v", "attn.out_proj", "qkv", "fc"]
    w = block.attn.in_proj_weight.detach().double().numpy()
    for i, part in enumerate("qkv"):
        block_w = w[i * 32:(i + 1) * 32]
        layer = res[f"attn.in_proj_{part}"]
        assert (layer.N, layer.M) == (32, 32)
        np.testing.assert_allclose(layer.evals, np.linalg.eigvalsh(block_w.T @ block_w), rtol=1e-9,
                                   atol=1e-12)
    assert (res["qkv"].N, res["qkv"].M) == (96, 32)

    off = ww_core.analyze(block, split_qkv=False)
    assert off.names == ["attn.out_proj", "qkv", "fc"]
    assert not any("in_proj" in s.name for s in off.skipped)


# ----------------------------------------------------------------------------------- progress


def _three_layers_and_a_small_one():
    rng = np.random.default_rng(6)
    return {"a.weight": _gaussian(rng, (200, 100)), "b.weight": _gaussian(rng, (150, 60)),
            "c.weight": _gaussian(rng, (120, 40)), "tiny.weight": _gaussian(rng, (10, 4))}


@CORE
def test_progress_true_shows_a_tqdm_bar_over_the_analysed_layers(capsys):
    pytest.importorskip("tqdm")
    sd = _three_layers_and_a_small_one()
    res = ww_core.analyze(sd, progress=True)
    assert res.names == ["a", "b", "c"] and [s.name for s in res.skipped] == ["tiny"]
    err = capsys.readouterr().err
    # the bar's first frame is always drawn: its description and total (the 3 analysed layers)
    assert "ww analyze" in err
    assert re.search(r"\b0/3\b", err), err
    assert "layer" in err                                  # tqdm's unit
    ww_core.analyze(sd)                                      # progress=False: nothing on stderr
    assert capsys.readouterr().err == ""


@CORE
def test_progress_true_without_tqdm_counts_layers_on_stderr(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)          # `import tqdm` raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ww_core.analyze(_three_layers_and_a_small_one(), progress=True)
    assert res.names == ["a", "b", "c"]
    err = capsys.readouterr().err
    assert re.search(r"\b[0-3]\s*(/|of)\s*3\b", err), f"no layer counter on stderr: {err!r}"
    # one line rewritten in place after each analysed layer, ended with a newline
    frames = err.split("\r")
    assert frames[0] == "" and err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert [f.rstrip("\n") for f in frames[1:]] == [f"ww analyze  {k}/3 layers" for k in (0, 1, 2, 3, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # the counter replaces the old warning
        ww_core.analyze(_three_layers_and_a_small_one(), progress=True)
    capsys.readouterr()
    ww_core.analyze(_three_layers_and_a_small_one())      # progress=False: nothing on stderr
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------- hill_xmin_pos


def _hill(evals, xmin_pos):
    """TempBalance's estimator, written out: xmin = the i-th smallest, i = floor(n / xmin_pos)."""
    x = np.sort(evals)
    i = int(len(x) / xmin_pos)
    return 1.0 + (len(x) - i) / np.sum(np.log(x[i:] / x[i]))


@CORE
def test_alpha_hill_uses_the_median_eigenvalue_as_xmin_and_hill_xmin_pos_moves_it():
    rng = np.random.default_rng(7)
    sd = {"fc.weight": heavy_tailed(rng, (300, 101), mu=2.5).astype(np.float64)}
    res = ww_core.analyze(sd, precision="float64", keep_evals=True)
    evals = res["fc"].evals
    assert evals.size == 101
    # README: xmin fixed at the median eigenvalue (top half of the spectrum)
    x = np.sort(evals)
    assert x[int(101 / 2)] == np.median(evals)
    assert res["fc"].alpha_hill == pytest.approx(_hill(evals, 2.0), rel=1e-9)
    quarter = ww_core.analyze(sd, precision="float64", keep_evals=True, hill_xmin_pos=4.0)
    assert quarter["fc"].alpha_hill == pytest.approx(_hill(quarter["fc"].evals, 4.0), rel=1e-9)
    assert abs(quarter["fc"].alpha_hill - res["fc"].alpha_hill) > 1e-3
    assert quarter["fc"].alpha == pytest.approx(res["fc"].alpha, rel=1e-9)   # only the Hill estimator moves
    with pytest.raises(ValueError, match="hill_xmin_pos must be > 1"):
        ww_core.analyze(sd, hill_xmin_pos=1.0)


# ----------------------------------------------------------------------------------- conv2d_norm


@CORE
@pytest.mark.parametrize("shape,ltype", [((64, 32, 3, 3), "conv2d"), ((64, 32, 5), "conv1d"),
                                         ((32, 16, 2, 2, 2), "conv3d")])
def test_conv2d_norm_scales_every_convolution_by_half_and_leaves_alpha_alone(shape, ltype):
    rng = np.random.default_rng(8)
    sd = {"conv.weight": heavy_tailed(rng, (shape[0], int(np.prod(shape[1:]))), mu=3.0)
          .astype(np.float64).reshape(shape),
          "fc.weight": _gaussian(rng, (200, 100))}
    on = ww_core.analyze(sd, precision="float64")
    off = ww_core.analyze(sd, precision="float64", conv2d_norm=False)
    assert off.options["conv2d_norm"] is False and on.options["conv2d_norm"] is True
    c_on, c_off = on["conv"], off["conv"]
    assert c_on.type == c_off.type == ltype
    # README: the scale metrics carry the x0.5 factor ...
    for metric in ("spectral_norm", "xmin", "xmax"):
        assert getattr(c_on, metric) == pytest.approx(0.5 * getattr(c_off, metric), rel=1e-12), metric
    for metric in ("log_norm", "log_spectral_norm"):
        assert getattr(c_on, metric) == pytest.approx(getattr(c_off, metric) + math.log10(0.5),
                                                      rel=1e-9, abs=1e-12), metric
    # ... while alpha, D and stable_rank do not depend on it
    for metric in ("alpha", "D", "stable_rank"):
        assert getattr(c_on, metric) == pytest.approx(getattr(c_off, metric), rel=1e-6), metric
    # dense layers are never scaled
    assert on["fc"].spectral_norm == pytest.approx(off["fc"].spectral_norm, rel=1e-12)


# ----------------------------------------------------------------------------------- finger_thresh


@CORE
def test_finger_thresh_is_the_alpha_drop_clip_xmax_needs_to_keep_a_refit():
    sd = {"conv.weight": spec_matrices()[2]}        # clip_xmax drops its alpha from ~22.4 to ~5.5
    clipped = ww_core.analyze(sd, precision="float64", fix_fingers="clip_xmax")["conv"]
    assert clipped.num_fingers >= 1 and clipped.alpha + 10 < clipped.raw_alpha
    strict = ww_core.analyze(sd, precision="float64", fix_fingers="clip_xmax", finger_thresh=20.0)
    assert strict.options["finger_thresh"] == 20.0
    kept = strict["conv"]                            # a drop of ~17 < 20: the refit is refused
    assert kept.num_fingers == 0
    assert kept.alpha == pytest.approx(clipped.raw_alpha, rel=1e-9)
    assert kept.alpha == pytest.approx(ww_core.analyze(sd, precision="float64")["conv"].alpha, rel=1e-9)
