"""Bad input at the engine level: layers get a flag or a skip reason, files a one-line error,
nothing raises anything else. (NaN/Inf and zero state-dict matrices, fp16/bf16 state dicts,
meta/lazy modules, truncated safetensors and a malicious .pt are in test_engine.py.)"""

import json
import math
import pickle

import numpy as np
import pytest

import ww_core
from ww_core.cli import main as cli_main

torch = pytest.importorskip("torch")


def linear(n_in, n_out, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Linear(n_in, n_out).to(dtype)


# ----------------------------------------------------------------------- degenerate matrices

def test_zero_and_rank_one_torch_layers_are_flagged_not_raised():
    m = torch.nn.Module()
    m.zero = torch.nn.Linear(64, 128)
    m.rank1 = torch.nn.Linear(64, 128)
    m.zconv = torch.nn.Conv2d(16, 32, 3)
    m.ok = linear(64, 128)
    with torch.no_grad():
        m.zero.weight.zero_()
        m.zconv.weight.zero_()
        u, v = torch.randn(128, 1), torch.randn(1, 64)
        m.rank1.weight.copy_(u @ v)
    res = ww_core.analyze(m)
    assert res.names == ["zero", "rank1", "zconv", "ok"]
    for name in ("zero", "zconv"):
        layer = res[name]
        assert layer.status == "failed" and math.isnan(layer.alpha)
        assert "fit-failed" in layer.flags and "rank-collapse" in layer.flags
        assert layer.matrix_rank == 0
    r1 = res["rank1"]
    assert r1.matrix_rank == 1 and "rank-collapse" in r1.flags
    assert r1.rank_collapse == pytest.approx(63 / 64)
    # default precision; a float32 λ_max is off by at most ν = 4(√64+√128)·eps32·λ_max ≈ 9e-6·λ_max
    # (ww_core/precision.py), and the reference itself is float32 arithmetic: rel 1e-4 is above both
    assert r1.spectral_norm == pytest.approx(float((u.norm() * v.norm()) ** 2), rel=1e-4)
    assert res["ok"].ok and not {"fit-failed", "rank-collapse"} & set(res["ok"].flags)
    s = res.summary()                                  # averages over the successful fits only
    assert s["num_layers"] == 4 and s["num_failed"] >= 2 and math.isfinite(s["alpha"])
    assert len(res.to_dataframe()) == 4


def test_non_finite_torch_parameters_fp16_overflow_and_nan():
    m = torch.nn.Module()
    m.nan = linear(64, 128)
    m.half_inf = linear(64, 128, dtype=torch.float16)
    m.ok = linear(64, 128, seed=1)
    with torch.no_grad():
        m.nan.weight[5, 5] = float("nan")
        m.half_inf.weight[0, 0] = 70000.0               # overflows float16: inf
    assert torch.isinf(m.half_inf.weight).any()
    res = ww_core.analyze(m, randomize=True, mp_fit=True, seed=0)
    for name in ("nan", "half_inf"):
        assert res[name].flags == ("non-finite",) and res[name].status == "failed"
    assert res["ok"].ok


# ----------------------------------------------------------------------- dtypes

def test_fp16_bf16_module_parameters_and_int8_skipped():
    ref = ww_core.analyze(linear(64, 128))["Linear"]
    for dt in (torch.float16, torch.bfloat16):
        layer = ww_core.analyze(linear(64, 128, dtype=dt))["Linear"]
        assert layer.ok and layer.alpha == pytest.approx(ref.alpha, abs=0.2)
        assert layer.log_norm == pytest.approx(ref.log_norm, abs=0.01)
    m = torch.nn.Module()
    m.q = torch.nn.Linear(64, 128)
    m.q.weight = torch.nn.Parameter(torch.randint(-127, 127, (128, 64), dtype=torch.int8),
                                    requires_grad=False)
    m.f = linear(64, 128)
    res = ww_core.analyze(m)
    assert res.names == ["f"]
    (skip,) = res.skipped
    assert skip.name == "q" and "non-float dtype" in skip.reason and "int8" in skip.reason


def test_float8_and_sparse_module_parameters():
    # float8: torch.isfinite is not implemented for float8_e4m3fn (was a NotImplementedError)
    w = linear(64, 128).weight.detach()
    for dt in (torch.float8_e4m3fn, torch.float8_e5m2):
        m = torch.nn.Linear(64, 128)
        m.weight = torch.nn.Parameter(w.to(dt), requires_grad=False)
        layer = ww_core.analyze(m, randomize=True, seed=0)["Linear"]
        ref = ww_core.analyze({"a.weight": w})["a"]           # (3-bit mantissas: alpha moves)
        assert layer.ok and layer.spectral_norm == pytest.approx(ref.spectral_norm, rel=0.1)
        bad = w.to(dt)
        bad.view(torch.uint8)[0, 0] = 0x7F                      # a NaN bit pattern in both formats
        assert ww_core.analyze({"a.weight": bad})["a"].flags == ("non-finite",)
    # sparse weights are skipped with a reason (was a NotImplementedError from the dense path)
    m = torch.nn.ModuleDict({"sp": torch.nn.Linear(64, 128), "ok": linear(64, 128)})
    m["sp"].weight = torch.nn.Parameter(w.to_sparse(), requires_grad=False)
    res = ww_core.analyze(m)
    assert res.names == ["ok"] and "layout" in res.skipped[0].reason


def test_gram_overflow_is_flagged_not_raised():
    # float64 weights above ~1e154 overflow the Gram matrix: the layer is flagged, not raised,
    # alone and when batched with a healthy layer of the same shape
    big = torch.randn(64, 32, dtype=torch.float64) * 1e200
    res = ww_core.analyze({"a.weight": big, "b.weight": torch.randn(64, 32, dtype=torch.float64)})
    assert res["a"].status == "failed" and "fit-failed" in res["a"].flags
    assert res["b"].ok


def test_float32_overflow_falls_back_to_float64():
    # squares of 1e25 overflow float32 (max 3.4e38) but not float64: "auto" re-solves in float64
    w = torch.randn(64, 32, dtype=torch.float64) * 1e25
    auto = ww_core.analyze({"a.weight": w})["a"]
    exact = ww_core.analyze({"a.weight": w}, precision="float64")["a"]
    assert auto.ok and auto.precision == "float64" and auto.alpha == exact.alpha
    assert "fit-failed" in ww_core.analyze({"a.weight": w}, precision="float32")["a"].flags


def test_frozen_parameters_are_analysed():
    model = torch.nn.Sequential(linear(64, 128), torch.nn.ReLU(), linear(128, 96, seed=1))
    ref = ww_core.analyze(model).to_records()
    for p in model.parameters():
        p.requires_grad_(False)
    assert ww_core.analyze(model).to_records() == ref
    model[0].weight.requires_grad_(True)                # partly frozen (fine-tuning a head)
    assert ww_core.analyze(model).to_records() == ref
    with torch.inference_mode():                        # inference tensors are fine too
        assert ww_core.analyze(model).to_records() == ref


# ----------------------------------------------------------------------- empty / too small

def test_empty_models_give_zero_layers():
    for source in (torch.nn.Sequential(), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.LayerNorm(8)),
                   {}, {"norm.weight": torch.ones(8), "fc.bias": torch.zeros(4)}):
        res = ww_core.analyze(source, randomize=True, mp_fit=True)
        assert len(res) == 0 and res.skipped == []
        s = res.summary()
        assert s["num_layers"] == 0 and math.isnan(s["alpha"])
        assert res.to_records() == [] and list(res.to_dataframe().columns) == list(ww_core.COLUMNS)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
