"""What a resumed run may change, and what it keeps: its folder (--name), its frames and its
process count, its best.pt after a crash; a stop request after the last epoch; `export`
over its own input; `test` of a model given by URL."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_main import train_args
from test_resume import one_error_line

import main
from seglab import checkpoints, synthetic


@pytest.fixture
def half_run(synthetic_root, tmp_path) -> Path:
    """A run of 2 epochs stopped after its first: RUN/last.pt can be resumed."""
    assert main.main(train_args(synthetic_root, tmp_path, "a", 2, "--stop-after", "1")) == 0
    return tmp_path / "a"


def edit_checkpoint(path: Path, **changes) -> None:
    checkpoint = torch.load(path, weights_only=True)
    checkpoint.update(changes)
    checkpoints.save_checkpoint(checkpoint, path)


def test_resume_refuses_another_name(half_run, capsys):
    last = half_run / "last.pt"
    argv = ["train", "--resume", str(last), "--logdir", str(half_run.parent), "--name", "b"]
    assert main.main(argv) == 2
    line = one_error_line(capsys)
    assert f"continues the run in {half_run}" in line and "--name b" in line
    assert not (half_run.parent / "b").exists()
    # Its own name is no change.
    argv[-1] = "a"
    assert main.main([*argv, "--stop-after", "1"]) == 0


def test_resume_refuses_other_frames(half_run, tmp_path_factory, capsys):
    fewer = tmp_path_factory.mktemp("fewer")
    synthetic.generate(fewer, ["1", "2", "5a"], images_per_area=3, size=64, seed=0, progress=False)
    last = half_run / "last.pt"
    assert main.main(["train", "--resume", str(last), "--datadir", str(fewer)]) == 2
    line = one_error_line(capsys)
    assert "6 training frames (the run has 12)" in line
    assert torch.load(last, weights_only=True)["epoch"] == 1  # nothing written


def test_resume_refuses_the_same_number_of_other_frames(half_run, tmp_path_factory, capsys):
    other = tmp_path_factory.mktemp("other")
    synthetic.generate(other, ["1", "2", "5a"], images_per_area=6, size=64, seed=5, progress=False)
    assert main.main(["train", "--resume", str(half_run / "last.pt"), "--datadir", str(other)]) == 2
    assert "other training frames than the run's 12" in one_error_line(capsys)


def test_resume_refuses_another_process_count(half_run, capsys):
    last = half_run / "last.pt"
    saved = torch.load(last, weights_only=True)["training_data"]
    edit_checkpoint(last, training_data={**saved, "world_size": 2})
    assert main.main(["train", "--resume", str(last)]) == 2
    assert "1 process(es) (the run has 2)" in one_error_line(capsys)


def test_a_missing_best_pt_is_written_again_on_resume(synthetic_root, tmp_path, capsys):
    # A learning rate of 1e-12: the weights hardly move, the next epochs need not be better.
    args = train_args(synthetic_root, tmp_path, "r", 3, "--lr", "1e-12", "--stop-after", "1")
    assert main.main(args) == 0
    best, last = tmp_path / "r" / "best.pt", tmp_path / "r" / "last.pt"
    epoch_one = torch.load(last, weights_only=True)
    best.unlink()  # killed between last.pt and best.pt
    capsys.readouterr()
    assert main.main(["train", "--resume", str(last), "--stop-after", "1"]) == 0
    assert (
        f"wrote {best}: the run stopped before saving it after epoch 1" in capsys.readouterr().out
    )
    rewritten = torch.load(best, weights_only=True)
    if rewritten["epoch"] == 1:  # epoch 2 was no better: best.pt is epoch 1's checkpoint
        for key, tensor in epoch_one["model_state"].items():
            assert torch.equal(rewritten["model_state"][key], tensor)


def test_a_lost_best_epoch_lets_the_next_epoch_write_best_pt(synthetic_root, tmp_path):
    args = train_args(synthetic_root, tmp_path, "r", 3, "--lr", "1e-12", "--stop-after", "1")
    assert main.main(args) == 0
    best, last = tmp_path / "r" / "best.pt", tmp_path / "r" / "last.pt"
    best.unlink()
    # The last epoch was not the best one: its weights are gone for good.
    checkpoint = torch.load(last, weights_only=True)
    edit_checkpoint(last, best_miou=checkpoint["best_miou"] + 0.5)
    assert main.main(["train", "--resume", str(last), "--stop-after", "1"]) == 0
    assert torch.load(best, weights_only=True)["epoch"] == 2


@pytest.mark.parametrize(("epochs", "status"), [(1, 0), (2, 75)])
def test_a_stop_request_after_the_last_validation_finishes(
    synthetic_root, tmp_path, monkeypatch, epochs, status
):
    """SIGTERM arrives during the first epoch's validation: a run of one epoch is done
    (exit 0); a run of two stops resumably (75)."""
    evaluate = main.evaluate

    def evaluate_then_signal(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(main, "evaluate", evaluate_then_signal)
    assert main.main(train_args(synthetic_root, tmp_path, "s", epochs)) == status
    assert torch.load(tmp_path / "s" / "last.pt", weights_only=True)["epoch"] == 1


def test_export_refuses_to_write_over_its_input(tmp_path, capsys):
    program = tmp_path / "model.pt2"
    program.write_bytes(b"an exported program")
    assert main.main(["export", "--model", str(program), "--out", str(program)]) == 2
    assert "is the --model file" in one_error_line(capsys)
    assert program.read_bytes() == b"an exported program"


def test_test_of_a_model_by_url_writes_into_the_current_folder(
    tiny_model, synthetic_root, tmp_path
):
    served = tmp_path / "served"
    served.mkdir()
    digest = hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    shutil.copy(tiny_model, served / f"m-{digest[:8]}.pt")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/m-{digest[:8]}.pt"
        work = tmp_path / "work"
        work.mkdir()
        command = [sys.executable, str(ROOT / "main.py"), "test", "--model", url]
        command += ["--datadir", str(synthetic_root), "--areas", "5a", "--device", "cpu"]
        env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    finally:
        httpd.shutdown()
        thread.join()
    assert result.returncode == 0, result.stderr
    assert (work / "test-5a" / "metrics.json").is_file()
    assert sorted(path.name for path in work.iterdir()) == ["test-5a"]
