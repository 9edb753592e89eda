"""analyze_distributed: layers sharded over 2 gloo CPU processes give every rank the same result,
equal to a single-process analyze(); the ww-analyze CLI under torchrun writes one result.

Precision: the workers run with 1 BLAS thread, this process with more, so their spectra may differ
in the last bits (float64 included: LAPACK's rounding depends on its thread count). Results are
compared bit for bit only between the ranks (each layer is solved on one rank and sent to the
others) and where the same call runs in the same process; otherwise float64 results
(``precision="float64"``) within ``F64_REL`` (see assert_close_records) and the default
(``"auto"``) within the documented float32 bound on alpha (helpers.float32_alpha_tol, from
ww_core/precision.py)."""

import csv
import os
import pickle
import subprocess

import numpy as np
import pytest

import ww_core
from helpers import REPO, SUBPROCESS_TIMEOUT, assert_alpha_float32_close, torchrun_command
from ww_core.distributed import analyze_distributed, assign_layers, layer_seed

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


def make_model():
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.emb = torch.nn.Embedding(200, 48)
    m.conv = torch.nn.Conv2d(16, 32, 3)
    m.attn = torch.nn.MultiheadAttention(48, 4)
    m.fc1 = torch.nn.Linear(48, 160)
    m.fc2 = torch.nn.Linear(160, 160)
    m.fc3 = torch.nn.Linear(160, 160)            # same shape as fc2: batched eigensolve
    m.small = torch.nn.Linear(4, 6)               # below min_evals: skipped
    m.head = torch.nn.Linear(48, 200)
    m.head.weight = m.emb.weight                  # tied: analysed once
    with torch.no_grad():                          # one heavy-tailed layer, alpha in range
        g = torch.Generator().manual_seed(1)
        m.fc2.weight.copy_(torch.sign(torch.randn(160, 160, generator=g))
                           * (torch.rand(160, 160, generator=g) ** (-1 / 2.5)) / 13)
    return m


CASES = {
    "plain": dict(precision="float64"),
    "filtered": dict(layers=["fc", "attn"], mp_fit=True, keep_evals=True, precision="float64"),
    "randomize": dict(randomize=True, seed=7, precision="float64"),
    "one-layer": dict(layers=r"^fc1$", precision="float64"),   # rank 1 has nothing to do
    "all-skipped": dict(min_evals=1000),          # nobody has anything to do
    "default": dict(randomize=True, seed=7),      # precision="auto": float32 where it agrees
}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)                      # 2 processes on a small machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model()
        got = {name: analyze_distributed(model, **opts) for name, opts in CASES.items()}
        # a failure on one rank only: every rank raises, nobody hangs in the collective
        import ww_core.distributed as wd

        real = wd._analyze_share

        def flaky(source, names, options):
            if dist.get_rank() == 1:
                raise ww_core.SourceError("shard.safetensors: corrupt\nsecond line")
            return real(source, names, options)

        wd._analyze_share = flaky
        try:
            analyze_distributed(model)
            got["error"] = None
        except Exception as exc:  # noqa: BLE001
            got["error"] = (type(exc).__name__, str(exc))
        finally:
            wd._analyze_share = real
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump(got, fh)
    finally:
        dist.destroy_process_group()


def records(res):
    """Records with NaN made comparable (NaNs unpickled on another rank are distinct objects)."""
    return [{k: ("nan" if isinstance(v, float) and v != v else v) for k, v in r.items()}
            for r in res.to_records()]


#: Relative tolerance between two float64 analyses of the same layer by different routes (another
#: thread count, another BLAS/LAPACK build, a layer alone instead of in a batch). Each eigenvalue is
#: within ~n·eps·λ_max of the exact one on any route, and the floats of a record are smooth
#: functions of them once the discrete choices (xmin, i.e. num_pl_spikes; num_traps; matrix_rank:
#: compared exactly) are made. Measured on make_model(): ≤ 1e-13 between 1 and 2 threads and
#: between torch's MKL and numpy's OpenBLAS routes (the largest, rand_distance, 8e-14). 1e-9 keeps
#: four orders of magnitude for other CPUs and is far below what a wrong layer, seed or shuffle
#: would change (≥ 1e-4).
F64_REL = 1e-9


def assert_close_records(got, ref, label):
    """Equal up to float64 rounding (F64_REL; NaN equals NaN), the non-floats exactly."""
    assert len(got) == len(ref), label
    for g, r in zip(got, ref):
        assert g.keys() == r.keys()
        for key in g:
            if isinstance(r[key], float) and isinstance(g[key], float):
                assert g[key] == pytest.approx(r[key], rel=F64_REL, abs=1e-12), (label, g["name"], key)
            else:
                assert g[key] == r[key], (label, g["name"], key)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    out = []
    for r in range(2):
        with open(tmp / f"rank{r}.pkl", "rb") as fh:
            out.append(pickle.load(fh))
    return out


