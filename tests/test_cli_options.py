"""ww-analyze: every command-line option checked for its effect on the output.

One test (or parametrised group) per option of ``ww_core.cli.build_parser``:
PATH (.safetensors, .pt, a folder of shards, a Hugging Face model id in the local cache; several
PATHs rank models), --peft, --base-model, --layers, --types, --csv, --plots, --randomize,
--seed, --fix-fingers, --min-evals, --max-evals, --progress/--no-progress, and the torchrun path;
--json, --compare-to, --fail-on, --format, --top and --rank-by are tested in test_compare_cli.py
(WORLD_SIZE > 1, a real 2-process subprocess run). ``test_every_option_has_a_test`` fails when an
option is added to the parser without a test here.

Most runs are in-process (``ww_core.cli.main([...])``); the torchrun run is a subprocess.
"""

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ww_core
from helpers import SUBPROCESS_TIMEOUT
from ww_core.cli import build_parser, main
from ww_core.result import COLUMNS

pytestmark = pytest.mark.core
st = pytest.importorskip("safetensors.numpy")

REPO = Path(__file__).resolve().parents[1]

# name -> (type, number of eigenvalues) of the fixture's layers; "tiny" (20 x 6) has fewer than
# the default min_evals=8 eigenvalues and is skipped by default
LAYERS = {"enc.fc1": ("dense", 80), "enc.fc2": ("dense", 100), "conv": ("conv2d", 72),
          "tok_embed": ("embedding", 40)}
# safetensors stores tensors sorted by name: the file's (and so the table's) layer order
ORDER = ["conv", "enc.fc1", "enc.fc2", "tok_embed"]


def _state_dict():
    rng = np.random.default_rng(0)

    def heavy(shape, mu=2.5):
        signs = rng.choice([-1.0, 1.0], size=shape)
        return (signs * (rng.pareto(mu, size=shape) + 1) / np.sqrt(shape[0])).astype(np.float32)

    w = heavy((200, 100))
    u, v = rng.standard_normal((200, 3)), rng.standard_normal((3, 100))
    spikes = (u @ np.diag([30.0, 25.0, 20.0]) @ v / np.sqrt(200 * 100) * 5).astype(np.float32)
    return {
        "enc.fc1.weight": (rng.standard_normal((160, 80)) / np.sqrt(160)).astype(np.float32),
        "enc.fc1.bias": np.zeros(160, np.float32),
        "enc.fc2.weight": w + spikes,
        "conv.weight": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),   # 9 slices 16x8
        "tok_embed.weight": heavy((300, 40)),
        "tiny.weight": rng.standard_normal((20, 6)).astype(np.float32),
        "norm.weight": np.ones(40, np.float32),
    }


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.safetensors"
    st.save_file(_state_dict(), str(path))
    return path


def run(argv, capsys):
    """(exit code, stdout, stderr) of one in-process run."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def table_rows(stdout):
    """The first cell (layer name) of every table row, in printed order."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("name"))
    rows = []
    for line in lines[header + 2:]:
        if not line.strip():
            break
        rows.append(line.split()[0])
    return rows


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def as_float(text):
    return float(text) if text not in ("", None) else math.nan


def analyse_csv(model_path, tmp_path, capsys, *extra, name="out.csv"):
    out = tmp_path / name
    rc, stdout, err = run([model_path, "--no-progress", "--csv", out, *extra], capsys)
    assert rc == 0, err
    fields, rows = read_csv(out)
    assert fields == list(COLUMNS)
    return {r["name"]: r for r in rows}, stdout, err


# --------------------------------------------------------------------------- the option inventory
TESTED_OPTIONS = {"path", "layers", "types", "csv", "plots", "randomize", "seed", "fix_fingers",
                  "min_evals", "max_evals", "progress", "peft", "base_model", "json", "compare_to",
                  "fail_on", "format", "top", "rank_by"}


def test_every_option_has_a_test():
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests == TESTED_OPTIONS, (
        f"ww-analyze options without a test in {__file__}: {sorted(dests - TESTED_OPTIONS)}; "
        f"tested options that no longer exist: {sorted(TESTED_OPTIONS - dests)}")


