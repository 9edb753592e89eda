"""The history files when writing fails: a read-only run folder, a full disk, a file-size limit.

Real file systems, no mocks: a tiny tmpfs mounted for the test (root may mount, as in CI; a
read-only mount stops root too, where ``chmod`` would not), a run folder whose parent is a
regular file, and ``RLIMIT_FSIZE`` in a subprocess (the kernel's short write, then ``EFBIG``).
Each test checks that training finishes, the failure is reported once, ``history.jsonl`` holds
only whole lines with every row that could be written, and that once writing works again (in the
same fit, or in a fit resumed from a checkpoint) the rows kept in memory land with no gap and no
duplicate.
"""

import csv
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from ww_callbacks.controller import WeightWatcherController
from ww_callbacks.history import History, HistoryWarning, read_jsonl

pytestmark = pytest.mark.slow   # real fits on tmpfs mounts and a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPTH = 31                                   # Linear layers of the Lightning model
NAMES = [f"net.{i}" for i in range(DEPTH)]


# ---------------------------------------------------------------------- real file systems
def _run(*cmd):
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")


@pytest.fixture
def tmpfs(tmp_path):
    """``make(size)`` mounts a tmpfs of that size under ``tmp_path``; unmounted afterwards."""
    mounted = []

    def make(size):
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        error = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
        if error is not None:
            pytest.skip(f"a tmpfs cannot be mounted here ({error}); CI runs as root, where it can "
                        "(the file-size-limit test covers a full disk without a mount)")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        if _run("umount", str(path)) is not None:
            _run("umount", "-l", str(path))


def remount(path, options):
    error = _run("mount", "-o", f"remount,{options}", str(path))
    assert error is None, error


# ---------------------------------------------------------------------- strict readers
def whole_lines(path):
    """``history.jsonl`` read strictly: every line one whole JSON object, the last one ended."""
    with open(path, "rb") as fh:
        data = fh.read()
    assert not data or data.endswith(b"\n"), data[-80:]
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    assert all(isinstance(r, dict) for r in rows)
    return rows


def whole_csv_rows(path):
    """``history.csv`` read strictly: ended, and no row with a missing or an extra field."""
    with open(path, encoding="utf-8", newline="") as fh:
        text = fh.read()
    assert text.endswith("\r\n"), text[-80:]
    rows = list(csv.DictReader(io.StringIO(text)))
    assert all(None not in r and None not in r.values() for r in rows)
    return [(int(r["step"]), r["name"]) for r in rows]


def keys(rows, *fields):
    return [tuple(r[f] for f in fields) for r in rows]


def reports(lines):
    return [line for line in lines if "training continues" in line]


def history_reports(lines):
    return [line for line in reports(lines) if line.startswith("ww: writing the history files:")]


def assert_each_kind_once(lines):
    kinds = [line.split(":")[1] for line in reports(lines)]
    assert len(kinds) == len(set(kinds)), lines