def test_zero_width_layers_are_skipped():
    m = torch.nn.ModuleDict({"a": torch.nn.Linear(0, 16), "b": torch.nn.Linear(16, 0),
                             "c": torch.nn.Linear(32, 64)})
    res = ww_core.analyze(m)
    assert res.names == ["c"]
    assert {s.name for s in res.skipped} == {"a", "b"}
    assert all("too few eigenvalues (0 <" in s.reason for s in res.skipped)


def test_only_layer_below_min_evals():
    model = torch.nn.Sequential(torch.nn.Linear(5, 7))
    res = ww_core.analyze(model)
    assert len(res) == 0
    (skip,) = res.skipped
    assert (skip.name, skip.N, skip.M) == ("0", 7, 5) and "min_evals=8" in skip.reason
    assert ww_core.analyze(model, min_evals=5).names == ["0"]          # the bound is inclusive
    assert ww_core.analyze(model, min_evals=6).names == []


def test_cli_empty_and_too_small_checkpoints_exit_nonzero(tmp_path, capsys):
    st = pytest.importorskip("safetensors.torch")
    empty = tmp_path / "empty.safetensors"
    st.save_file({}, str(empty))
    norms = tmp_path / "norms.safetensors"
    st.save_file({"ln.weight": torch.ones(8), "fc.bias": torch.zeros(8)}, str(norms))
    small = tmp_path / "small.safetensors"
    st.save_file({"fc.weight": torch.ones(7, 5)}, str(small))
    for path in (empty, norms):
        assert ww_core.analyze(path).layers == []
        assert cli_main([str(path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "no analysable layer" in err and err.count("\n") == 1
    assert cli_main([str(small), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no analysable layer" in err and "fc (dense, N=7, M=5): too few eigenvalues" in err


# ----------------------------------------------------------------------- tied / shared, meta

def test_tied_and_shared_weights_are_analysed_once():
    shared = linear(64, 64)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared, linear(64, 128, seed=2))
    assert ww_core.analyze(model).names == ["0", "3"]
    emb = torch.nn.Embedding(100, 32)
    head = torch.nn.Linear(32, 100, bias=False)
    head.weight = emb.weight
    tied = torch.nn.ModuleDict({"emb": emb, "head": head})
    sd = tied.state_dict()                               # both keys, one storage
    assert set(sd) == {"emb.weight", "head.weight"}
    assert ww_core.analyze(sd).names == ["emb"]
    # equal values in different storage are two layers
    copy = {"a.weight": sd["emb.weight"].clone(), "b.weight": sd["emb.weight"]}
    assert ww_core.analyze(copy).names == ["a", "b"]


def test_meta_and_lazy_state_dict_entries_are_skipped_others_analysed():
    with torch.device("meta"):
        meta = torch.nn.Linear(64, 128)
    m = torch.nn.ModuleDict({"meta": meta, "lazy": torch.nn.LazyLinear(16), "ok": linear(64, 128)})
    res = ww_core.analyze(m)
    assert res.names == ["ok"]
    res = ww_core.analyze({"meta.weight": meta.weight, "ok.weight": m["ok"].weight})
    assert res.names == ["ok"] and "meta" in res.skipped[0].reason


# ----------------------------------------------------------------------- files

def test_folder_with_a_corrupt_shard_is_a_one_line_error(tmp_path, capsys):
    st = pytest.importorskip("safetensors.torch")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    st.save_file({"a.weight": torch.randn(64, 32)}, str(folder / "model-00001-of-00002.safetensors"))
    st.save_file({"b.weight": torch.randn(64, 32)}, str(folder / "model-00002-of-00002.safetensors"))
    assert ww_core.analyze(folder).names == ["a", "b"]
    bad = folder / "model-00002-of-00002.safetensors"
    bad.write_bytes(bad.read_bytes()[:-64])                       # truncated download
    with pytest.raises(ww_core.SourceError) as info:
        ww_core.analyze(folder)
    msg = str(info.value)
    assert "\n" not in msg and "model-00002-of-00002.safetensors" in msg and "truncated" in msg
    assert cli_main([str(folder), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model-00002-of-00002" in err
    # a header that lies about the dtype's size is caught before any read
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"x":1}' + b" " * 9)
    with pytest.raises(ww_core.SourceError, match="corrupt"):
        ww_core.analyze(folder)


class _Payload:
    """Unpickling this would create a file: proves the pickle is never executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bin_with_a_disallowed_pickle_is_refused_unexecuted(tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save({"fc.weight": torch.randn(64, 32), "x": _Payload(str(marker))},
               folder / "pytorch_model.bin")
    (tmp_path / "plain.bin").write_bytes(pickle.dumps({"fc.weight": _Payload(str(marker))}))
    for source in (folder / "pytorch_model.bin", folder, tmp_path / "plain.bin"):
        with pytest.raises(ww_core.SourceError) as info:
            ww_core.analyze(source)
        assert "\n" not in str(info.value)
        assert "weights_only" in str(info.value) or "cannot read checkpoint" in str(info.value)
        assert not marker.exists()
    assert cli_main([str(folder / "pytorch_model.bin"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused" in err
    assert not marker.exists()
    # a weights_only-loadable .bin is fine, fp16 included
    torch.save({"fc.weight": torch.randn(64, 32).half()}, tmp_path / "ok.bin")
    assert ww_core.analyze(tmp_path / "ok.bin").names == ["fc"]
    # a checkpoint that is not a state dict
    torch.save([torch.randn(4, 4)], tmp_path / "list.pt")
    with pytest.raises(ww_core.SourceError, match="not a state dict"):
        ww_core.analyze(tmp_path / "list.pt")


def test_sparse_and_long_double_state_dict_values_are_skipped():
    dense = torch.randn(64, 32)
    res = ww_core.analyze({"sp.weight": dense.to_sparse(), "ld.weight": np.ones((64, 32), np.longdouble),
                           "ok.weight": dense})
    assert res.names == ["ok"]
    reasons = {s.name: s.reason for s in res.skipped}
    assert "layout" in reasons["sp"] and "unsupported dtype" in reasons["ld"]


def test_hill_alpha_survives_a_huge_dynamic_range():
    x = np.array([1e-300, 1e-200, 1e-100, 1.0, 1e100, 1e200, 1e300])
    expected = 1 + 4 / np.sum(np.log(x[3:]) - np.log(x[3]))
    assert ww_core.hill_alpha(x) == pytest.approx(expected, rel=1e-12)


def test_review_regressions_byte_order_lazy_conv_old_pickle_and_bad_shape(tmp_path):
    import json
    import struct

    w = np.random.default_rng(0).standard_normal((200, 100))
    # big-endian arrays are analysed like native ones (torch.from_numpy refuses them)
    native = ww_core.analyze({"fc.weight": w})["fc"].alpha
    assert ww_core.analyze({"fc.weight": w.astype(">f8")})["fc"].alpha == native
    # a lazy convolution is skipped with a reason, not a crash
    res = ww_core.analyze(torch.nn.Sequential(torch.nn.LazyLinear(10), torch.nn.LazyConv2d(8, 3)))
    assert [s.type for s in res.skipped] == ["dense", "conv2d"]
    # pre-1.6 (non-zip) checkpoints cannot be memory-mapped: still readable
    old = tmp_path / "old.pt"
    torch.save({"fc.weight": torch.randn(64, 32)}, old, _use_new_zipfile_serialization=False)
    assert ww_core.analyze(old).names == ["fc"]
    # a header whose shape does not fit its byte range must not read the neighbour's bytes
    hdr = {"a.weight": {"dtype": "F32", "shape": [64, 64], "data_offsets": [0, 8192]},
           "b.weight": {"dtype": "F32", "shape": [64, 32], "data_offsets": [8192, 16384]}}
    blob = json.dumps(hdr).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(blob)) + blob + np.zeros(4096, np.float32).tobytes())
    with pytest.raises(ww_core.SourceError, match="does not fit"):
        ww_core.analyze(bad)
    # a snapshot reports the options it was taken with
    snap = ww_core.snapshot({"c.weight": torch.randn(16, 8, 3, 3)}, conv2d_norm=False)
    res = ww_core.analyze(snap)
    assert res.options["conv2d_norm"] is False and res["c"].scale == 1.0


def test_hf_checkpoint_folder_reads_its_weights_and_never_unpickles_trainer_files(tmp_path, capsys):
    """An HF Trainer checkpoint folder with ``.bin`` weights: ``training_args.bin`` and the
    optimizer, scheduler, scaler and RNG states sit beside ``pytorch_model.bin``. Only the weights
    are read; the others (here pickles that would create a file) are never opened."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint-40"
    ckpt.mkdir()
    torch.save({"fc1.weight": torch.randn(64, 32), "fc2.weight": torch.randn(48, 64)},
               ckpt / "pytorch_model.bin")
    for name in ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth",
                 "rng_state_1.pth"):
        (ckpt / name).write_bytes(pickle.dumps(_Payload(str(marker))))
    assert ww_core.analyze(ckpt).names == ["fc1", "fc2"]
    assert cli_main([str(ckpt), "--no-progress"]) == 0
    assert "fc2" in capsys.readouterr().out
    assert not marker.exists()
    # nothing but trainer files: a clear error naming what a weight file is, nothing unpickled
    (ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(ww_core.SourceError, match="no .safetensors, .bin or .pt weight files"):
        ww_core.analyze(ckpt)
    assert not marker.exists()


def test_folder_with_an_index_reads_the_listed_shards_only(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    folder = tmp_path / "model"
    folder.mkdir()
    for key, file in (("a", "model-00001-of-00002"), ("b", "model-00002-of-00002"), ("stray", "old-copy")):
        safetensors_torch.save_file({f"{key}.weight": torch.randn(64, 32)},
                                    str(folder / f"{file}.safetensors"))
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert ww_core.analyze(folder).names == ["a", "b"]
    # an index naming a shard that is not there: one clear line
    index["weight_map"]["c.weight"] = "model-00003-of-00003.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ww_core.SourceError, match="not in the folder") as info:
        ww_core.analyze(folder)
    assert "\n" not in str(info.value)