def test_assign_layers_is_balanced_deterministic_and_keeps_names_together():
    names = ["a", "b", "c", "d", "b", "e"]
    costs = [100.0, 10.0, 60.0, 40.0, 10.0, 1.0]
    shares = assign_layers(names, costs, 2)
    assert sorted(i for s in shares for i in s) == list(range(6))
    assert shares == assign_layers(names, costs, 2)
    assert any({1, 4} <= set(s) for s in shares)                 # both "b" on one rank
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= 40.0
    assert assign_layers(names, costs, 8)[7] == []                # more ranks than units
    assert assign_layers([], [], 3) == [[], [], []]


def test_layer_seed_is_stable_and_name_dependent():
    assert layer_seed(0, "fc1") == layer_seed(0, "fc1")
    assert len({layer_seed(0, "fc1"), layer_seed(0, "fc2"), layer_seed(1, "fc1")}) == 3
    assert 0 <= layer_seed(2**70, "x") < 2**63


def test_single_process_falls_back_to_analyze():
    model = make_model()
    assert records(analyze_distributed(model)) == records(ww_core.analyze(model))
    res = analyze_distributed(model, randomize=True, seed=3)
    assert records(res) == records(ww_core.analyze(model, randomize=True, seed=3))   # the same call
    # per-layer seeds: each layer is what analyze() gives that layer alone with the same seed (the
    # same shuffle; solved alone rather than in a batch, so in float64 and within F64_REL)
    res = analyze_distributed(model, randomize=True, seed=3, precision="float64")
    for layer in res:
        alone = ww_core.analyze(model, layers="^" + layer.name.replace(".", r"\.") + "$",
                                randomize=True, seed=3, precision="float64")
        assert_close_records(records(alone), records(ww_core.AnalysisResult(layers=[layer])), layer.name)


def test_both_ranks_get_the_single_process_result(two_ranks):
    model = make_model()
    r0, r1 = two_ranks
    for name, opts in CASES.items():
        a, b = r0[name], r1[name]
        assert records(a) == records(b), name                    # same decisions on every rank
        assert a.skipped == b.skipped and a.options == b.options
        ref = ww_core.analyze(model, **opts)                      # randomize: per-layer seeds
        assert a.names == ref.names, name                         # model order
        if opts.get("precision") == "float64" or not len(ref):
            assert_close_records(records(a), records(ref), name)
        else:                                                     # float32 on other BLAS threads
            ref64 = ww_core.analyze(model, **dict(opts, precision="float64"))
            for got, exp in zip(a, ref64):
                assert (got.N, got.M, got.num_evals, got.status) == (exp.N, exp.M, exp.num_evals, exp.status)
                assert_alpha_float32_close(got.alpha, exp, (name, got.name))
        assert a.skipped == ref.skipped and a.options == ref.options
    assert {s.name for s in r0["plain"].skipped} == {"small"}
    assert "emb" in r0["plain"].names and "head" not in r0["plain"].names   # tied: once
    assert r0["one-layer"].names == ["fc1"] and r0["all-skipped"].names == []
    assert len(r0["all-skipped"].skipped) == 10
    for l0, l1, ref in zip(r0["filtered"], r1["filtered"], ww_core.analyze(model, **CASES["filtered"])):
        np.testing.assert_array_equal(l0.evals, l1.evals)
        np.testing.assert_allclose(l0.evals, ref.evals, rtol=F64_REL, atol=1e-12 * ref.evals.max())


def test_a_failure_on_one_rank_raises_on_every_rank(two_ranks):
    for got in two_ranks:
        kind, msg = got["error"]
        assert kind == "SourceError" and msg == "shard.safetensors: corrupt second line"


def test_torchrun_cli_writes_one_result(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    torchrun = torchrun_command(2)
    model = make_model()
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    ckpt = tmp_path / "model.safetensors"
    st.save_file(sd, str(ckpt))
    out = tmp_path / "out.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        torchrun + ["-m", "ww_core.cli", str(ckpt), "--csv", str(out), "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("summary:") == 1, proc.stdout        # only rank 0 prints
    assert proc.stdout.count(f"wrote {out}") == 1
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    # the CLI runs the default precision="auto" with 1 BLAS thread per rank: within the float32
    # bound of the float64 alphas (helpers.float32_alpha_tol)
    ref = ww_core.analyze(ckpt, precision="float64")
    assert [r["name"] for r in rows] == ref.names
    for row, layer in zip(rows, ref):
        assert_alpha_float32_close(float(row["alpha"]), layer, layer.name)
