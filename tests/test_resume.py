"""The rules of resuming and of run folders: --stop-after per invocation, a resumed run's
configuration kept, checkpoints that cannot be resumed, run files never written over,
one process per run folder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_main import train_args

import main
from seglab import checkpoints, runfolder


@pytest.fixture(scope="module")
def finished_run(synthetic_root, tmp_path_factory) -> Path:
    """A run of one epoch, finished."""
    logdir = tmp_path_factory.mktemp("finished")
    assert main.main(train_args(synthetic_root, logdir, "one", 1)) == 0
    return logdir / "one"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith("error: ")
    return line


def test_stop_after_counts_the_epochs_of_each_invocation(synthetic_root, tmp_path):
    args = train_args(synthetic_root, tmp_path, "bits", 3, "--stop-after", "1")
    assert main.main(args) == 0
    last = tmp_path / "bits/last.pt"
    for epochs_done in (2, 3):
        assert main.main(["train", "--resume", str(last), "--stop-after", "1"]) == 0
        assert torch.load(last, weights_only=True)["epoch"] == epochs_done


def test_flags_that_would_change_a_resumed_run_are_refused_by_name(finished_run, capsys):
    last = str(finished_run / "last.pt")
    assert main.main(["train", "--resume", last, "--lr", "0.5", "--img-size", "64"]) == 2
    line = one_error_line(capsys)
    assert "--lr 0.5 (the run has 0.001)" in line and "--img-size 64 (the run has 32)" in line
    # How to run may change, and the run's own values may be repeated.
    allowed = ["--workers", "1", "--device", "cpu", "--log-every", "2", "--epochs", "1"]
    assert main.main(["train", "--resume", last, *allowed, "--img-size", "32"]) == 0
    assert "the run is finished" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["best.pt", "epoch3.pt"])
def test_resume_takes_only_a_last_pt(finished_run, capsys, name):
    assert main.main(["train", "--resume", str(finished_run / name)]) == 2
    line = one_error_line(capsys)
    assert "last.pt" in line
    if name == "best.pt":
        assert "not where the run stopped" in line


@pytest.mark.parametrize(
    ("change", "message"),
    [
        *[
            ((key, None), f"cannot be resumed: it lacks {key}")
            for key in ("optimizer_state", "scheduler_state", "scaler_state", "step", "best_miou")
        ],
        (("img_size", "32"), "its img_size is a str, not a int"),
        (("epoch", 1.5), "its epoch is a float, not a int"),
        (("step", True), "its step is a bool, not a int"),
        (("position", [1]), "its position is a list, not a dict"),
        (("position", {"batches_done": 1}), "its position in the epoch lacks world_size"),
        (("position", {"batches_done": "1"}), "its batches_done is a str, not a int"),
    ],
    ids=lambda value: value[0] if isinstance(value, tuple) else None,
)
def test_a_checkpoint_that_cannot_be_resumed_gets_one_line(
    finished_run, tmp_path, capsys, change, message
):
    checkpoint = torch.load(finished_run / "last.pt", weights_only=True)
    key, value = change
    if value is None:
        del checkpoint[key]
    else:
        checkpoint[key] = value
    (tmp_path / "run").mkdir()
    torch.save(checkpoint, tmp_path / "run/last.pt")
    assert main.main(["train", "--resume", str(tmp_path / "run/last.pt"), "--epochs", "3"]) == 2
    assert message in one_error_line(capsys)


@pytest.mark.parametrize(
    "files", [("best.pt",), ("metrics.jsonl",), ("events.out.tfevents.1.host",)], ids=str
)
def test_a_new_run_never_writes_over_the_files_of_a_run(synthetic_root, tmp_path, capsys, files):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    for name in files:
        (run_dir / name).write_bytes(b"an earlier run")
    assert main.main(train_args(synthetic_root, tmp_path, "taken", 1)) == 2
    assert "already holds a run" in one_error_line(capsys)
    for name in files:
        assert (run_dir / name).read_bytes() == b"an earlier run"
    # --resume auto starts over only a folder that holds no checkpoint.
    status = main.main([*train_args(synthetic_root, tmp_path, "taken", 1), "--resume", "auto"])
    assert status == (2 if "best.pt" in files else 0)


def test_resume_auto_needs_a_name(capsys):
    assert main.main(["train", "--resume", "auto"]) == 2
    assert "--resume auto needs --name" in one_error_line(capsys)


def test_resuming_a_missing_checkpoint_writes_nothing(tmp_path, capsys):
    assert main.main(["train", "--resume", str(tmp_path / "gone/last.pt")]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert not (tmp_path / "gone").exists()


LOCK_HOLDER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from seglab import runfolder
with runfolder.RunFolderLock(Path(sys.argv[1])) as lock:
    lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
"""


def test_one_run_folder_one_process_and_a_kill_frees_it(finished_run, tmp_path, capsys):
    checkpoint = torch.load(finished_run / "last.pt", weights_only=True)
    checkpoint["args"]["epochs"] = 3  # a run to continue
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(checkpoint, run_dir / "last.pt")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val": {}}) + "\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(run_dir), str(ROOT)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main.main(["train", "--resume", str(run_dir / "last.pt")]) == 2
        line = one_error_line(capsys)
        assert f"is in use by process {holder.pid} on" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").open()] == [1]
    # The kernel released the lock with the process: nothing stale is left.
    with runfolder.RunFolderLock(run_dir) as lock:
        lock.acquire()
        with pytest.raises(checkpoints.CheckpointError, match="in use by process"):
            runfolder.RunFolderLock(run_dir).acquire()


LEAKED_WORKER = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
from seglab import runstate

class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, index):
        return index

loader = torch.utils.data.DataLoader(
    Numbers(), batch_size=2, num_workers=1, persistent_workers=True,
    worker_init_fn=runstate.ignore_stop_signals,
)
batches = iter(loader)
next(batches)
kept = [batches]  # never shut down, as by the traceback of an error that ended training
"""


def test_a_process_exits_even_with_a_loader_worker_it_never_shut_down():
    """Loader workers ignore SIGTERM, which multiprocessing sends its workers at exit before
    waiting for them: without runstate.end_loader_workers the process would never end."""
    result = subprocess.run(
        [sys.executable, "-c", LEAKED_WORKER, str(ROOT)], capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
