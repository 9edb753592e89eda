"""LoRA / PEFT adapters (``analyze(peft=...)``), ``base_model=`` deltas and the ``trainable`` filter.

Eigenvalues are checked against dense float64 references computed here (the engine itself never
forms ``B·A``). The numpy-only tests (state dicts with ``lora_A``/``lora_B`` keys) run in the
core environment; the others build a tiny PEFT model and need ``peft``.
"""

import copy
import warnings

import numpy as np
import pytest

import ww_core
from ww_core.peft import check_peft, svd_core
from ww_core.sources import find_layers


def _svals2(w):
    return np.sort(np.linalg.svd(np.asarray(w, dtype=np.float64), compute_uv=False) ** 2)


def _lora_state_dict(rng, out=48, n_in=40, r=8, adapter=".default", transposed_base=False):
    w = rng.standard_normal((n_in, out) if transposed_base else (out, n_in)) / np.sqrt(out)
    return {
        "net.fc.base_layer.weight": w,
        f"net.fc.lora_A{adapter}.weight": rng.standard_normal((r, n_in)) / np.sqrt(n_in),
        f"net.fc.lora_B{adapter}.weight": rng.standard_normal((out, r)) / np.sqrt(r),
        "net.head.weight": rng.standard_normal((20, out)),
    }


# --------------------------------------------------------------------------- numpy only
@pytest.mark.core
def test_svd_core_has_the_singular_values_of_the_product():
    rng = np.random.default_rng(0)
    for out, r, n_in in ((50, 4, 30), (6, 8, 40), (40, 8, 5)):
        b, a = rng.standard_normal((out, r)), rng.standard_normal((r, n_in))
        core = svd_core(b, a)
        k = min(out, r, n_in)
        assert core.shape[0] <= r and core.shape[1] <= r
        np.testing.assert_allclose(_svals2(core)[-k:], _svals2(b @ a)[-k:], rtol=1e-10)


@pytest.mark.core
def test_state_dict_peft_names_counts_and_eigenvalues():
    sd = _lora_state_dict(np.random.default_rng(1))
    res = ww_core.analyze(sd, peft=True, precision="float64", keep_evals=True)
    assert res.names == ["net.fc.lora_BA.default"]           # base and other layers: not reported
    layer = res.layers[0]
    assert (layer.N, layer.M, layer.num_evals) == (48, 40, 8)
    ref = _svals2(sd["net.fc.lora_B.default.weight"] @ sd["net.fc.lora_A.default.weight"])[-8:]
    np.testing.assert_allclose(layer.evals, ref, rtol=1e-10)
    assert ww_core.analyze(sd, peft="peft_only").names == res.names


