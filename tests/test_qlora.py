"""QLoRA on the CPU: PEFT LoRA adapters on real bitsandbytes 4-bit (NF4 / FP4) base layers.

``ww_core.sources.quantized_reason``: a quantized weight is never analysed as if it were the layer
(its storage is packed uint8); it is a skip whose reason reads ``quantized weight (<class>,
<quant type>, <dtype>)``, and the LoRA adapters on top are analysed as usual (README "Partly
frozen and PEFT models": the update ``B·A`` of each adapter, ``<module>.lora_BA.<adapter>``).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

import ww_core  # noqa: E402

BASE = "base_model.model."


class Net(torch.nn.Module):
    """Two 4-bit layers (NF4 and FP4) and an ordinary head."""

    def __init__(self):
        super().__init__()
        self.fc1 = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.float32, quant_type="nf4")
        self.fc2 = bnb.nn.Linear4bit(48, 40, compute_dtype=torch.float32, quant_type="fp4")
        self.head = torch.nn.Linear(40, 16)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def qlora():
    """A LoRA (r=8) model on 4-bit layers, quantized on the CPU and trained for a few steps, so
    that the adapters' ``lora_B`` (zero at PEFT's init) are non-zero."""
    torch.manual_seed(0)
    base = Net().to("cpu")                                       # .to() quantizes the weights
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["fc1", "fc2"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=g), torch.randint(0, 16, (64,), generator=g)
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, frozen


def _adapter_factors(model, name):
    mod = model.get_submodule(BASE + name)
    a = mod.lora_A["default"].weight.detach().double().numpy()
    b = mod.lora_B["default"].weight.detach().double().numpy()
    return b, a


def test_the_base_layers_are_really_4bit_and_only_the_adapters_trained(qlora):
    model, frozen = qlora
    for name, quant_type in (("fc1", "nf4"), ("fc2", "fp4")):
        w = model.get_submodule(BASE + name).base_layer.weight
        assert type(w).__name__ == "Params4bit" and w.bnb_quantized and w.quant_type == quant_type
        assert w.dtype == torch.uint8 and not w.requires_grad
        b, _ = _adapter_factors(model, name)
        assert np.abs(b).max() > 0, "lora_B still zero: the adapters did not train"
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


def test_analyze_skips_the_quantized_base_layers_with_the_reason(qlora):
    model, _ = qlora
    res = ww_core.analyze(model)
    reasons = {s.name: s.reason for s in res.skipped}
    assert reasons == {BASE + "fc1": "quantized weight (Params4bit, nf4, uint8)",
                       BASE + "fc2": "quantized weight (Params4bit, fp4, uint8)"}
    assert not any(n in (BASE + "fc1", BASE + "fc2") or "base_layer" in n for n in res.names)
    assert BASE + "head" in res.names


def test_peft_analyses_the_adapter_updates_on_top_of_the_4bit_base(qlora):
    model, _ = qlora
    res = ww_core.analyze(model, peft=True, precision="float64", keep_evals=True)
    assert res.names == [BASE + "fc1.lora_BA.default", BASE + "fc2.lora_BA.default"]
    for name, (n, m) in (("fc1", (64, 48)), ("fc2", (48, 40))):
        layer = res[BASE + name + ".lora_BA.default"]
        assert (layer.N, layer.M, layer.num_evals) == (n, m, 8)
        b, a = _adapter_factors(model, name)
        top = np.sort(np.linalg.svd(b @ a, compute_uv=False)[:8] ** 2)
        np.testing.assert_allclose(layer.evals, top, rtol=1e-8)


def test_with_base_skips_w_plus_ab_of_a_4bit_layer_and_keeps_the_adapter(qlora):
    model, _ = qlora
    res = ww_core.analyze(model, peft="with_base")
    assert res.names == [BASE + "fc1.lora_BA.default", BASE + "fc2.lora_BA.default", BASE + "head"]
    reasons = {s.name: s.reason for s in res.skipped}
    assert reasons[BASE + "fc1"] == "quantized weight (Params4bit, nf4, uint8)"
    assert reasons[BASE + "fc1.lora_W_plus_AB.default"] == \
        "base weight: quantized weight (Params4bit, nf4, uint8)"
    assert reasons[BASE + "fc2.lora_W_plus_AB.default"] == \
        "base weight: quantized weight (Params4bit, fp4, uint8)"


def test_the_callback_engine_analyses_the_adapters_of_a_qlora_model(qlora):
    """The controller every callback drives: adapters' B·A at each analysis, the frozen head as a
    baseline at the first one only (analyze_frozen="once"), never the quantized base."""
    from ww_callbacks import MEMORY_ONLY, WeightWatcherController

    model, _ = qlora
    lines = []
    with WeightWatcherController(every_n_steps=1, start_fraction=0.0, output_dir=MEMORY_ONLY, trackers=None,
                                 async_analysis=False, strict=True, log_fn=lines.append) as ww:
        ww.configure(total_steps=2)
        ww.maybe_run(model, step=1, epoch=0)
        ww.maybe_run(model, step=2, epoch=0)
    by_step = {}
    for r in ww.history.rows:
        by_step.setdefault(r["step"], []).append(r["name"])
    adapters = [BASE + "fc1.lora_BA.default", BASE + "fc2.lora_BA.default"]
    assert by_step == {1: adapters + [BASE + "head"], 2: adapters}
    assert len([line for line in lines if line.startswith("ww step")]) == 2


def test_an_8bit_base_layer_is_a_quantized_skip_too():
    torch.manual_seed(0)
    model = torch.nn.Sequential(bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False), torch.nn.ReLU(),
                                torch.nn.Linear(32, 16)).to("cpu")
    assert model[0].weight.dtype == torch.int8
    res = ww_core.analyze(model)
    assert res.names == ["2"]
    (skip,) = res.skipped
    assert skip.name == "0" and skip.reason.startswith("quantized weight (Int8Params")