# ---------------------------------------------------------------------- a real Lightning fit
def fit(tmp_path, out, epochs, lines, extra=(), ckpt_path=None):
    """A 31-layer model, 2 optimizer steps an epoch, analysed at every epoch end; the run
    folder ``out`` (history and local report), checkpoints under ``tmp_path / "ckpt"``."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("lightning")
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ww_callbacks.lightning import WeightWatcherCallback

    class Deep(LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(DEPTH)])

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(16, 16, generator=torch.Generator().manual_seed(0))),
        batch_size=8)
    cb = WeightWatcherCallback(start_fraction=0.0, every_n_epochs=1, output_dir=str(out),
                               trackers=["local"], log_fn=lines.append, async_analysis=False)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path),
                      callbacks=[cb, ckpt, *extra])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Deep(), data, ckpt_path=ckpt_path)
    return trainer, cb, [str(w.message) for w in caught if issubclass(w.category, HistoryWarning)]


def unblock_at(epoch, unblock, out):
    """A callback that makes the run folder writable at the start of ``epoch``, noting whether
    anything had reached it before."""
    from lightning.pytorch import Callback

    class Unblock(Callback):
        written_before = None

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == epoch:
                Unblock.written_before = os.path.exists(os.path.join(out, "history.jsonl"))
                unblock()

    return Unblock()


def test_full_disk_keeps_whole_rows_and_a_resume_fills_the_gap(tmp_path, tmpfs):
    disk = tmpfs("96k")
    out = disk / "ww"
    lines = []
    trainer, cb, warned = fit(tmp_path, out, epochs=8, lines=lines)

    steps = [2, 4, 6, 8, 10, 12, 14, 16]
    assert trainer.global_step == 16 and trainer.current_epoch == 8       # training finished
    assert cb.history.steps == steps and len(cb.history.rows) == 8 * DEPTH  # all in memory
    (report,) = history_reports(lines)                                     # reported once
    assert "No space left on device" in report and "kept in memory" in report
    assert_each_kind_once(lines)                # the local report fails too: once, on its own
    assert len(warned) == 1 and "No space left on device" in warned[0]

    memory = keys(cb.history.rows, "step", "name", "time")
    on_disk = whole_lines(out / "history.jsonl")                           # no torn line
    written = len(on_disk) // DEPTH
    assert 1 <= written < 8 and len(on_disk) == written * DEPTH
    assert keys(on_disk, "step", "name", "time") == memory[:len(on_disk)]  # whole analyses, in order
    in_csv = whole_csv_rows(out / "history.csv")
    assert in_csv == [m[:2] for m in memory[:len(in_csv)]] and len(in_csv) % DEPTH == 0
    # every row that could be written is there: the next analysis does not fit in what is left
    fs = os.statvfs(disk)
    room = fs.f_bavail * fs.f_frsize + (-os.path.getsize(out / "history.jsonl")) % fs.f_frsize
    following = "".join(History._json_line(r) for r in cb.history.rows_at(steps[written]))
    assert room < len(following.encode())

    # the disk is freed, the fit resumes from its last checkpoint (on another disk)
    remount(disk, "size=8m")
    lines2 = []
    trainer2, cb2, warned2 = fit(tmp_path, out, epochs=10, lines=lines2,
                                 ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer2.global_step == 20 and not reports(lines2) and not warned2
    assert not [line for line in lines2 if "missing" in line]
    expected = [(s, n) for s in steps + [18, 20] for n in NAMES]
    on_disk = whole_lines(out / "history.jsonl")
    assert keys(on_disk, "step", "name") == expected                       # no gap, no duplicate
    assert keys(on_disk, "step", "name", "time")[:8 * DEPTH] == memory     # the first fit's rows
    assert keys(cb2.history.rows, "step", "name") == expected
    assert whole_csv_rows(out / "history.csv") == expected


@pytest.mark.parametrize("mechanism", ["read-only mount", "parent is a file"])
def test_unwritable_folder_rows_land_once_it_is_writable(tmp_path, tmpfs, mechanism):
    pytest.importorskip("lightning")
    if mechanism == "read-only mount":
        disk = tmpfs("4m")
        remount(disk, "ro")                     # EROFS, for root too
        out, error = disk / "ww", "Read-only file system"

        def unblock():
            remount(disk, "rw")
    else:
        blocked = tmp_path / "blocked"
        blocked.write_text("a file where the run folder's parent should be")
        out, error = blocked / "ww", "Not a directory"
        unblock = blocked.unlink
    lines = []
    unblocker = unblock_at(3, unblock, str(out))
    trainer, cb, warned = fit(tmp_path, out, epochs=6, lines=lines, extra=[unblocker])

    assert trainer.global_step == 12 and cb.history.steps == [2, 4, 6, 8, 10, 12]
    assert unblocker.written_before is False            # 3 analyses could not be written
    (report,) = history_reports(lines)
    assert error in report and "kept in memory" in report
    assert_each_kind_once(lines)
    assert len(warned) == 1 and error in warned[0]
    # from the 4th analysis on, the 3 kept in memory were written first: every row once, in order
    on_disk = whole_lines(out / "history.jsonl")
    assert keys(on_disk, "step", "name", "time") == keys(cb.history.rows, "step", "name", "time")
    assert whole_csv_rows(out / "history.csv") == keys(cb.history.rows, "step", "name")
    assert not [name for name in os.listdir(out) if ".tmp" in name]


def fill(path):
    """Write zeros to ``path`` until the disk is full; returns the file's size."""
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == 28, exc
    return os.path.getsize(path)


@pytest.mark.core
def test_partly_freed_disk_takes_as_many_whole_analyses_as_fit(tmp_path, tmpfs):
    import numpy as np

    disk = tmpfs("256k")
    out = disk / "ww"
    rng = np.random.default_rng(0)
    weights = {f"fc{i}.weight": rng.standard_normal((64, 32)).astype(np.float32) for i in range(16)}
    lines = []
    ctl = WeightWatcherController(start_fraction=0.0, every_n_steps=1, output_dir=str(out), trackers=None,
                                  log_fn=lines.append, async_analysis=False)
    ctl.configure(total_steps=10, current_step=0)
    filler = disk / "filler"
    size = fill(filler)                                                # the disk is full
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2, 3):
            assert ctl.run(weights, step=step, epoch=0) is not None   # analysed, not written
        assert whole_lines(out / "history.jsonl") == []
        one = len("".join(History._json_line(r) for r in ctl.history.rows_at(1)).encode())
        os.truncate(filler, size - int(2.5 * one))                     # room for about 2 of 4
        ctl.run(weights, step=4, epoch=0)
        on_disk = whole_lines(out / "history.jsonl")
        written = len(on_disk) // 16
        assert 1 <= written < 4 and len(on_disk) == written * 16
        assert keys(on_disk, "step", "name", "time") == keys(ctl.history.rows, "step", "name", "time")[
            :len(on_disk)]
        fs = os.statvfs(disk)
        room = fs.f_bavail * fs.f_frsize + (-os.path.getsize(out / "history.jsonl")) % fs.f_frsize
        following = "".join(History._json_line(r) for r in ctl.history.rows_at(written + 1))
        assert room < len(following.encode())                         # the next one did not fit
        os.remove(filler)
        ctl.run(weights, step=5, epoch=0)
    expected = keys(ctl.history.rows, "step", "name", "time")
    assert [k[0] for k in expected[::16]] == [1, 2, 3, 4, 5]
    assert keys(whole_lines(out / "history.jsonl"), "step", "name", "time") == expected
    assert whole_csv_rows(out / "history.csv") == [k[:2] for k in expected]
    assert len(history_reports(lines)) == 1 and len(reports(lines)) == 1
    assert len([w for w in caught if w.category is HistoryWarning]) == 1


