"""Where users write: every failure ends in one line, and leaves no half-written file.
Full disks are emulated with RLIMIT_FSIZE in a subprocess (a write past the limit fails with
EFBIG, as one on a full disk fails with ENOSPC), or an OSError raised in place of a write."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_main import train_args

import data
import main
from seglab import cache, explore

# Runs ARGV[2:] as a script with the size of any file it writes limited to ARGV[1] bytes.
SMALL_DISK = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails: EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = sys.argv[2:]
sys.path.insert(0, str(__import__("pathlib").Path(sys.argv[0]).resolve().parent))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_on_small_disk(limit: int, script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", SMALL_DISK, str(limit), str(ROOT / script), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def entries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ----------------------------------------------------------------------------------------
# explore show | histogram --out


def test_show_refuses_an_unknown_picture_format(synthetic_root, tmp_path, capsys):
    out = tmp_path / "sample.xyz"
    assert explore.main(["show", "--datadir", str(synthetic_root), "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--out {out}: .xyz is not a picture format" in line
    assert entries(tmp_path) == []


@pytest.mark.parametrize("command", ["show", "histogram"])
def test_an_out_that_cannot_be_written_is_one_line_and_no_file(
    synthetic_root, tmp_path, capsys, monkeypatch, command
):
    """A read-only folder (tests run as root, which writes anywhere: the write fails in
    place of it) or a full disk in the middle of the file."""

    def half_then_fail(self, path, *args, **kwargs):  # self: the Figure, or the Path
        Path(path).write_bytes(b"half")
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    if command == "show":
        monkeypatch.setattr("matplotlib.figure.Figure.savefig", half_then_fail)
    else:
        monkeypatch.setattr(Path, "write_text", lambda path, text: half_then_fail(None, path))
    out = tmp_path / ("sample.png" if command == "show" else "shares.json")
    argv = [command, "--datadir", str(synthetic_root), "--out", str(out)]
    assert explore.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot use {out}: Read-only file system" in line
    assert entries(tmp_path) == []


# ----------------------------------------------------------------------------------------
# export on a full disk


def test_export_of_a_pt2_on_a_full_disk_is_one_line(tiny_model, tmp_path):
    out = tmp_path / "model.pt2"
    result = run_on_small_disk(20_000, "main.py", "export", "--model", str(tiny_model),
                               "--out", str(out))  # fmt: skip
    assert result.returncode == 2  # it was 134: the interpreter aborted
    assert f"cannot write {out}: File too large" in one_error_line(result.stderr)
    assert entries(tmp_path) == []


# ----------------------------------------------------------------------------------------
# cache write and synthetic


def test_cache_write_on_a_full_disk_names_the_file_and_leaves_nothing(synthetic_root, tmp_path):
    out = tmp_path / "cache"
    result = run_on_small_disk(20_000, "seglab/cache.py", "write", "--datadir",
                               str(synthetic_root), "--out", str(out), "--size", "64")  # fmt: skip
    assert result.returncode == 2
    assert f"cannot use {out}/area_1/images.uint8: File too large" in one_error_line(result.stderr)
    assert not out.exists()


@pytest.mark.parametrize("module", ["seglab.cache", "seglab.synthetic"])
def test_a_size_past_the_limit_is_refused_and_creates_nothing(synthetic_root, tmp_path, module):
    out = tmp_path / "out"
    args = ["write", "--datadir", str(synthetic_root)] if module == "seglab.cache" else []
    command = [sys.executable, "-m", module, *args, "--out", str(out), "--size", "100000"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "--size: expected an integer from" in one_error_line(result.stderr)
    assert not out.exists()


def test_two_cache_writes_on_one_out_are_refused(synthetic_root, tmp_path, capsys):
    out = tmp_path / "cache"
    with cache.locked_cache_dir(out):  # another `cache write` at work
        argv = ["write", "--datadir", str(synthetic_root), "--out", str(out), "--size", "32"]
        assert cache.main(argv) == 2
    assert "is being written by another `cache write`" in one_error_line(capsys.readouterr().err)
    assert cache.main(argv) == 0
    manifest = json.loads((out / "cache.json").read_text())
    assert all((out / f"area_{area}").is_dir() for area in manifest["areas"])


# Runs cache.main or explore.main (ARGV[1]) on ARGV[2:], each frame read 0.2 s slower,
# so that Ctrl-C lands in the middle of the work (loader workers inherit the slowness).
SLOW_FRAMES = """
import sys, time
sys.path.insert(0, ".")
import data
from seglab import cache, explore

def slowed(method):
    def slow(self, *args):
        time.sleep(0.2)
        return method(self, *args)
    return slow

cache.FramesForCache.__getitem__ = slowed(cache.FramesForCache.__getitem__)
data.StanfordDataset.label_mask = slowed(data.StanfordDataset.label_mask)
sys.exit({"cache": cache, "explore": explore}[sys.argv[1]].main(sys.argv[2:]))
"""


@pytest.mark.parametrize("command", ["cache", "histogram"])
def test_ctrl_c_is_one_line(synthetic_root, tmp_path, command):
    if command == "cache":
        args = ["cache", "write", "--out", str(tmp_path / "cache"), "--workers", "2"]
    else:
        args = ["explore", "histogram"]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_FRAMES, *args, "--datadir", str(synthetic_root)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    seen = b""
    while b"%|" not in seen:  # the progress bar: the work has begun
        byte = process.stderr.read(1)
        assert byte, seen
        seen += byte
    time.sleep(1)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to every process
    _, stderr = process.communicate(timeout=120)
    stderr = seen.decode() + stderr.decode()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.count("interrupted (Ctrl-C)") == 1
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------------------
# A run that fails on its first batch


def test_a_run_failing_on_its_first_batch_can_be_run_again(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    argv = train_args(synthetic_root, tmp_path, "first", 1)
    train_one_epoch = main.train_one_epoch

    def fails(*args, **kwargs):
        raise data.DataError("cannot read a frame")

    monkeypatch.setattr(main, "train_one_epoch", fails)
    assert main.main(argv) == 2
    assert entries(tmp_path / "first") in ([], [".lock"])  # no events, no metrics
    monkeypatch.setattr(main, "train_one_epoch", train_one_epoch)
    time.sleep(1)  # TensorBoard names its files by the second
    assert main.main(argv) == 0
    assert (tmp_path / "first" / "last.pt").is_file()


@pytest.mark.parametrize("module", ["seglab.cache", "seglab.explore"])
def test_ctrl_c_while_starting_is_one_line(synthetic_root, tmp_path, module):
    """Ctrl-C in the seconds of importing torch, before the command runs."""
    args = ["write", "--out", str(tmp_path / "cache")] if module == "seglab.cache" else ["show"]
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args, "--datadir", str(synthetic_root)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    # Once torch's library is mapped, the package's startup code has run and torch is
    # being imported.
    maps = Path(f"/proc/{process.pid}/maps")
    while "libtorch" not in maps.read_text():
        assert process.poll() is None
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted (Ctrl-C)" in stderr
    assert not (tmp_path / "cache").exists()