@pytest.mark.core
def test_adapter_file_keys_without_adapter_name(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    sd = _lora_state_dict(np.random.default_rng(2), adapter="")     # adapter_model.safetensors style
    adapter = {k: v.astype(np.float32) for k, v in sd.items() if ".lora_" in k}
    st.save_file(adapter, str(tmp_path / "adapter_model.safetensors"))
    res = ww_core.analyze(tmp_path, peft=True)
    assert res.names == ["net.fc.lora_BA"] and res.layers[0].num_evals == 8
    # with_base on an adapter-only file: no base weight, so W + B·A is a skip with a reason
    res = ww_core.analyze(tmp_path, peft="with_base")
    assert res.names == ["net.fc.lora_BA"]
    assert [(s.name, "no base weight" in s.reason) for s in res.skipped] == [("net.fc.lora_W_plus_AB", True)]


@pytest.mark.core
def test_with_base_state_dict_and_transposed_base_weight():
    for transposed in (False, True):
        sd = _lora_state_dict(np.random.default_rng(3), transposed_base=transposed)
        res = ww_core.analyze(sd, peft="with_base", precision="float64", keep_evals=True)
        assert res.names == ["net.fc.base_layer", "net.fc.lora_W_plus_AB.default",
                             "net.fc.lora_BA.default", "net.head"]
        ba = sd["net.fc.lora_B.default.weight"] @ sd["net.fc.lora_A.default.weight"]
        w = sd["net.fc.base_layer.weight"]
        merged = w + (ba.T if transposed else ba)
        wab = res["net.fc.lora_W_plus_AB.default"]
        assert wab.num_evals == 8                                   # WW keeps the top r only
        np.testing.assert_allclose(wab.evals, _svals2(merged)[-8:], rtol=1e-10)


@pytest.mark.core
def test_rank_below_min_evals_is_skipped_like_weightwatcher():
    sd = _lora_state_dict(np.random.default_rng(4), r=4)
    res = ww_core.analyze(sd, peft=True)
    assert res.names == []
    assert [s.reason for s in res.skipped] == ["too few eigenvalues (4 < min_evals=8)"]
    assert ww_core.analyze(sd, peft=True, min_evals=2).layers[0].num_evals == 4


@pytest.mark.core
def test_bad_options_and_no_adapters_warning():
    sd = {"fc.weight": np.random.default_rng(5).standard_normal((30, 20))}
    for bad in ("yes", 1.5, "base"):
        with pytest.raises(ValueError, match="peft must be"):
            ww_core.analyze(sd, peft=bad)
    with pytest.raises(ValueError, match="trainable"):
        ww_core.analyze(sd, trainable="frozen")
    assert check_peft(True) == check_peft("peft_only") == "peft_only"
    with pytest.warns(UserWarning, match="no LoRA adapter"):
        assert ww_core.analyze(sd, peft=True).names == []


@pytest.mark.core
def test_base_model_delta_on_state_dicts():
    rng = np.random.default_rng(6)
    base = {"enc.fc1.weight": rng.standard_normal((40, 30)), "enc.fc2.weight": rng.standard_normal((30, 20)),
            "enc.odd.weight": rng.standard_normal((25, 20))}
    tuned = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in base.items()}
    tuned["enc.odd.weight"] = rng.standard_normal((26, 20))           # shape changed
    tuned["enc.new.weight"] = rng.standard_normal((30, 30))           # not in the base
    tuned["enc.fc2.weight"] = tuned["enc.fc2.weight"].T.copy()         # stored transposed
    res = ww_core.analyze(tuned, base_model=base, precision="float64", keep_evals=True)
    assert res.names == ["enc.fc1", "enc.fc2"]
    np.testing.assert_allclose(res["enc.fc1"].evals,
                               _svals2(tuned["enc.fc1.weight"] - base["enc.fc1.weight"]), rtol=1e-10)
    np.testing.assert_allclose(res["enc.fc2"].evals,
                               _svals2(tuned["enc.fc2.weight"] - base["enc.fc2.weight"].T), rtol=1e-10)
    reasons = {s.name: s.reason for s in res.skipped}
    assert "differs from base_model layer enc.odd" in reasons["enc.odd"]
    assert reasons["enc.new"] == "no layer of this name in base_model"
    assert res.options["base_model"] == "dict"
    # a model minus itself: every eigenvalue is zero, nothing crashes
    zero = ww_core.analyze(base, base_model=base)
    assert zero.names == ["enc.fc1", "enc.fc2", "enc.odd"]               # every layer: a zero delta
    assert all(layer.status == "failed" or layer.spectral_norm == 0 for layer in zero.layers)


@pytest.mark.core
def test_distributed_plan_sees_the_same_layers():
    from ww_core.distributed import _plan
    sd = _lora_state_dict(np.random.default_rng(8))
    base = {k: v for k, v in sd.items() if ".lora_" not in k}
    for options in ({"peft": True}, {"peft": "with_base"}, {"base_model": base}, {"trainable": False}):
        todo, skipped = _plan(sd, dict(options))
        res = ww_core.analyze(sd, **options)
        assert [lm.name for lm in todo] == res.names
        assert [s.name for s in skipped] == [s.name for s in res.skipped]


@pytest.mark.core
def test_trainable_is_unknown_for_state_dicts():
    sd = _lora_state_dict(np.random.default_rng(7))
    assert {lm.trainable for lm in find_layers(sd)} == {None}
    assert len(ww_core.analyze(sd, trainable=True).layers) == 4      # unknown counts as trainable
    assert ww_core.analyze(sd, trainable=False).names == []


# --------------------------------------------------------------------------- PEFT modules
@pytest.fixture
def peft_model():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(64, 48), torch.nn.Linear(48, 32)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    base = Net()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16,
                                                                     target_modules=["fc1", "fc2"]))
    _randomise_b(model)
    return model, base


def _randomise_b(model, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g))


def _ba(model, path, adapter="default"):
    mod = model.get_submodule(path)
    b, a = mod.lora_B[adapter].weight, mod.lora_A[adapter].weight
    return (b.detach().double() @ a.detach().double()).numpy(), mod


def test_module_peft_true_names_and_eigenvalues(peft_model):
    model, _ = peft_model
    res = ww_core.analyze(model, peft=True, precision="float64", keep_evals=True)
    assert res.names == ["base_model.model.fc1.lora_BA.default", "base_model.model.fc2.lora_BA.default"]
    for layer, path in zip(res.layers, ("base_model.model.fc1", "base_model.model.fc2")):
        ba, _ = _ba(model, path)
        assert layer.num_evals == 8 and (layer.N, layer.M) == (max(ba.shape), min(ba.shape))
        np.testing.assert_allclose(layer.evals, _svals2(ba)[-8:], rtol=1e-9)


def test_product_layer_loads_only_an_r_by_r_matrix(peft_model):
    import ww_core.peft as wp
    model, _ = peft_model
    layers = wp.peft_layers(find_layers(model), True, wp.lora_module_info(model))
    assert [tuple(lm.load().shape) for lm in layers] == [(1, 8, 8), (1, 8, 8)]