# ---------------------------------------------------------------------- without a mount
LIMITED_RUN = textwrap.dedent("""
    import json, os, resource, shutil, signal, sys, warnings
    import numpy as np
    from ww_callbacks.controller import WeightWatcherController
    from ww_callbacks.history import History, HistoryWarning

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # EFBIG instead of a kill
    out = sys.argv[1]
    rng = np.random.default_rng(0)
    weights = {f"fc{i}.weight": rng.standard_normal((64, 32)).astype(np.float32) for i in range(4)}
    lines = []

    def controller():
        return WeightWatcherController(start_fraction=0.0, every_n_steps=1, output_dir=out,
                                       trackers=None, log_fn=lines.append, async_analysis=False)

    ctl = controller()
    ctl.configure(total_steps=8, current_step=0)
    ctl.run(weights, step=1, epoch=0)
    one = os.path.getsize(os.path.join(out, "history.jsonl"))
    limit = int(one * 2.5)                              # room for 2 analyses, not 3
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        for step in range(2, 6):
            ctl.run(weights, step=step, epoch=0)
        state = json.loads(json.dumps(ctl.state_dict()))     # a checkpoint, strict JSON
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))   # the limit is raised
    for name in ("history.jsonl", "history.csv"):
        shutil.copy(os.path.join(out, name), os.path.join(out, "..", "limited-" + name))
    memory = [[r["step"], r["name"], r["time"]] for r in ctl.history.rows]
    third = sum(len(History._json_line(r).encode()) for r in ctl.history.rows_at(3))
    resumed = controller()                              # a new process would do the same
    resumed.load_state_dict(state)
    resumed.configure(total_steps=8, current_step=5)
    for step in range(6, 9):
        resumed.run(weights, step=step, epoch=0)
    print(json.dumps({"limit": limit, "third": third, "lines": lines, "memory": memory,
                      "warned": [str(w.message) for w in caught if w.category is HistoryWarning]}))
""")


@pytest.mark.core
def test_file_size_limit_short_writes_then_resume(tmp_path):
    out = tmp_path / "ww"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", LIMITED_RUN, str(out)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]                  # the run finished
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    (report,) = history_reports(got["lines"])
    assert "File too large" in report and not [l for l in got["lines"] if "missing" in l]
    assert len(got["warned"]) == 1 and "File too large" in got["warned"][0]
    names = [f"fc{i}" for i in range(4)]
    memory = [tuple(m) for m in got["memory"]]
    assert [m[:2] for m in memory] == [(s, n) for s in range(1, 6) for n in names]
    limited = whole_lines(tmp_path / "limited-history.jsonl")          # no torn line at the limit
    assert keys(limited, "step", "name", "time") == memory[:8]         # analyses 1 and 2
    # every row that could be written is there: the 3rd analysis does not fit under the limit
    assert got["limit"] - os.path.getsize(tmp_path / "limited-history.jsonl") < got["third"]
    limited_csv = whole_csv_rows(tmp_path / "limited-history.csv")
    assert limited_csv == [m[:2] for m in memory[:len(limited_csv)]] and len(limited_csv) % 4 == 0
    final = whole_lines(out / "history.jsonl")
    expected = [(s, n) for s in range(1, 9) for n in names]
    assert keys(final, "step", "name") == expected                     # no gap, no duplicate
    assert keys(final, "step", "name", "time")[:20] == memory          # kept rows, not redone
    assert whole_csv_rows(out / "history.csv") == expected


# ---------------------------------------------------------------------- reader and strict mode
@pytest.mark.core
def test_reader_skips_a_torn_last_line_with_a_warning(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_bytes(b'{"step": 1, "name": "fc1", "alpha": null}\n{"step": 2, "name": "fc\xc3')
    with pytest.warns(HistoryWarning, match="cut short"):
        rows = read_jsonl(str(path))
    assert len(rows) == 1 and rows[0]["step"] == 1 and math.isnan(rows[0]["alpha"])
    path.write_text('{"step": 1}\n{"step": 2, "na\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):                    # not the last line: an error
        read_jsonl(str(path))
    with pytest.warns(HistoryWarning):
        assert [r["step"] for r in read_jsonl(str(path), skip_bad_lines=True)] == [1, 3]


@pytest.mark.core
def test_strict_reraises_the_write_error_with_its_type(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    ctl = WeightWatcherController(output_dir=str(blocked / "ww"), trackers=None, strict=True,
                                  log_fn=lambda line: None, async_analysis=False)
    with pytest.warns(HistoryWarning), pytest.raises(NotADirectoryError, match="kept in memory"):
        ctl.configure(total_steps=4, current_step=0)