# --------------------------------------------------------------------------- PATH
def test_default_run_table_and_skip_reason(model_path, capsys):
    rc, out, err = run([model_path, "--no-progress"], capsys)
    assert rc == 0 and err == ""
    assert table_rows(out) == ORDER                       # biases, norms and "tiny" are not rows
    assert "summary: 4 layers analysed" in out and "1 skipped" in out
    assert "tiny: too few eigenvalues (6 < min_evals=8)" in out


def test_pt_file_and_shard_folder_give_the_same_rows(model_path, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    sd = _state_dict()
    ref, _, _ = analyse_csv(model_path, tmp_path, capsys, name="ref.csv")
    pt = tmp_path / "model.pt"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, str(pt))
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = list(sd)
    st.save_file({k: sd[k] for k in keys[:3]}, str(shards / "model-00001-of-00002.safetensors"))
    st.save_file({k: sd[k] for k in keys[3:]}, str(shards / "model-00002-of-00002.safetensors"))
    for source, name in ((pt, "pt.csv"), (shards, "shards.csv")):
        out = tmp_path / name
        rc, stdout, err = run([source, "--no-progress", "--csv", out], capsys)
        assert rc == 0, err
        _, rows = read_csv(out)
        assert sorted(r["name"] for r in rows) == ORDER, source     # .pt keeps insertion order
        for r in rows:
            assert (r["type"], int(r["num_evals"])) == LAYERS[r["name"]]
            assert as_float(r["alpha"]) == pytest.approx(as_float(ref[r["name"]]["alpha"]),
                                                         rel=1e-6, nan_ok=True)


# --------------------------------------------------------------------------- --layers
@pytest.mark.parametrize("args, expect", [
    (["--layers", r"^enc\."], ["enc.fc1", "enc.fc2"]),
    (["--layers", "fc2"], ["enc.fc2"]),
    (["--layers", "conv", "--layers", "embed"], ["conv", "tok_embed"]),     # repeatable: union
    (["--layers", "fc1", "--layers", "fc1"], ["enc.fc1"]),                  # no duplicate row
])
def test_layers_restricts_rows(model_path, tmp_path, capsys, args, expect):
    rows, stdout, _ = analyse_csv(model_path, tmp_path, capsys, *args)
    assert list(rows) == expect
    assert table_rows(stdout) == expect