def test_module_with_base_uses_the_adapter_scaling(peft_model):
    model, _ = peft_model
    res = ww_core.analyze(model, peft="with_base", precision="float64", keep_evals=True)
    assert res.names == [f"base_model.model.{fc}{part}" for fc in ("fc1", "fc2") for part in (
        "", ".lora_W_plus_AB.default", ".lora_BA.default")]
    ba, mod = _ba(model, "base_model.model.fc1")
    assert mod.scaling["default"] == 2.0                        # lora_alpha / r
    merged = mod.base_layer.weight.detach().double().numpy() + 2.0 * ba
    np.testing.assert_allclose(res["base_model.model.fc1.lora_W_plus_AB.default"].evals, _svals2(merged)[-8:],
                               rtol=1e-6)                       # W + s·B·A is formed in float32


def test_module_state_dict_gives_the_same_adapter_layers(peft_model):
    model, _ = peft_model
    from_module = ww_core.analyze(model, peft=True, precision="float64")
    from_sd = ww_core.analyze(model.state_dict(), peft=True, precision="float64")
    assert from_sd.names == from_module.names
    for a, b in zip(from_sd.layers, from_module.layers):
        assert a.alpha == pytest.approx(b.alpha, abs=1e-9)


def test_several_adapters_each_give_their_own_layer(peft_model):
    import peft
    model, _ = peft_model
    model.add_adapter("other", peft.LoraConfig(r=8, target_modules=["fc1"]))
    _randomise_b(model, seed=1)
    res = ww_core.analyze(model, peft=True, precision="float64", keep_evals=True)
    assert res.names == ["base_model.model.fc1.lora_BA.default", "base_model.model.fc1.lora_BA.other",
                         "base_model.model.fc2.lora_BA.default"]
    for adapter in ("default", "other"):
        ba, _ = _ba(model, "base_model.model.fc1", adapter)
        np.testing.assert_allclose(res[f"base_model.model.fc1.lora_BA.{adapter}"].evals, _svals2(ba)[-8:],
                                   rtol=1e-9)


def test_merged_adapters(peft_model):
    model, _ = peft_model
    model.merge_adapter()
    res = ww_core.analyze(model, peft="with_base")
    assert "base_model.model.fc1.lora_BA.default" in res.names         # the update is still there
    reasons = {s.name: s.reason for s in res.skipped}
    assert "is merged into the base weight" in reasons["base_model.model.fc1.lora_W_plus_AB.default"]
    plain = model.merge_and_unload()
    assert ww_core.analyze(plain).names == ["fc1", "fc2"]
    with pytest.warns(UserWarning, match="merge_and_unload"):
        assert ww_core.analyze(plain, peft=True).names == []


def test_trainable_flag_and_filter(peft_model):
    model, _ = peft_model
    flags = {lm.name: lm.trainable for lm in find_layers(model)}
    assert flags["base_model.model.fc1"] is False and flags["base_model.model.fc1.lora_A.default"] is True
    trainable = ww_core.analyze(model, trainable=True).names
    assert trainable == [f"base_model.model.{fc}.lora_{ab}.default" for fc in ("fc1", "fc2") for ab in "AB"]
    assert ww_core.analyze(model, trainable=False).names == ["base_model.model.fc1", "base_model.model.fc2"]
    assert len(ww_core.analyze(model, peft=True, trainable=True).layers) == 2
    assert ww_core.analyze(model, peft=True, trainable=False).names == []


def test_base_model_delta_of_a_peft_model(peft_model):
    import torch
    model, base = peft_model
    with torch.no_grad():
        model.base_model.model.fc2.base_layer.weight.add_(0.05)
    for b in (base, base.state_dict()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = ww_core.analyze(model, base_model=b, precision="float64", keep_evals=True)
        assert res.names == ["base_model.model.fc1", "base_model.model.fc2"]
        fc1, fc2 = res.layers                                        # fc1 unchanged: W − W₀ = 0
        assert fc1.status == "failed" or fc1.spectral_norm == 0
        np.testing.assert_allclose(fc2.evals[-1], 0.05 ** 2 * 48 * 32, rtol=1e-6)
        reasons = {s.name: s.reason for s in res.skipped}
        assert reasons["base_model.model.fc1.lora_A.default"] == "no layer of this name in base_model"


def test_quantized_base_weight_is_a_skip_with_reason():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
            self.out = torch.nn.Linear(32, 16)

    torch.manual_seed(0)
    model = peft.get_peft_model(Net().to("cpu"), peft.LoraConfig(r=8, target_modules=["fc"]))
    _randomise_b(model)
    res = ww_core.analyze(model)
    reasons = {s.name: s.reason for s in res.skipped}
    assert reasons["base_model.model.fc"].startswith("quantized weight (Params4bit, nf4")
    res = ww_core.analyze(model, peft="with_base")
    assert "base_model.model.fc.lora_BA.default" in res.names
    reasons = {s.name: s.reason for s in res.skipped}
    assert "quantized weight" in reasons["base_model.model.fc.lora_W_plus_AB.default"]