def test_layers_matching_nothing_or_bad_regex(model_path, capsys):
    rc, out, err = run([model_path, "--no-progress", "--layers", "nothing-here"], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("ww-analyze: error: no analysable layer")
    rc, _, err = run([model_path, "--no-progress", "--layers", "(unclosed"], capsys)
    assert rc == 2 and "invalid --layers regex" in err


# --------------------------------------------------------------------------- --types
@pytest.mark.parametrize("args, expect", [
    (["--types", "dense"], ["enc.fc1", "enc.fc2"]),
    (["--types", "conv2d"], ["conv"]),
    (["--types", "embedding"], ["tok_embed"]),
    (["--types", "conv2d", "embedding"], ["conv", "tok_embed"]),            # space-separated
    (["--types", "dense,EMBEDDING"], ["enc.fc1", "enc.fc2", "tok_embed"]),  # comma, any case
    (["--types", "dense", "--layers", "fc2"], ["enc.fc2"]),                 # both filters apply
])
def test_types_filters_rows(model_path, tmp_path, capsys, args, expect):
    rows, _, _ = analyse_csv(model_path, tmp_path, capsys, *args)
    assert list(rows) == expect
    assert {r["type"] for r in rows.values()} <= {LAYERS[n][0] for n in expect}


def test_types_errors(model_path, capsys):
    rc, _, err = run([model_path, "--no-progress", "--types", "conv3d"], capsys)
    assert rc == 2 and "no analysable layer" in err                         # valid, matches none
    rc, _, err = run([model_path, "--no-progress", "--types", "lstm"], capsys)
    assert rc == 2 and "unknown layer type 'lstm'" in err


# --------------------------------------------------------------------------- --min-evals / --max-evals
def test_min_evals_skips_small_layers_with_reason(model_path, tmp_path, capsys):
    rows, out, _ = analyse_csv(model_path, tmp_path, capsys, "--min-evals", "5")
    assert list(rows) == ["conv", "enc.fc1", "enc.fc2", "tiny", "tok_embed"]  # 6 >= 5: analysed
    assert int(rows["tiny"]["num_evals"]) == 6
    rows, out, _ = analyse_csv(model_path, tmp_path, capsys, "--min-evals", "75")
    assert list(rows) == ["enc.fc1", "enc.fc2"]                      # 80, 100 eigenvalues kept
    assert "3 skipped" in out
    assert "tok_embed: too few eigenvalues (40 < min_evals=75)" in out
    assert "conv: too few eigenvalues (72 < min_evals=75)" in out
    rc, out, err = run([model_path, "--no-progress", "--min-evals", "1000"], capsys)
    assert rc == 2 and out == ""
    for name in ORDER:                                                # every skip is explained
        assert f"  {name} (" in err
    assert "min_evals=1000" in err


def test_max_evals_skips_large_layers_with_reason(model_path, tmp_path, capsys):
    rows, out, _ = analyse_csv(model_path, tmp_path, capsys, "--max-evals", "79")
    assert list(rows) == ["conv", "tok_embed"]                         # 72 and 40 <= 79
    assert "enc.fc1: " in out and "enc.fc2: " in out and "max_evals=79" in out
    rows, _, _ = analyse_csv(model_path, tmp_path, capsys, "--max-evals", "80", "--min-evals", "41")
    assert list(rows) == ["conv", "enc.fc1"]                           # both bounds inclusive


@pytest.mark.parametrize("opt", ["--min-evals", "--max-evals"])
@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_eval_bounds_reject_bad_values(model_path, capsys, opt, value):
    rc, out, err = run([model_path, "--no-progress", opt, value], capsys)
    assert rc == 2 and out == ""
    assert err.startswith("ww-analyze: error:")


def test_max_evals_below_min_evals_is_a_bad_argument(model_path, capsys):
    rc, out, err = run([model_path, "--no-progress", "--max-evals", "10", "--min-evals", "20"],
                       capsys)
    assert out == "" and "max_evals (10) must be >= min_evals (20)" in err
    assert rc == 2


def test_types_without_any_type_is_rejected(model_path, capsys):
    rc, _, err = run([model_path, "--no-progress", "--types", ","], capsys)
    assert rc == 2 and "error" in err


# --------------------------------------------------------------------------- --csv
def test_csv_holds_every_column_of_the_engine_result(model_path, tmp_path, capsys):
    rows, stdout, _ = analyse_csv(model_path, tmp_path, capsys, "--randomize", "--seed", "0",
                                  "--fix-fingers", name="sub/dir/all.csv")   # folders are made
    assert f"wrote {tmp_path / 'sub/dir/all.csv'}" in stdout
    ref = ww_core.analyze(str(model_path), randomize=True, seed=0, fix_fingers="clip_xmax")
    assert list(rows) == ref.names
    for rec in ref.to_records():
        row = rows[rec["name"]]
        assert set(row) == set(COLUMNS)
        for col in COLUMNS:
            want = rec[col]
            if isinstance(want, float):
                assert as_float(row[col]) == pytest.approx(want, rel=1e-9, nan_ok=True), col
            else:
                assert row[col] == str(want), col


def test_csv_unwritable_path_is_an_error(model_path, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = run([model_path, "--no-progress", "--csv", blocker / "out.csv"], capsys)
    assert rc == 1
    assert err.strip().startswith("ww-analyze: error: cannot write") and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- --randomize / --seed
RAND_COLUMNS = ("rand_distance", "max_rand_eval", "num_traps")


def test_randomize_adds_rand_columns_and_seed_reproduces(model_path, tmp_path, capsys):
    # --fix-fingers in every run: float64 spectra, so alphas compare to rounding on any CPU
    plain, _, _ = analyse_csv(model_path, tmp_path, capsys, "--fix-fingers", name="plain.csv")
    seeded = [analyse_csv(model_path, tmp_path, capsys, "--fix-fingers", "--randomize", "--seed",
                          str(s), name=f"r{i}.csv")[0] for i, s in enumerate((1, 1, 2))]
    for name in ORDER:
        for col in RAND_COLUMNS:
            assert math.isnan(as_float(plain[name][col])), (name, col)   # absent without it
            assert math.isfinite(as_float(seeded[0][name][col])), (name, col)
            assert seeded[0][name][col] == seeded[1][name][col], (name, col)  # same seed
        # the layer's own fit is not changed by --randomize
        assert as_float(seeded[0][name]["alpha"]) == pytest.approx(as_float(plain[name]["alpha"]),
                                                                   rel=1e-9)
    differs = [n for n in ORDER if seeded[0][n]["rand_distance"] != seeded[2][n]["rand_distance"]]
    assert differs, "a different --seed gave identical randomised spectra"


def test_seed_alone_changes_nothing(model_path, tmp_path, capsys):
    plain, _, _ = analyse_csv(model_path, tmp_path, capsys, name="a.csv")
    seeded, _, _ = analyse_csv(model_path, tmp_path, capsys, "--seed", "5", name="b.csv")
    assert seeded == plain
    rc, _, err = run([model_path, "--no-progress", "--seed", "abc"], capsys)
    assert rc == 2 and "--seed" in err


# --------------------------------------------------------------------------- --fix-fingers
def test_fix_fingers_refits_without_outliers(model_path, tmp_path, capsys):
    plain, _, _ = analyse_csv(model_path, tmp_path, capsys, name="plain.csv")
    fixed, _, _ = analyse_csv(model_path, tmp_path, capsys, "--fix-fingers", name="ff.csv")
    assert list(fixed) == list(plain)
    ref = ww_core.analyze(str(model_path), precision="float64")     # no clipping
    for name in ORDER:
        assert int(plain[name]["num_fingers"]) == 0
        assert math.isnan(as_float(plain[name]["raw_alpha"]))        # no refit without the option
        raw = as_float(fixed[name]["raw_alpha"])
        assert math.isfinite(raw)                                    # the unclipped fit is kept
        assert raw == pytest.approx(ref[name].alpha, rel=1e-9)      # (--fix-fingers: float64)
        if int(fixed[name]["num_fingers"]) == 0:
            assert as_float(fixed[name]["alpha"]) == pytest.approx(raw)
    clipped = {n: int(fixed[n]["num_fingers"]) for n in ORDER if int(fixed[n]["num_fingers"]) > 0}
    assert clipped, "no layer had fingers clipped"
    for name in clipped:
        assert as_float(fixed[name]["alpha"]) != pytest.approx(as_float(fixed[name]["raw_alpha"]))


# --------------------------------------------------------------------------- --plots
def test_plots_one_esd_per_analysed_layer(model_path, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    rc, out, err = run([model_path, "--no-progress", "--plots", plots, "--layers", "enc|conv"],
                       capsys)
    assert rc == 0, err
    names = sorted(p.name for p in plots.iterdir())
    assert names == sorted(["alpha_by_layer.png", "esd_enc.fc1.png", "esd_enc.fc2.png",
                            "esd_conv.png"])
    assert f"wrote {len(names)} plots to {plots}" in out
    for p in plots.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000


def test_no_plots_without_the_option(model_path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run([model_path, "--no-progress"], capsys)
    assert rc == 0 and "plots" not in out
    assert list(tmp_path.iterdir()) == []                             # nothing written anywhere


# --------------------------------------------------------------------------- --progress
def test_progress_flags(model_path, capsys):
    rc, out_on, err_on = run([model_path, "--progress"], capsys)
    assert rc == 0 and "ww analyze" in err_on                        # the bar goes to stderr
    rc, out_off, err_off = run([model_path, "--no-progress"], capsys)
    assert rc == 0 and err_off == ""
    rc, out_default, err_default = run([model_path], capsys)        # stderr is not a terminal
    assert rc == 0 and err_default == ""
    assert table_rows(out_on) == table_rows(out_off) == table_rows(out_default) == ORDER
    assert "ww analyze" not in out_on                                # never in the table output
    rc, _, err = run([model_path, "--progress", "--no-progress"], capsys)
    assert rc == 2 and "not allowed with argument" in err


# --------------------------------------------------------------------------- --peft / --base-model
def _lora_file(tmp_path, adapter=".default"):
    rng = np.random.default_rng(1)
    sd = {"enc.fc.base_layer.weight": rng.standard_normal((48, 40)).astype(np.float32),
          f"enc.fc.lora_A{adapter}.weight": rng.standard_normal((8, 40)).astype(np.float32),
          f"enc.fc.lora_B{adapter}.weight": rng.standard_normal((48, 8)).astype(np.float32),
          "head.weight": rng.standard_normal((20, 48)).astype(np.float32)}
    path = tmp_path / "lora.safetensors"
    st.save_file(sd, str(path))
    return path


def test_peft_option(tmp_path, capsys):
    path = _lora_file(tmp_path)
    rc, out, err = run([path, "--no-progress"], capsys)
    assert rc == 0 and "enc.fc.lora_A.default" in table_rows(out)      # plain: A and B on their own
    rc, out, err = run([path, "--no-progress", "--peft"], capsys)
    assert rc == 0 and table_rows(out) == ["enc.fc.lora_BA.default"]
    rc, out2, err = run([path, "--no-progress", "--peft", "peft_only"], capsys)
    assert rc == 0 and table_rows(out2) == table_rows(out)
    rc, out, err = run([path, "--no-progress", "--peft", "with_base"], capsys)
    assert rc == 0 and table_rows(out) == ["enc.fc.base_layer", "enc.fc.lora_W_plus_AB.default",
                                           "enc.fc.lora_BA.default", "head"]
    rc, out, err = run([path, "--peft", "everything"], capsys)
    assert rc == 2 and "invalid choice" in err and len(err.splitlines()) == 1


def test_base_model_option(model_path, tmp_path, capsys):
    sd = _state_dict()
    tuned = {k: v + np.float32(0.01) if k == "enc.fc2.weight" else v for k, v in sd.items()}
    del tuned["conv.weight"]
    tuned_path = tmp_path / "tuned.safetensors"
    st.save_file(tuned, str(tuned_path))
    rows, out, _ = analyse_csv(tuned_path, tmp_path, capsys, "--base-model", model_path)
    assert float(rows["enc.fc2"]["spectral_norm"]) == pytest.approx(0.01 ** 2 * 200 * 100, rel=1e-3)
    assert float(rows["enc.fc1"]["spectral_norm"]) == 0.0               # unchanged: W − W₀ = 0
    rc, out, err = run([tuned_path, "--no-progress", "--base-model", tmp_path / "missing.pt"], capsys)
    assert rc == 1 and err.startswith("ww-analyze: error: no such file or directory") and err.count("\n") == 1


def test_path_and_base_model_as_hugging_face_ids(model_path, tmp_path, capsys, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    repo = tmp_path / "hub" / "models--acme--tiny-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    shutil.copy(model_path, snap / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    rc, out, err = run(["acme/tiny-model", "--no-progress"], capsys)
    assert rc == 0 and table_rows(out) == ORDER, err
    rc, out, err = run([model_path, "--no-progress", "--base-model", "acme/tiny-model"], capsys)
    assert rc == 0 and "enc.fc1" in table_rows(out)
    for argv in (["acme/not-cached"], [model_path, "--base-model", "acme/not-cached"]):
        rc, out, err = run(argv + ["--no-progress"], capsys)
        assert rc == 1 and len(err.splitlines()) == 1
        assert ("acme/not-cached: no such file or directory, and not a model in the local "
                "Hugging Face cache") in err


# --------------------------------------------------------------------------- torchrun (subprocess)
@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(model_path, tmp_path, capsys):
    pytest.importorskip("torch")
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    exe = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not os.path.exists(exe):
        pytest.skip("torchrun not installed")
    # --fix-fingers: float64 spectra, so the two runs agree to rounding on any CPU
    single, _, _ = analyse_csv(model_path, tmp_path, capsys, "--randomize", "--seed", "3",
                               "--fix-fingers", name="single.csv")
    out_csv = tmp_path / "dist.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [exe, "--standalone", "--nproc-per-node", "2", "-m", "ww_core.cli", str(model_path),
         "--randomize", "--seed", "3", "--fix-fingers", "--csv", str(out_csv), "--no-progress"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert proc.stdout.count("summary: 4 layers analysed") == 1      # only rank 0 prints
    assert proc.stdout.count(f"wrote {out_csv}") == 1
    fields, rows = read_csv(out_csv)
    assert fields == list(COLUMNS)
    assert [r["name"] for r in rows] == ORDER                         # model order, every layer
    for r in rows:
        for col in ("alpha", "alpha_hill", "D", "log_norm", "rand_distance"):
            assert as_float(r[col]) == pytest.approx(as_float(single[r["name"]][col]),
                                                     rel=1e-6, abs=1e-9, nan_ok=True), col

